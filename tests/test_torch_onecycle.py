"""TorchOneCycle: torch's OneCycleLR schedule on the device.

Oracle: torch.optim.lr_scheduler.OneCycleLR itself. Host values (float64,
schedule.py) must equal what OneCycleLR puts in param_groups after k
scheduler steps, bit for bit, for every k in 0..T; every backend's device
schedule must equal the host's (bit for bit, or within an ulp where a cos
that is not the C library's is involved); and whole training runs must equal
torch.optim + OneCycleLR stepped every iteration.
"""
import io
import json
import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

import onecycle_fused.ops as ops
from onecycle_fused import (
    FusedOneCycleAdam,
    FusedOneCycleAdamW,
    FusedOneCycleSGD,
    OneCycle,
    TorchOneCycle,
    load_torch_optimizer_state,
    schedule_from_config,
)
from onecycle_fused.backends.reference import schedule_values as reference_schedule_values
from onecycle_fused.schedule import ROW_WIDTH

# name -> (our kwargs, number of parameter groups). torch gets the same
# kwargs, with pct_start as a float (torch refuses an int).
CONFIGS = {
    "default-cos-1000": (dict(max_lr=0.1, total_steps=1000), 1),
    "linear-1000": (dict(max_lr=0.1, total_steps=1000, anneal_strategy="linear"), 1),
    "pct0.25-T10": (dict(max_lr=0.1, total_steps=10, pct_start=0.25), 1),
    "three-phase-pct0.25-T10": (dict(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True), 1),
    "three-phase-linear-T10": (dict(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True,
                                    anneal_strategy="linear"), 1),
    "epochs-per-group": (dict(max_lr=[0.1, 0.02, 1.5], epochs=3, steps_per_epoch=7, base_momentum=[0.8, 0.85, 0.7],
                              max_momentum=[0.95, 0.9, 0.99]), 3),
    "factors-three-phase": (dict(max_lr=0.3, total_steps=97, pct_start=0.45, div_factor=10.0, final_div_factor=100.0,
                                 three_phase=True), 1),
    "pct0-int": (dict(max_lr=0.1, total_steps=50, pct_start=0), 1),
    # the last phase has zero length: torch divides by zero at k = T
    "pct1-int-linear": (dict(max_lr=0.1, total_steps=10, pct_start=1, anneal_strategy="linear"), 1),
    "pct1-cos": (dict(max_lr=0.1, total_steps=13, pct_start=1.0), 1),
    "three-phase-zero-last": (dict(max_lr=0.1, total_steps=2, pct_start=0.75, three_phase=True), 1),
    # phase 2 ends after T: torch extrapolates it and never reaches phase 3
    "three-phase-pct0.9": (dict(max_lr=0.1, total_steps=10, pct_start=0.9, three_phase=True), 1),
    "no-momentum-cycling": (dict(max_lr=[0.05, 0.2], total_steps=30, cycle_momentum=False), 2),
    "one-step": (dict(max_lr=0.1, total_steps=1), 1),
}


def _torch_kwargs(kw):
    kw = dict(kw)
    if "pct_start" in kw:
        kw["pct_start"] = float(kw["pct_start"])
    return kw


