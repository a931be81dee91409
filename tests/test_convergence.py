"""The convergence study's pipeline (benchmarks/convergence.py), shrunken: it
runs end to end, writes its outputs, and every arm used, at every step, the lr
and momentum its schedule promises, checked against independent oracles
(DeepSpeed's own OneCycle for 1-Cycle, torch's LambdaLR / a formula written
here for the others). No claim about convergence is asserted."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "convergence.py")


def _load():
    spec = importlib.util.spec_from_file_location("convergence", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


conv = _load()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    cfg = conv.quick_config()
    result = conv.run_study(cfg, str(out))
    return cfg, result, out


def _deepspeed_one_cycle(schedule, steps):
    """(lrs, beta1s) DeepSpeed's OneCycle sets for steps 0..steps-1, driven as
    documented (optimizer.step(); scheduler.step()) on a dummy Adam, the
    optimizer kind for which DeepSpeed cycles momentum."""
    from deepspeed.runtime.lr_schedules import OneCycle as DSOneCycle

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    params = schedule.params()
    params["decay_step_size"] = params.pop("decay_step_size") or 0
    ds = DSOneCycle(opt, **params)
    lrs, moms = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
        ds.step()
    return lrs, moms


def _warmup_cosine(k, steps, base, peak, warmup):
    # written out again here rather than imported: the oracle for that arm
    if k < warmup:
        return base + (peak - base) * k / warmup
    return peak * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))) / 2


def test_pipeline_writes_outputs(study):
    cfg, result, out = study
    for name in ("results.json", "results.md", "accuracy_vs_samples.png", "lr_vs_steps.png", "range_test.png"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "results.json") as f:
        saved = json.load(f)
    names = [a.name for a in result["arms"]]
    assert names == [row["arm"] for row in saved["table"]] == list(saved["runs"])
    assert {"Fixed", "LinearScale", "1-Cycle", "Best constant 8B", "Warmup+cosine"} <= set(names)
    grid = list(range(cfg.eval_every, cfg.budget + 1, cfg.eval_every))
    for name, run in saved["runs"].items():
        assert run["samples"] == grid, name  # the same evaluation grid for every arm
        assert len(run["accuracy"]) == len(cfg.seeds)
        assert all(len(a) == len(grid) for a in run["accuracy"])
    md = (out / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    # targets are below the ceiling they derive from
    assert all(t < saved["ceiling"] for t in saved["targets"])


def test_every_arm_used_its_schedule(study):
    cfg, result, _ = study
    runs, tuning = result["runs"], result["tuning"]
    lr_b, lr_8b = tuning["small_batch"]["best_lr"], tuning["large_batch"]["best_lr"]
    assert lr_b in cfg.grid_small and lr_8b in cfg.grid_large
    steps_large = cfg.budget // cfg.large_batch
    warmup = round(cfg.warmup_fraction * steps_large)
    constant = {"Fixed": lr_b, "LinearScale": cfg.factor * lr_b, "Best constant 8B": lr_8b}
    for arm in result["arms"]:
        run = runs[arm.name]
        every = cfg.lr_record_every * (cfg.factor if arm.batch == cfg.batch else 1)
        assert run["record_every"] == every
        steps = list(range(0, cfg.budget // arm.batch, every))
        assert len(run["lr"]) == len(steps), arm.name
        if arm.name.startswith("1-Cycle"):
            ds_lr, ds_mom = _deepspeed_one_cycle(arm.schedule, steps_large)
            want_lr = [ds_lr[k] for k in steps]
            # DeepSpeed writes cycle_min_mom before its first step (a documented
            # difference); the measured momentum starts at step 1 anyway
            want_mom = [ds_mom[k] for k in steps]
        elif arm.name == "Warmup+cosine":
            # torch's own LambdaLR set these; the formula is the promise
            want_lr = [_warmup_cosine(k, steps_large, lr_b, cfg.factor * lr_b, warmup) for k in steps]
            want_mom = [cfg.momentum] * len(steps)
        elif arm.name.startswith("Baseline"):
            want_lr, want_mom = [lr_b] * len(steps), [cfg.momentum] * len(steps)
        else:
            want_lr, want_mom = [constant[arm.name]] * len(steps), [cfg.momentum] * len(steps)
        # the probe reads lr back through fp32 arithmetic: a few ulps of fp32
        for k, got, want in zip(steps, run["lr"], want_lr):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (arm.name, k)
        # the study's own every-step comparison agrees
        assert run["lr_max_rel_dev"] < 1e-6 and run["momentum_max_abs_dev"] < 1e-5, arm.name
        assert run["momentum"][0] is None  # torch's first step: buf = grad, no momentum applied
        for k, got, want in zip(steps[1:], run["momentum"][1:], want_mom[1:]):
            assert got == pytest.approx(want, rel=1e-5), (arm.name, k)


def test_one_cycle_shape(study):
    cfg, result, _ = study
    s = next(a for a in result["arms"] if a.name == "1-Cycle").schedule
    steps = cfg.budget // cfg.large_batch
    assert s.total_size == round(cfg.cycle_fraction * steps)
    assert s.cycle_max_lr == pytest.approx(result["range_test"]["lr_at_loss_min"] / cfg.range_divisor)
    assert s.cycle_min_lr == pytest.approx(s.cycle_max_lr / cfg.min_lr_divisor)
    # the budget's last step runs at cycle_min_lr / final_lr_divisor
    assert s.lr(steps) == pytest.approx(s.cycle_min_lr / cfg.final_lr_divisor)


def test_samples_to_target_and_summary():
    samples = [10, 20, 30, 40]
    assert conv.samples_to_target(samples, [0.1, 0.5, 0.7, 0.9], 0.5) == 20
    assert conv.samples_to_target(samples, [0.1, 0.2, 0.3, 0.4], 0.5) is None
    # a blow-up (None) before the target is a miss, even if "reached" later
    assert conv.samples_to_target(samples, [0.1, None, None, None], 0.5) is None
    assert conv.samples_to_target(samples, [0.1, float("nan"), 0.9, 0.9], 0.5) is None
    s = conv.summarize([30, 10, None, 20, 40])
    assert s == {"median": 30, "min": 10, "max": None, "misses": 1, "n": 5}
    s = conv.summarize([None, None, 10])
    assert s["median"] is None and s["misses"] == 2 and s["min"] == 10
    assert conv.summarize([10, 20])["median"] == 15


def test_stacked_seeds_equal_independent_runs():
    """Training seeds stacked in one model gives each seed exactly what it
    would get alone (the study's speed trick must not couple the seeds)."""
    cfg = conv.quick_config()
    x = torch.randn(64, cfg.dim)
    y = torch.randint(0, cfg.classes, (64,))
    idx = torch.stack([torch.randperm(64)[:16] for _ in range(2)])

    def run(seeds, rows):
        model = conv.StackedMLP(cfg, seeds)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad()
            conv.per_seed_loss(model(x[rows]), y[rows]).sum().backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    together = run((3, 4), idx)
    for i, seed in enumerate((3, 4)):
        alone = run((seed,), idx[i: i + 1])
        for a, b in zip(alone, together):
            torch.testing.assert_close(a[0], b[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change,name", [
    ({"eval_every": 1000}, "eval_every"),  # not a multiple of the large batch
    ({"budget": 5000}, "budget"),  # not a multiple of eval_every
    ({"batch": 0}, "batch"),
    ({"seeds": ()}, "seeds"),
])
def test_bad_config_names_the_parameter(change, name):
    import dataclasses

    cfg = dataclasses.replace(conv.quick_config(), **change)
    with pytest.raises(ValueError, match=name):
        cfg.validate()
