"""`python -m onecycle_fused plot / range-test`: tables against the schedule
spec and DeepSpeed's OneCycle, PNGs written, errors reported in one line."""
import json
import subprocess
import sys

import pytest

from onecycle_fused.cli import main
from onecycle_fused.plotting import format_table, plot_schedule, schedule_values_at
from onecycle_fused.schedule import OneCycle, TorchOneCycle, schedule_from_config

from conftest import SEED_CONFIG

PNG = b"\x89PNG\r\n\x1a\n"


def _table(out: str) -> dict[int, list[float]]:
    """step -> values, parsed from the printed table."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = [float(c) for c in cells[1:]]
    return rows


def _deepspeed_values(params: dict, steps):
    """lr / momentum from DeepSpeed's own OneCycle on an Adam (beta1 is its momentum)."""
    import torch
    from deepspeed.runtime.lr_schedules import OneCycle as DSOneCycle

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = DSOneCycle(opt, **params)
    out = {}
    for k in range(max(steps) + 1):
        if k in steps:
            out[k] = (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0])
        sched.step()
    return out


def test_plot_from_deepspeed_config(tmp_path, capsys):
    out = tmp_path / "plot.png"
    at = [0, 1, 500, 999, 1000, 1500, 2000, 2001, 3000, 3999]
    assert main(["plot", "--config", SEED_CONFIG, "--steps", "4000", "--out", str(out),
                 "--at", ",".join(map(str, at))]) == 0
    assert out.read_bytes()[:8] == PNG
    table = _table(capsys.readouterr().out)
    assert sorted(table) == at
    params = json.load(open(SEED_CONFIG))["scheduler"]["params"]
    ds = _deepspeed_values(params, set(at))
    for k in at:
        lr, mom = table[k]
        assert lr == pytest.approx(ds[k][0], rel=1e-5)  # the table prints 6 significant digits
        if k > 0:  # DeepSpeed writes cycle_min_mom at step 0 (documented difference 1)
            assert mom == pytest.approx(ds[k][1], rel=1e-5)
    assert table[0][1] == pytest.approx(params["cycle_max_mom"])


def test_plot_from_keyword_arguments_per_group(tmp_path, capsys):
    args = ["plot", "cycle_min_lr=[1e-4,1e-5]", "cycle_max_lr=[1e-3,1e-4]", "cycle_first_step_size=100",
            "decay_step_size=10", "decay_lr_rate=0.1", "cycle_momentum=false", "--at", "0,50,100,300"]
    assert main(args) == 0
    table = _table(capsys.readouterr().out)
    sched = OneCycle([1e-4, 1e-5], [1e-3, 1e-4], cycle_first_step_size=100, decay_step_size=10,
                     decay_lr_rate=0.1, cycle_momentum=False)
    for k, values in table.items():
        assert len(values) == 2  # two lr columns, no momentum
        assert values == pytest.approx(sched.lr(k), rel=1e-5)


def test_plot_range_test_schedule_default_table(capsys):
    assert main(["plot", "--type", "LRRangeTest", "lr_range_test_step_size=10", "--steps", "101"]) == 0
    table = _table(capsys.readouterr().out)
    assert sorted(table) == list(range(0, 101, 10))  # 11 evenly spaced rows by default
    assert table[100] == pytest.approx([1e-3 * 11])


def test_plot_type_alone_takes_the_schedule_defaults(capsys):
    """`--type LRRangeTest` with no key=value: DeepSpeed's defaults, as its
    LRRangeTest constructed with no arguments gives them."""
    import torch
    from deepspeed.runtime.lr_schedules import LRRangeTest as DSLRRangeTest

    assert main(["plot", "--type", "LRRangeTest", "--at", "0,1999,2000,5000"]) == 0
    table = _table(capsys.readouterr().out)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = DSLRRangeTest(opt)
    expected = {}
    for k in range(5001):
        expected[k] = opt.param_groups[0]["lr"]
        sched.step()
    assert sorted(table) == [0, 1999, 2000, 5000]
    for k, values in table.items():
        assert values[0] == pytest.approx(expected[k], rel=1e-5)
    assert table[5000][0] != table[0][0]  # the defaults do move the lr


def test_plot_at_rows_are_unique_and_in_order(capsys):
    assert main(["plot", "--config", SEED_CONFIG, "--at", "5,5,0,1000,5"]) == 0
    steps = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()
             if line.split() and line.split()[0].isdigit()]
    assert steps == [0, 5, 1000]


@pytest.mark.parametrize("steps_run,expected", [(20, "diverged, stopped after 20 steps"),
                                                (60, "completed (the loss diverged by the end) after 60 steps")])