def torch_values(kw, groups, opt="sgd"):
    """(lr, momentum) per group from torch's OneCycleLR after k steps, for k
    = 0 .. T, and the exception torch raises on the way (None if it
    reaches T). Momentum is the optimizer's (SGD momentum / Adam beta1)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    spec = [{"params": [p]} for p in params]
    if opt == "sgd":
        o = torch.optim.SGD(spec, lr=0.01, momentum=0.9)
    else:
        o = torch.optim.Adam(spec, lr=0.01, betas=(0.9, 0.999))

    def read():
        return [(g["lr"], g["momentum"] if opt == "sgd" else g["betas"][0]) for g in o.param_groups]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        sched = OneCycleLR(o, **_torch_kwargs(kw))
        values = [read()]
        for _ in range(sched.total_steps):
            try:
                sched.step()
            except ZeroDivisionError as e:
                return values, e
            values.append(read())
    return values, None


def ulps(a: float, b: float) -> float:
    return abs(a - b) / math.ulp(b) if a != b else 0.0


# ---------------------------------------------------------------------------
# host values against torch


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_host_values_equal_torch_bit_for_bit(name, opt):
    kw, groups = CONFIGS[name]
    sched = TorchOneCycle(**kw)
    want, error = torch_values(kw, groups, opt)
    T = sched.length
    if error is not None:
        # only where the last phase has zero length, and only at k = T
        assert len(want) == T and sched.last_exact_step == T - 1, name
    else:
        assert len(want) == T + 1 and sched.last_exact_step == T, name
    for k, per_group in enumerate(want):
        for g, (lr, mom) in enumerate(per_group):
            assert sched.lr(k, g) == lr, (name, k, g)
            if kw.get("cycle_momentum", True):
                assert sched.momentum(k, g) == mom, (name, k, g)
            else:
                # torch leaves the optimizer's own momentum; so do we
                assert sched.momentum(k, g) is None and mom == 0.9


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_past_the_end_holds_the_last_values(name):
    """k > T (and k = T after a zero-length last phase): the values of T - 1."""
    kw, groups = CONFIGS[name]
    sched = TorchOneCycle(**kw)
    T = sched.length
    later = [T + 1, T + 2, 2 * T + 7, 10**9, 2**53]
    if sched.last_exact_step == T - 1:
        later.append(T)
    for g in range(groups):
        end = (sched.lr(T - 1, g), sched.momentum(T - 1, g))
        for k in later:
            assert (sched.lr(k, g), sched.momentum(k, g)) == end, (name, k, g)
    # and k = T itself is torch's own value where torch has one
    if sched.last_exact_step == T:
        assert sched.lr(T, 0) != sched.lr(T - 1, 0) or T == 1


@pytest.mark.parametrize("three_phase", [False, True])
def test_linear_lr_at_total_steps_is_torchs_negative_value(three_phase):
    """The README: at k = total_steps the values are torch's, past the end of
    its curve; with 'linear' that lr is negative (torch takes that step too),
    and from k = total_steps + 1 on the end value holds."""
    kw = dict(max_lr=0.1, total_steps=1000, anneal_strategy="linear", three_phase=three_phase)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    torch_sched = OneCycleLR(opt, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer.step() in between: only the values are wanted
        for _ in range(1000):
            torch_sched.step()
    want = opt.param_groups[0]["lr"]
    sched = TorchOneCycle(**kw)
    assert sched.lr(1000) == want < 0
    assert sched.lr(1001) == sched.lr(999) > 0
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    fused = FusedOneCycleSGD([p], schedule=sched, backend="reference")
    fused.set_step(1000)
    p.grad = torch.ones(1, dtype=torch.float64)
    fused.step()  # the lr of k = 1000: an uphill step
    assert p.item() == -want


def test_phase_ends_are_torchs():
    s = TorchOneCycle(max_lr=0.1, total_steps=1000, three_phase=True)
    assert (s.phase1_end, s.phase2_end, s.last_end) == (299.0, 598.0, 999.0)
    s = TorchOneCycle(max_lr=1.0, total_steps=10, pct_start=0.35)
    assert s.phase1_end == float(0.35 * 10) - 1 and s.phase2_end == float(2 * 0.35 * 10) - 2
    assert s.group_lrs() == (1.0 / 25.0, 1.0, 1.0 / 25.0 / 1e4)


def test_epochs_and_total_steps_like_torch():
    assert TorchOneCycle(0.1, epochs=4, steps_per_epoch=25).length == 100
    # torch: total_steps wins, epochs and steps_per_epoch are then not read
    assert TorchOneCycle(0.1, total_steps=7, epochs="x", steps_per_epoch=None).length == 7


# ---------------------------------------------------------------------------
# validation: ValueError naming the parameter


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(max_lr=0.1), "total_steps"),
        (dict(max_lr=0.1, epochs=3), "total_steps"),
        (dict(max_lr=0.1, total_steps=0), "total_steps"),
        (dict(max_lr=0.1, total_steps=2.5), "total_steps"),
        (dict(max_lr=0.1, total_steps=True), "total_steps"),
        (dict(max_lr=0.1, epochs=0, steps_per_epoch=3), "epochs"),
        (dict(max_lr=0.1, epochs=2, steps_per_epoch=-1), "steps_per_epoch"),
        (dict(max_lr=0.1, total_steps=10, pct_start=1.5), "pct_start"),
        (dict(max_lr=0.1, total_steps=10, pct_start=-0.1), "pct_start"),
        (dict(max_lr=0.1, total_steps=10, pct_start="0.3"), "pct_start"),
        (dict(max_lr=0.1, total_steps=10, anneal_strategy="exp"), "anneal_strategy"),
        (dict(max_lr=-0.1, total_steps=10), "max_lr"),
        (dict(max_lr=[0.1, float("nan")], total_steps=10), "max_lr[1]"),
        (dict(max_lr=0.1, total_steps=10, div_factor=0.0), "div_factor"),
        (dict(max_lr=0.1, total_steps=10, final_div_factor=-1.0), "final_div_factor"),
        (dict(max_lr=0.1, total_steps=10, base_momentum=1.0), "base_momentum"),
        (dict(max_lr=0.1, total_steps=10, max_momentum=[0.9, 0.95], base_momentum=[0.8]), "lengths"),
        (dict(max_lr=0.1, total_steps=10, cycle_momentum=1), "cycle_momentum"),
        (dict(max_lr=0.1, total_steps=10, three_phase="yes"), "three_phase"),
        # the first phase would have zero length: torch raises ZeroDivisionError
        (dict(max_lr=0.1, total_steps=10, pct_start=0.1), "pct_start"),
        (dict(max_lr=0.1, total_steps=4, pct_start=0.25, three_phase=True), "pct_start"),
    ],
)
def test_validation_names_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        TorchOneCycle(**kw)


def test_zero_first_phase_is_where_torch_divides_by_zero():
    kw = dict(max_lr=0.1, total_steps=10, pct_start=0.1)
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    with pytest.raises(ZeroDivisionError):
        OneCycleLR(o, **kw)
    with pytest.raises(ValueError, match="pct_start"):
        TorchOneCycle(**kw)


# ---------------------------------------------------------------------------
# every backend's device schedule against the host


def table_of(sched, groups, momentum=0.9):
    rows = []
    for g in range(groups):
        row = sched.row(g) + [0.0] * (ROW_WIDTH - len(sched.row(g)))
        if not sched.cycles_momentum:
            row[13] = momentum
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def steps_of(sched):
    T = sched.length
    ks = list(range(min(T, 300) + 3)) + [T - 2, T - 1, T, T + 1, T + 50, 10**6, 2**40]
    return sorted({k for k in ks if k >= 0})


def host(sched, k, g, momentum=0.9):
    mom = sched.momentum(k, g)
    return sched.lr(k, g), (momentum if mom is None else mom)


def check_backend(values_at, name, max_ulps_cos):
    """values_at(table, k) -> [groups, 2] float64; bit-exact for 'linear',
    within max_ulps_cos for 'cos'. Returns the largest distance seen."""
    kw, groups = CONFIGS[name]
    sched = TorchOneCycle(**kw)
    table = table_of(sched, groups)
    worst = 0.0
    for k in steps_of(sched):
        got = values_at(table, k)
        for g in range(groups):
            for got_v, want_v in zip(got[g], host(sched, k, g)):
                d = ulps(got_v, want_v)
                worst = max(worst, d)
                if sched.anneal_strategy == "linear":
                    assert got_v == want_v, (name, k, g)
                else:
                    assert d <= max_ulps_cos, (name, k, g, got_v, want_v)
    return worst


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_schedule_values(name):
    """torch ops on the device. Linear is bit-exact. cos is torch.cos, whose
    CPU kernel (Sleef, even for one element) differs from math.cos by 1 ulp
    for about 0.1% of arguments (measured: 108 of 100,000 in [0, 4] on an
    AVX512 CPU; k = 769 of the default 1000-step schedule is one)."""

    def values_at(table, k):
        lr, mom = reference_schedule_values(table, torch.tensor(k))
        return torch.stack([lr, mom], 1).tolist()

    check_backend(values_at, name, max_ulps_cos=1)


needs_cpu_op = pytest.mark.skipif(not ops.cpu_library_loaded(), reason="onecycle_fused._C is not built")


@needs_cpu_op
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_op_schedule_values_bit_exact(name):
    """csrc/schedule.h on the host (shared with the CUDA kernels): its cos is
    the C library's, the very function behind Python's math.cos, so even
    'cos' is bit-exact."""

    def values_at(table, k):
        return torch.ops.onecycle_fused.schedule_values(table, k).tolist()

    assert check_backend(values_at, name, max_ulps_cos=0) == 0.0


def test_rows_of_other_kinds_are_unchanged_by_the_new_kind():
    """A table mixing kinds: each row gets its own kind's values."""
    a = TorchOneCycle(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True)
    b = OneCycle(0.01, 0.1, cycle_first_step_size=4)
    table = torch.tensor([r + [0.0] * (ROW_WIDTH - len(r)) for r in (a.row(), b.row())], dtype=torch.float64)
    for k in range(14):
        lr, mom = reference_schedule_values(table, torch.tensor(k))
        assert (lr[1].item(), mom[1].item()) == (b.lr(k), b.momentum(k))
        assert ulps(lr[0].item(), a.lr(k)) <= 1 and ulps(mom[0].item(), a.momentum(k)) <= 1
        if ops.cpu_library_loaded():
            got = torch.ops.onecycle_fused.schedule_values(table, k)
            assert got[0].tolist() == [a.lr(k), a.momentum(k)] and got[1].tolist() == [b.lr(k), b.momentum(k)]


# ---------------------------------------------------------------------------
# whole runs against torch.optim + OneCycleLR


TRAJECTORIES = [
    ("sgd", FusedOneCycleSGD, torch.optim.SGD, dict(momentum=0.9), dict(max_lr=0.1, total_steps=60)),
    ("sgd-nesterov-wd-three-phase", FusedOneCycleSGD, torch.optim.SGD,
     dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
     dict(max_lr=0.2, total_steps=40, pct_start=0.25, three_phase=True)),
    ("sgd-linear-per-group", FusedOneCycleSGD, torch.optim.SGD, dict(momentum=0.9),
     dict(max_lr=[0.1, 0.03], total_steps=25, anneal_strategy="linear", base_momentum=[0.85, 0.8])),
    ("sgd-constant-momentum", FusedOneCycleSGD, torch.optim.SGD, dict(momentum=0.7),
     dict(max_lr=0.1, epochs=5, steps_per_epoch=6, cycle_momentum=False)),
    ("adam", FusedOneCycleAdam, torch.optim.Adam, dict(), dict(max_lr=0.01, total_steps=60)),
    ("adam-linear-per-group", FusedOneCycleAdam, torch.optim.Adam, dict(weight_decay=1e-2),
     dict(max_lr=[0.01, 0.003], total_steps=25, anneal_strategy="linear", three_phase=True)),
    ("adam-constant-beta1", FusedOneCycleAdam, torch.optim.Adam, dict(betas=(0.8, 0.99)),
     dict(max_lr=0.01, total_steps=20, cycle_momentum=False)),
    ("adamw", FusedOneCycleAdamW, torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True),
     dict(max_lr=0.01, total_steps=60, pct_start=0.4)),
]