def test_range_test_reports_a_stop_only_when_it_cut_the_test_short(steps_run, expected, capsys, monkeypatch):
    """The divergence check also runs after the last step; firing there, it
    stopped nothing."""
    from onecycle_fused import range_test
    from onecycle_fused.range_test import RangeTestResult

    def fake(*args, num_steps, **kwargs):
        assert num_steps == 60
        lrs = [1e-3 * (i + 1) for i in range(steps_run)]
        return RangeTestResult(lrs, [1.0] * steps_run, [1.0] * steps_run, 1e-3, 4e-3, diverged=True)

    monkeypatch.setattr(range_test, "lr_range_test", fake)
    assert main(["range-test", "--steps", "60"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"range test {expected}")


def test_plot_torch_onecycle_default_steps(capsys):
    """--type TorchOneCycle takes OneCycleLR's names; the default table spans
    the whole schedule, 0 .. total_steps."""
    assert main(["plot", "--type", "TorchOneCycle", "max_lr=0.1", "total_steps=100", "anneal_strategy=linear"]) == 0
    table = _table(capsys.readouterr().out)
    sched = TorchOneCycle(max_lr=0.1, total_steps=100, anneal_strategy="linear")
    assert sorted(table) == list(range(0, 101, 10))
    for k, values in table.items():
        assert values == pytest.approx([sched.lr(k), sched.momentum(k)], rel=1e-5)


def test_plot_takes_python_float_literals(capsys):
    """".1" and "1." as a Python script writes them (JSON takes neither) are
    numbers; "inf" one that validation names as not finite."""
    assert main(["plot", "cycle_min_lr=.0001", "cycle_max_lr=1.e-3", "cycle_first_step_size=10.", "--at", "5"]) == 0
    sched = OneCycle(1e-4, 1e-3, cycle_first_step_size=10)
    assert _table(capsys.readouterr().out)[5] == pytest.approx([sched.lr(5), sched.momentum(5)], rel=1e-5)
    assert main(["plot", "cycle_min_lr=1e-4", "cycle_max_lr=inf"]) == 2
    assert "cycle_max_lr must be finite" in capsys.readouterr().err


def test_plot_type_onecyclelr_is_torch_onecycle(capsys):
    """--type OneCycleLR, torch's name, as a config's scheduler entry may give
    it: the same schedule as --type TorchOneCycle."""
    args = ["max_lr=0.1", "total_steps=50", "three_phase=true", "--at", "0,10,30,49"]
    assert main(["plot", "--type", "OneCycleLR", *args]) == 0
    torch_name = capsys.readouterr().out
    assert main(["plot", "--type", "TorchOneCycle", *args]) == 0
    assert torch_name == capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["plot"], "--config"),
    (["plot", "cycle_min_lr=1", "cycle_max_lr=0.1"], "cycle_min_lr"),
    (["plot", "cycle_min_lr=1e-3", "cycle_max_lr=1e-2", "lr_wrong=3"], "lr_wrong"),
    (["plot", "cycle_max_lr"], "key=value"),
    (["plot", "--config", SEED_CONFIG, "cycle_min_lr=1"], "not both"),
    (["plot", "cycle_min_lr=1e-4", "cycle_max_lr=1e-3", "cycle_min_lr=1e-5"], "cycle_min_lr is given twice"),
    (["plot", "--config", "no_such_config.json"], "no_such_config.json"),
    (["plot", "--config", __file__], "not a JSON file"),
    (["plot", "--config", SEED_CONFIG, "--type", "LRRangeTest"], "--type"),
    (["plot", "--config", SEED_CONFIG, "--at", str(2**63)], "beyond int64"),
    (["plot", "--config", SEED_CONFIG, "--out", "no_such_dir/s.png"], "no_such_dir"),
    (["plot", "--config", SEED_CONFIG, "--out", "s.pnx"], "pnx"),
    (["range-test", "--out", "no_such_dir/r.png"], "no_such_dir"),
    (["range-test", "--min-lr", "0"], "min_lr"),
    (["range-test", "--max-lr-divisor", "0.5"], "max_lr_divisor"),
])
def test_plot_errors_are_one_line(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error:") and match in err and "Traceback" not in err
    assert out == ""  # the error comes before anything runs
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args", [["plot", "cycle_min_lr=1e-4", "cycle_max_lr=1e-3", "--out", "s.png"],
                                  ["range-test", "--steps", "2", "--out", "r.png"]])