def _params(groups, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (11,), (1,), (2, 3, 5)]
    values = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return values, [[0, 1, 2, 3]] if groups == 1 else [[0, 2], [1, 3]]


def _spec(params, split):
    if len(split) == 1:
        return params
    return [{"params": [params[i] for i in idx]} for idx in split]


def run_pair(ours_cls, torch_cls, opt_kw, sched_kw, backend, steps=None, check_mirror=True):
    """Step ours and torch.optim + OneCycleLR side by side over the whole
    schedule: T scheduler steps, so T + 1 optimizer steps."""
    sched = TorchOneCycle(**sched_kw)
    groups = sched.num_groups or 1
    init, split = _params(groups)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ours = ours_cls(_spec(a, split), schedule=sched, backend=backend, **opt_kw)
    ref = torch_cls(_spec(b, split), lr=0.5, **opt_kw)  # lr is OneCycleLR's to set
    torch_sched = OneCycleLR(ref, **_torch_kwargs(sched_kw))
    gen = torch.Generator().manual_seed(1)
    steps = sched.length + 1 if steps is None else steps
    for k in range(steps):
        if check_mirror:
            assert ours.get_last_lr() == torch_sched.get_last_lr(), k
            for go, gt in zip(ours.param_groups, ref.param_groups):
                key = "momentum" if "momentum" in gt else "betas"
                assert go[key] == gt[key], k
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen, dtype=torch.float64).to(pa.dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        if k < sched.length:
            torch_sched.step()
    return a, b, ours, ref


def max_ulps32(xs, ys):
    worst = 0
    for x, y in zip(xs, ys):
        xi = x.detach().view(torch.int32).long()
        yi = y.detach().view(torch.int32).long()
        worst = max(worst, (xi - yi).abs().max().item())  # same signs here: bits order like values
    return worst


BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_op)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,ours_cls,torch_cls,opt_kw,sched_kw", TRAJECTORIES, ids=[t[0] for t in TRAJECTORIES])
def test_trajectory_equals_torch(name, ours_cls, torch_cls, opt_kw, sched_kw, backend):
    """SGD: bit for bit (fp32, CPU). Adam / AdamW: within a few ulps (the
    CPU kernel's float32 update rounds differently in places)."""
    a, b, ours, ref = run_pair(ours_cls, torch_cls, opt_kw, sched_kw, backend)
    # the moved parameters really moved
    assert all(not torch.equal(x, y) for x, y in zip(a, _params(1)[0]))
    states = []
    for pa, pb in zip(a, b):
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ref.state[pb] and ref.state[pb][key] is not None:
                states.append((ours.state[pa][key], ref.state[pb][key]))
    if ours_cls is FusedOneCycleSGD:
        for x, y in zip(a, b):
            assert torch.equal(x, y), (x - y).abs().max()
        for x, y in states:
            assert torch.equal(x, y)
    else:
        assert max_ulps32(a, b) <= 4
        assert max_ulps32(*zip(*states)) <= 4


def test_after_the_end_the_step_uses_the_end_values():
    """Steps after T use lr(T - 1): an SGD step then equals torch's with that lr."""
    kw = dict(max_lr=0.1, total_steps=8)
    a, b, ours, ref = run_pair(FusedOneCycleSGD, torch.optim.SGD, dict(momentum=0.9), kw, "reference")
    sched = TorchOneCycle(**kw)
    for k in (9, 10):
        assert ours.get_last_lr() == [sched.lr(7)] and ours.param_groups[0]["momentum"] == sched.momentum(7)
        for group in ref.param_groups:
            group["lr"], group["momentum"] = sched.lr(7), sched.momentum(7)
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, dtype=torch.float64).float()
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# optimizer plumbing: state_dict, set_step, group overrides, migration, config


def _sgd(params, sched, backend="reference"):
    return FusedOneCycleSGD(params, schedule=sched, momentum=0.9, backend=backend)


def _drive(opt, params, steps, gen):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_state_dict_round_trip_continues_identically():
    sched = TorchOneCycle(max_lr=[0.1, 0.05], total_steps=30, three_phase=True, pct_start=0.2)
    init, split = _params(2)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    opt = _sgd(_spec(a, split), sched)
    gen = torch.Generator().manual_seed(3)
    _drive(opt, a, 11, gen)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in a]}, buf)
    gen_state = gen.get_state()
    _drive(opt, a, 25, gen)  # through the end and past it

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b = [torch.nn.Parameter(t) for t in ck["params"]]
    # a fresh optimizer built with another schedule: the checkpoint's wins
    fresh = _sgd(_spec(b, split), TorchOneCycle(max_lr=[9.0, 9.0], total_steps=5))
    fresh.load_state_dict(ck["opt"])
    assert fresh.param_groups[0]["schedule"]["type"] == "TorchOneCycle"
    assert fresh.get_last_lr() == sched.lr(11)
    gen.set_state(gen_state)
    _drive(fresh, b, 25, gen)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert int(fresh.step_counter()) == 36