def test_out_without_matplotlib_is_one_line_naming_it(args, capsys, tmp_path, monkeypatch):
    """matplotlib is an extra (`onecycle-fused[plot]`): without it --out was a
    ModuleNotFoundError traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --out:") and "pip install matplotlib" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # nothing ran
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["plot", "cycle_min_lr=1e-4", "cycle_max_lr=1e-3", "--out", "s.ps"],
                                  ["range-test", "--steps", "20", "--out", "r.ps"]])
def test_out_in_a_format_this_machine_cannot_write_fails_before_anything_runs(args, capsys, tmp_path, monkeypatch):
    """A format matplotlib lists may need a tool the machine lacks (.pgf:
    LaTeX to lay out text): the check of --out took it, the whole range test
    ran, and the save then failed with a traceback, the result lost. Now a
    one-line error before anything runs. (The missing tool is simulated for
    .ps, so that the test does not depend on what is installed.)"""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from onecycle_fused import plotting

    save = Figure.savefig

    def savefig(self, fname, *a, format=None, **kw):
        if format == "ps" or str(fname).endswith(".ps"):
            raise RuntimeError("'ghostscript' not found")
        return save(self, fname, *a, format=format, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(plotting, "_WRITABLE", set())
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --out: 'ps' images cannot be written here (RuntimeError: 'ghostscript'")
    assert "Traceback" not in captured.err and captured.out == ""  # nothing ran
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["plot", "--at", "1,x"], ["plot", "--at", ""], ["plot", "--at=-1"],
                                  ["plot", "--steps", "0"], ["range-test", "--steps", "two"], ["range-test", "--steps", "1"],
                                  ["range-test", "--optimizer", "lamb"], ["plot", "--type", "Linear"], [],
                                  # beyond what the counters / torch.manual_seed take: errors from deep inside
                                  ["plot", "cycle_min_lr=1e-4", "cycle_max_lr=1e-3", "--steps", str(2**62 + 1)],
                                  ["range-test", "--seed", str(2**64)], ["range-test", "--steps", str(2**62 + 1)]])
def test_bad_flags_are_argparse_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["plot", "cycle_min_lr=1e-4", "cycle_max_lr=1e-3", "--out", ""],
                                  ["range-test", "--steps", "2", "--out", ""]])
def test_an_empty_out_is_an_error_in_both_commands(args, capsys, tmp_path, monkeypatch):
    """`--out "$OUT"` with OUT unset: `plot` printed its table and wrote no
    image, `range-test` failed naming `plot`; both now refuse it by name."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "argument --out: expected an image path" in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_out_is_written_exactly_where_asked(tmp_path, capsys):
    """--out without an extension is a PNG at that very path (matplotlib alone
    would write "<path>.png" while the CLI printed "wrote <path>"); an
    extension picks the format; nothing else is written."""
    for name, magic in (("schedule", PNG), ("schedule.svg", b"<?xml"), ("schedule.PDF", b"%PDF")):
        out = tmp_path / name
        assert main(["plot", "--config", SEED_CONFIG, "--at", "0", "--out", str(out)]) == 0
        assert out.read_bytes()[:len(magic)] == magic
        assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule", "schedule.PDF", "schedule.svg"]


def test_plot_schedule_function(tmp_path):
    sched = schedule_from_config(SEED_CONFIG)
    rows = schedule_values_at(sched, [0, 1000])
    assert rows[1] == {"step": 1000, "lr": [sched.lr(1000)], "momentum": [sched.momentum(1000)]}
    assert format_table(rows).splitlines()[0].split() == ["step", "lr", "momentum"]
    path = plot_schedule(sched, str(tmp_path / "s.png"), steps=300, marks=[0, 100])
    assert open(path, "rb").read(8) == PNG
    with pytest.raises(ValueError, match="steps"):
        plot_schedule(sched, str(tmp_path / "t.png"), steps=0)
    # a DeepSpeed config (path or dict) is taken as schedule_from_config takes it
    assert schedule_values_at(SEED_CONFIG, [0, 1000]) == rows
    assert schedule_values_at(json.load(open(SEED_CONFIG)), [0, 1000]) == rows
    path = plot_schedule(SEED_CONFIG, str(tmp_path / "c.png"), steps=300)
    assert open(path, "rb").read(8) == PNG
    # a path or marks of the wrong kind: ValueError naming them, before drawing
    # (os.fspath's TypeError, "'<=' not supported" before)
    for kw, match in ((dict(path=None), "path must be a file path"), (dict(marks="5"), "marks must be"),
                      (dict(marks=5), "marks must be"), (dict(marks=[1.5]), "marks must be")):
        with pytest.raises(ValueError, match=match):
            plot_schedule(sched, **{"path": str(tmp_path / "m.png"), "steps": 10, **kw})
    path = plot_schedule(sched, str(tmp_path / "g.png"), steps=10, marks=(k for k in (0, 5)))  # an iterator too
    assert open(path, "rb").read(8) == PNG


def test_range_test_command_line(tmp_path):
    """The real entry point, as a user runs it."""
    out = tmp_path / "rt.png"
    proc = subprocess.run([sys.executable, "-m", "onecycle_fused", "range-test", "--steps", "60",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    config = json.loads(lines[2])["scheduler"]
    assert config["type"] == "OneCycle"
    lo, hi = config["params"]["cycle_min_lr"], config["params"]["cycle_max_lr"]
    assert 1e-3 <= lo < hi <= 3.0 and hi / lo == pytest.approx(4, rel=1e-4)
    assert out.read_bytes()[:8] == PNG


def test_plot_schedule_takes_numpy_integer_steps(tmp_path):
    """steps=np.int64(300) was refused as "steps must be an integer >= 1, got
    np.int64(300)"; numpy integers are integers (lr(k) and lr_range_test take them)."""
    np = pytest.importorskip("numpy")
    sched = schedule_from_config(SEED_CONFIG)
    path = plot_schedule(sched, str(tmp_path / "s.png"), steps=np.int64(300), marks=[np.int64(0)])
    assert open(path, "rb").read(8) == PNG
    with pytest.raises(ValueError, match="steps"):
        plot_schedule(sched, str(tmp_path / "t.png"), steps=np.int64(0))