def test_set_step_and_mirror():
    sched = TorchOneCycle(max_lr=0.1, total_steps=100)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FusedOneCycleAdam([p], schedule=sched, backend="reference")
    assert opt.get_last_lr() == [sched.lr(0)] and opt.param_groups[0]["betas"] == (0.95, 0.999)
    opt.set_step(57)
    assert opt.get_last_lr() == [sched.lr(57)] and opt.param_groups[0]["betas"][0] == sched.momentum(57)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.get_last_lr() == [sched.lr(58)]
    # the step ran with lr(57): Adam's first step moves by lr (sign of the grad)
    torch.testing.assert_close(p.detach(), torch.full((3,), -sched.lr(57)), rtol=1e-6, atol=0)


def test_group_keys_override_the_schedule():
    sched = TorchOneCycle(max_lr=0.1, total_steps=20)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = _sgd([{"params": [p]}, {"params": [q], "max_lr": 0.5, "anneal_strategy": "linear"}], sched)
    other = TorchOneCycle(max_lr=0.5, total_steps=20, anneal_strategy="linear")
    assert opt.get_last_lr() == [sched.lr(0), other.lr(0)]
    opt.set_step(13)
    assert opt.get_last_lr() == [sched.lr(13), other.lr(13)]
    with pytest.raises(ValueError, match="cycle_min_lr"):
        _sgd([{"params": [p]}, {"params": [q], "cycle_min_lr": 0.5}], sched)


def test_one_line_migration_needs_no_onecycle_keywords():
    """The user story: only schedule= and the torch.optim keywords."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = FusedOneCycleSGD([p], schedule=TorchOneCycle(max_lr=0.1, total_steps=1000), momentum=0.9)
    # torch's lr(0): the cos anneal at pct 0, an ulp off max_lr / div_factor
    assert opt.get_last_lr() == [torch_values(dict(max_lr=0.1, total_steps=1000), 1)[0][0][0][0]]
    assert opt.param_groups[0]["momentum"] == 0.95
    with pytest.raises(ValueError, match="not both"):
        FusedOneCycleSGD([p], cycle_min_lr=0.1, cycle_max_lr=0.2, schedule=TorchOneCycle(0.1, total_steps=10))


def test_config_round_trip_is_json():
    s = TorchOneCycle(max_lr=[0.1, 0.2], epochs=3, steps_per_epoch=4, pct_start=0, anneal_strategy="linear",
                      base_momentum=[0.8, 0.7], three_phase=True)
    config = json.loads(json.dumps(s.config()))
    assert config["type"] == "TorchOneCycle"
    back = schedule_from_config(config)
    assert back == s and back.length == 12
    assert [back.lr(k) for k in range(14)] == [s.lr(k) for k in range(14)]
    assert TorchOneCycle.from_config({"scheduler": config}) == s
    assert s.for_group(1) == TorchOneCycle(max_lr=0.2, epochs=3, steps_per_epoch=4, pct_start=0.0,
                                           anneal_strategy="linear", base_momentum=0.7, three_phase=True)


def test_deepspeed_config_naming_torchs_onecyclelr():
    """DeepSpeed's engine takes a torch.optim.lr_scheduler name as the
    scheduler type. Such a config, moved to the optimizer, gives torch's
    curve: the lrs OneCycleLR itself sets, step by step."""
    params = {"max_lr": 0.3, "total_steps": 12, "pct_start": 0.25, "anneal_strategy": "linear", "last_epoch": -1}
    ds_config = {"train_batch_size": 8, "scheduler": {"type": "OneCycleLR", "params": params}}
    sched = schedule_from_config(json.loads(json.dumps(ds_config)))
    assert isinstance(sched, TorchOneCycle)
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        torch_sched = OneCycleLR(o, **params)
        expected = []
        for _ in range(12):
            expected.append(o.param_groups[0]["lr"])
            torch_sched.step()
    assert [sched.lr(k) for k in range(12)] == expected
    with pytest.raises(ValueError, match="last_epoch"):
        schedule_from_config({"type": "OneCycleLR", "params": dict(params, last_epoch=5)})
    with pytest.raises(ValueError, match="OneCycleLR"):  # named among the types
        schedule_from_config({"type": "CosineAnnealingLR", "params": {}})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_migrate_from_torch_onecycle_lr_mid_run(algo, backend):
    """Take over a torch.optim + OneCycleLR run after 23 steps; continuing
    in the fused optimizer equals continuing in torch."""
    kw = dict(max_lr=0.05, total_steps=50, three_phase=True)
    init, _ = _params(1)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    if algo == "sgd":
        ref = torch.optim.SGD(a, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        ref = torch.optim.Adam(a, lr=0.1, weight_decay=1e-3)
    torch_sched = OneCycleLR(ref, **kw)
    gen = torch.Generator().manual_seed(5)

    def grads():
        return [torch.randn(p.shape, generator=gen) for p in a]

    for _ in range(23):
        for p, g in zip(a, grads()):
            p.grad = g
        ref.step()
        torch_sched.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    cls = FusedOneCycleSGD if algo == "sgd" else FusedOneCycleAdam
    extra = dict(momentum=0.9) if algo == "sgd" else {}
    ours = cls(b, schedule=TorchOneCycle(**kw), backend=backend, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same arguments: no "other arguments" warning
        assert load_torch_optimizer_state(ours, ref.state_dict(), torch_sched.state_dict()) == 23
    assert ours.get_last_lr() == torch_sched.get_last_lr()
    for _ in range(27):
        for p, q, g in zip(a, b, grads()):
            p.grad, q.grad = g, g.clone()
        ref.step()
        torch_sched.step()
        ours.step()
    if algo == "sgd":
        for x, y in zip(b, a):
            assert torch.equal(x, y)
    else:
        assert max_ulps32(b, a) <= 4


@pytest.mark.parametrize("change, named", [
    (dict(total_steps=60), "phase end steps"), (dict(pct_start=0.4), "phase end steps"),
    (dict(three_phase=False), "phase end steps"), (dict(anneal_strategy="linear"), "anneal_strategy"),
    (dict(max_lr=0.08), "max_lr"), (dict(div_factor=10.0), "initial_lr"), (dict(final_div_factor=100.0), "min_lr"),
    (dict(base_momentum=0.8), "base_momentum"), (dict(max_momentum=0.97), "max_momentum"),
])
def test_migrate_from_a_onecycle_lr_made_with_other_arguments_warns(change, named):
    """The README: a OneCycleLR run continues exactly in a TorchOneCycle
    with the same arguments. With others it went on silently with the other
    curve (lr 0.0203 where torch's next was 0.0109); now a warning names
    what differs, from the scheduler's state and the values it put into the
    torch groups. The load itself still happens (a changed schedule may be
    what the user wants)."""
    kw = dict(max_lr=0.05, total_steps=50, three_phase=True)
    a = [torch.nn.Parameter(torch.zeros(3))]
    ref = torch.optim.SGD(a, lr=0.1, momentum=0.9)
    torch_sched = OneCycleLR(ref, **kw)
    for _ in range(7):
        a[0].grad = torch.ones(3)
        ref.step()
        torch_sched.step()
    ours = FusedOneCycleSGD([torch.nn.Parameter(torch.zeros(3))], schedule=TorchOneCycle(**dict(kw, **change)),
                            momentum=0.9, backend="reference")
    with pytest.warns(UserWarning, match=rf"other arguments .*param_groups\[0\] {named}: "):
        assert load_torch_optimizer_state(ours, ref.state_dict(), torch_sched.state_dict()) == 7
    assert int(ours.step_counter()) == 7
