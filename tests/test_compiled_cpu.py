"""The compiled CPU backend ("cpu") against the reference backend, the oracle.

Both run through the optimizer classes on identical parameters and gradients.
fp32/fp64: SGD is bit-exact with the reference; Adam differs only where
torch's sqrt (MKL, not correctly rounded) differs from ours (IEEE), so fp32
results must be within a few ulps. bf16/fp16: no further from a float64 run
than the reference at that dtype is (the flash-attention rule).
"""
import os
import subprocess
import sys

import pytest
import torch

import onecycle_fused as oc
from onecycle_fused import ops
from onecycle_fused.backends import resolve
from onecycle_fused.schedule import ROW_WIDTH, LRRangeTest, OneCycle, Row

pytestmark = pytest.mark.skipif(not ops.cpu_library_loaded(), reason="onecycle_fused._C is not built")

SGD, ADAM, ADAMW = oc.FusedOneCycleSGD, oc.FusedOneCycleAdam, oc.FusedOneCycleAdamW
LOW = (torch.bfloat16, torch.float16)

# a short cycle so that 100+ steps cover rise, fall and decay
SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=20, cycle_second_step_size=30,
             decay_step_size=5, decay_lr_rate=0.5, decay_mom_rate=0.1, cycle_min_mom=0.85, cycle_max_mom=0.95)

CONFIGS = [
    (SGD, {}),
    (SGD, dict(weight_decay=0.01, dampening=0.1)),
    (SGD, dict(nesterov=True, maximize=True, weight_decay=1e-3)),
    (SGD, dict(cycle_momentum=False, momentum=0.0)),  # plain SGD: no buffer
    (SGD, dict(cycle_momentum=False, momentum=0.9)),
    (SGD, dict(cycle_first_stair_count=4, cycle_second_stair_count=3)),
    (ADAM, {}),
    (ADAM, dict(weight_decay=0.01, amsgrad=True)),
    (ADAM, dict(maximize=True, betas=(0.9, 0.99), eps=1e-6, cycle_momentum=False)),
    (ADAMW, {}),
    (ADAMW, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    (ADAMW, dict(cycle_first_stair_count=5)),
]


def _ids(cfg):
    cls, kw = cfg
    return cls.__name__[len("FusedOneCycle"):] + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_shares_split_inside_tensors(threads, dtype):
    """Threads get equal shares of all elements laid end to end, so shares
    start and end inside tensors (and inside vector blocks): the result must
    not depend on where. Uneven sizes like a real model's, bit-exact with the
    same backend on one thread and (SGD) with the reference."""
    shapes = [(3,), (40_001,), (1,), (17, 33), (65_537,), (5,), (2_048,), (9_999,)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(SGD, {}, shapes, dtype, "cpu", 3)
        torch.set_num_threads(threads)
        many, _ = _run(SGD, {}, shapes, dtype, "cpu", 3)
        many_adam, _ = _run(ADAMW, {}, shapes, dtype, "cpu", 3)
        torch.set_num_threads(1)
        one_adam, _ = _run(ADAMW, {}, shapes, dtype, "cpu", 3)
    finally:
        torch.set_num_threads(before)
    ref, _ = _run(SGD, {}, shapes, dtype, "reference", 3)
    for a, b in zip(many + many_adam, one + one_adam):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        for a, b in zip(many, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SGD, ADAMW])
def test_mixed_dtypes_in_one_call(cls):
    """fp32, bf16, fp16 and fp64 tensors in one op call (each chunk runs its
    dtype's kernel variant) give what each dtype gives alone."""
    shapes = [(40_000,), (7, 9), (33_333,), (5,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    start = [p.to(d) for p, d in zip(_make_params(shapes, torch.float64), dtypes)]

    def train(indices):
        params = [torch.nn.Parameter(start[i].clone()) for i in indices]
        opt = cls(params, backend="cpu", **SCHED)
        for step in range(3):
            for i, p in zip(indices, params):  # each tensor's grads depend on it and the step only
                g = torch.Generator().manual_seed(100 * i + step)
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            opt.step()
        return params

    together = train(range(len(shapes)))
    for i, d in enumerate(dtypes):
        alone = train([i])
        assert together[i].dtype == d and torch.equal(together[i], alone[0]), d


def _make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _run(cls, kw, shapes, dtype, backend, steps, seed=0, params=None, grad_dtype=None, groups=None):
    """Train `steps` steps on fixed random grads; returns (params, optimizer)."""
    params = _make_params(shapes, dtype, seed) if params is None else [p.clone() for p in params]
    params = [torch.nn.Parameter(p) for p in params]
    kwargs = {**SCHED, **kw}
    if groups is not None:
        arg = [{"params": [params[i] for i in idx], **extra} for idx, extra in groups]
    else:
        arg = params
    opt = cls(arg, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            # low-precision runs' float64 twin gets the same (rounded) gradients
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(grad_dtype or p.dtype).to(p.dtype)
        opt.step()
    return params, opt


def _ulps(a, b):
    """Largest difference between a and b in ulps of b's largest magnitude
    (elements near 0 carry the rounding of the larger terms that met there)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    unit = b.abs().max().double().item() * torch.finfo(b.dtype).eps
    return (a.double() - b.double()).abs().max().item() / max(unit, torch.finfo(b.dtype).tiny)


def _states(opt):
    return [t for st in opt.state.values() for k, t in sorted(st.items()) if k != "step"]


def _check_fp(cls, a, b, opt_a, opt_b, dtype):
    """fp32/fp64: SGD bit-exact; Adam within a few ulps (torch's sqrt is not correctly rounded)."""
    exact = cls is SGD
    for x, y in zip(list(a) + _states(opt_a), list(b) + _states(opt_b)):
        if exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:  # measured: at most 1.4 ulps after 110 steps
            assert _ulps(x, y) <= 8, _ulps(x, y)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_reference_fp(cfg, dtype):
    cls, kw = cfg
    shapes = [(), (1,), (0,), (7,), (3, 5), (2, 3, 33), (4099,)]
    a, opt_a = _run(cls, kw, shapes, dtype, "cpu", 110)
    b, opt_b = _run(cls, kw, shapes, dtype, "reference", 110)
    _check_fp(cls, a, b, opt_a, opt_b, dtype)
    assert torch.equal(opt_a.step_counter(), opt_b.step_counter())
    for p, q in zip(a, b):
        assert torch.equal(opt_a.state[p]["step"], opt_b.state[q]["step"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_flash_attention_rule(cfg, dtype):
    """bf16/fp16: error vs a float64 run at most the reference's (+ a little)."""
    cls, kw = cfg
    shapes = [(1,), (7,), (3, 5), (1031,)]
    start = _make_params(shapes, dtype)
    ours, _ = _run(cls, kw, shapes, dtype, "cpu", 100, params=start)
    ref, _ = _run(cls, kw, shapes, dtype, "reference", 100, params=start)
    exact, _ = _run(cls, kw, shapes, torch.float64, "reference", 100, params=[p.double() for p in start],
                    grad_dtype=dtype)
    for o, r, e in zip(ours, ref, exact):
        err_ours = (o.double() - e.detach()).abs().max().item()
        err_ref = (r.double() - e.detach()).abs().max().item()
        assert err_ours <= 1.5 * err_ref + 1e-6, (err_ours, err_ref)
        # in practice the rounding is the reference's: nearly all elements equal
        assert (o != r).float().mean().item() < 0.01


@pytest.mark.parametrize("cls", [SGD, ADAMW])
def test_big_tensor_and_many_tensors(cls):
    """2**20+3 elements (many parallel chunks and a ragged tail) next to
    hundreds of small tensors of odd sizes, in one op call."""
    shapes = [(2**20 + 3,)] + [(1 + (7 * i) % 97,) for i in range(300)]
    a, opt_a = _run(cls, {}, shapes, torch.float32, "cpu", 3)
    b, opt_b = _run(cls, {}, shapes, torch.float32, "reference", 3)
    _check_fp(cls, a, b, opt_a, opt_b, torch.float32)


def _noncontiguous_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(7, 5, generator=g).to(dtype).t(),  # transposed: not contiguous, but dense
        torch.randn(2, 3, 4, 5, generator=g).to(dtype).to(memory_format=torch.channels_last),
        torch.randn(6, 8, generator=g).to(dtype)[:, ::2],  # not dense: a strided view
        torch.randn(9, generator=g).to(dtype),
    ]


@pytest.mark.parametrize("cls", [SGD, ADAM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_layout", ["same", "contiguous", "transposed"])
def test_noncontiguous(cls, dtype, grad_layout):
    starts = _noncontiguous_params(dtype)
    results = {}
    for backend in ("cpu", "reference"):
        params = [torch.nn.Parameter(s) for s in _noncontiguous_params(dtype)]
        assert not params[0].is_contiguous() and not params[2].is_contiguous()
        opt = cls(params, backend=backend, **SCHED)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                grad = torch.randn(p.shape, generator=g).to(dtype)
                if grad_layout == "same":
                    grad = torch.empty_like(p).copy_(grad)
                elif grad_layout == "transposed" and grad.dim() == 2:
                    grad = grad.t().contiguous().t()
                p.grad = grad
            opt.step()
        results[backend] = (params, opt)
    (a, opt_a), (b, opt_b) = results["cpu"], results["reference"]
    for x, y, s in zip(a, b, starts):
        assert x.stride() == s.stride()  # updated in place, layout kept
        if cls is SGD:
            assert torch.equal(x, y)
        elif dtype == torch.float32:
            assert _ulps(x, y) <= 8
        else:  # bf16: the rounding of one sqrt may flip a last bit
            assert (x != y).float().mean().item() < 0.05
            torch.testing.assert_close(x, y, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("cls", [SGD, ADAMW])
def test_param_groups_with_different_hyperparameters(cls):
    shapes = [(5,), (6,), (7,), (8,)]
    extra = dict(weight_decay=0.05) if cls is SGD else dict(amsgrad=True, weight_decay=0.0)
    groups = [
        ([0, 1], {}),
        ([2], dict(cycle_max_lr=0.3, cycle_first_stair_count=3, **extra)),
        ([3], dict(cycle_momentum=False, **({"momentum": 0.5} if cls is SGD else {"betas": (0.8, 0.9)}))),
    ]
    a, opt_a = _run(cls, {}, shapes, torch.float32, "cpu", 120, groups=groups)
    b, opt_b = _run(cls, {}, shapes, torch.float32, "reference", 120, groups=groups)
    _check_fp(cls, a, b, opt_a, opt_b, torch.float32)


@pytest.mark.parametrize("cls", [SGD, ADAM])
@pytest.mark.parametrize("staircase", [False, True])
def test_lr_range_test_schedule(cls, staircase):
    sched = LRRangeTest(lr_range_test_min_lr=1e-3, lr_range_test_step_size=7, lr_range_test_step_rate=2.0,
                        lr_range_test_staircase=staircase)
    out = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(33)), torch.nn.Parameter(torch.randn(4, 4))]
        kw = dict(momentum=0.9) if cls is SGD else {}
        opt = cls(params, schedule=sched, backend=backend, **kw)
        for _ in range(40):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        out[backend] = (params, opt)
    _check_fp(cls, out["cpu"][0], out["reference"][0], out["cpu"][1], out["reference"][1], torch.float32)


@pytest.mark.parametrize("cls", [SGD, ADAMW])
def test_grad_scale_and_found_inf(cls):
    """GradScaler's grad_scale divides the grads; found_inf != 0 changes nothing."""
    out = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(3, 3))]
        opt = cls(params, backend=backend, **SCHED)
        for i in range(12):
            for p in params:
                p.grad = torch.randn_like(p) * 1024
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if i % 4 == 3 else 0.0)
            before = [p.detach().clone() for p in params] + [t.clone() for t in _states(opt)]
            counter = opt.step_counter().clone()
            opt.step()
            if i % 4 == 3:
                after = [p.detach() for p in params] + _states(opt)
                assert all(torch.equal(x, y) for x, y in zip(before, after))
                assert torch.equal(opt.step_counter(), counter)
        out[backend] = (params, opt)
    (a, opt_a), (b, opt_b) = out["cpu"], out["reference"]
    assert int(opt_a.step_counter()) == 9
    _check_fp(cls, a, b, opt_a, opt_b, torch.float32)
    for p in a:
        assert int(opt_a.state[p]["step"]) == 9


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,key", [(SGD, "momentum_buffer"), (ADAMW, "exp_avg_sq")])
def test_skipped_step_still_checks_the_states(backend, cls, key):
    """A state of the wrong shape raises on the step that meets it, also when
    GradScaler skips that step (found_inf = 1), and nothing changes."""
    params = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(4, 3))]
    opt = cls(params, backend=backend, **SCHED)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[params[1]][key] = torch.zeros(3, 4)
    opt.found_inf = torch.tensor(1.0)
    before = [p.detach().clone() for p in params] + [t.clone() for t in _states(opt)]
    with pytest.raises(ValueError, match=rf"{key}s\[1\] must match params\[1\]"):
        opt.step()
    after = [p.detach() for p in params] + _states(opt)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert int(opt.step_counter()) == 1


def test_grad_scaler_end_to_end():
    """torch.amp.GradScaler on CPU drives the fused optimizer like torch.optim."""
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler not available")
    results = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        opt = ADAMW(model.parameters(), backend=backend, **SCHED)
        scaler = scaler_cls("cpu", init_scale=2.0**10)
        for i in range(6):
            loss = model(torch.randn(4, 8)).square().sum()
            if i == 2:
                loss = loss * float("inf")  # forces a skipped step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results[backend] = (list(model.parameters()), opt)
    (a, opt_a), (b, opt_b) = results["cpu"], results["reference"]
    assert int(opt_a.step_counter()) == int(opt_b.step_counter()) == 5
    _check_fp(ADAMW, a, b, opt_a, opt_b, torch.float32)


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_step_counts_at_int64_max_wrap_like_torchs_int64_add(op):
    """A step from counts of 2**63 - 1 (a loaded per-parameter count can be any int64 >= 0)
    wraps them to -2**63, as torch's int64 add does (the reference backend's
    `step + 1`). The C++ side counts in unsigned arithmetic: the signed
    `step + 1` it had overflowed, undefined behaviour that an
    -fsanitize=undefined build of the library reported (in ops.cpp's count
    increments and update.h's Adam bias correction). A normal build wrapped
    anyway, so this fails only under UBSan without the fix."""
    big = 2**63 - 1
    row = OneCycle(0.01, 0.1, cycle_first_step_size=4).row() + [0.0] * (ROW_WIDTH - Row.MOMENTUM - 1)
    row[Row.BETA2], row[Row.EPS] = 0.999, 1e-8
    table = torch.tensor([row], dtype=torch.float64)
    p, g = torch.randn(37), torch.randn(37)
    steps, counter = [torch.tensor(big)], torch.tensor(big)
    if op == "sgd":
        torch.ops.onecycle_fused.sgd_step_([p], [g], [torch.zeros(37)], steps, [0], table, counter, None, None)
    else:
        state = [[torch.zeros(37)] for _ in range(3)]
        torch.ops.onecycle_fused.adam_step_([p], [g], *state, steps, [0], table, counter, None, None)
    wrapped = torch.tensor(big) + 1
    assert int(wrapped) == -(2**63)
    assert torch.equal(steps[0], wrapped) and torch.equal(counter, wrapped)


def test_auto_picks_cpu_backend():
    assert resolve("auto", torch.device("cpu"), {torch.float32, torch.bfloat16}).name == "cpu"
    p = torch.nn.Parameter(torch.randn(3))
    opt = SGD([p], **SCHED)
    p.grad = torch.ones(3)
    opt.step()
    assert opt._backend_for[torch.device("cpu")].name == "cpu"


# ---------------------------------------------------------------------------
# schedule.h against schedule.py, bit for bit


SCHEDULES = [
    OneCycle(0.001, 0.1, cycle_first_step_size=7),
    OneCycle(1e-4, 3e-2, cycle_first_step_size=10, cycle_second_step_size=23, cycle_first_stair_count=3,
             cycle_second_stair_count=5, decay_step_size=4, decay_lr_rate=0.3, decay_mom_rate=0.05),
    OneCycle(0.05, 0.5, cycle_first_step_size=3, cycle_second_step_size=0, decay_step_size=1, decay_lr_rate=1e-3),
    OneCycle(0.01, 0.01, cycle_first_step_size=1000, cycle_momentum=False),
    OneCycle(0.0123, 0.987, cycle_first_step_size=333, cycle_first_stair_count=7, decay_step_size=13,
             decay_lr_rate=0.01),
    LRRangeTest(1e-5, 17, 0.37, False),
    LRRangeTest(1e-3, 5, 1.5, True),
]


def _table(schedules, constant_momentum=0.42):
    rows = []
    for s in schedules:
        r = s.row() + [0.0] * (ROW_WIDTH - Row.MOMENTUM - 1)
        if not s.cycles_momentum:
            r[Row.MOMENTUM] = constant_momentum
        rows.append(r)
    return torch.tensor(rows, dtype=torch.float64)


def test_schedule_header_matches_host_bit_for_bit():
    table = _table(SCHEDULES)
    ks = list(range(0, 800)) + [1999, 2000, 2001, 10**6 + 7, 2**40 + 3]
    for k in ks:
        got = torch.ops.onecycle_fused.schedule_values(table, k)
        for g, s in enumerate(SCHEDULES):
            mom = s.momentum(k)
            assert got[g, 0].item() == s.lr(k), (g, k)
            assert got[g, 1].item() == (0.42 if mom is None else mom), (g, k)


def test_schedule_header_matches_reference_schedule_values():
    from onecycle_fused.backends.reference import schedule_values

    table = _table(SCHEDULES)
    for k in range(0, 400, 3):
        lr, mom = schedule_values(table, torch.tensor(k))
        got = torch.ops.onecycle_fused.schedule_values(table, k)
        assert torch.equal(got[:, 0], lr) and torch.equal(got[:, 1], mom), k


# ---------------------------------------------------------------------------
# every compiled CPU variant computes the same bits


# inputs from numpy: torch.randn's own output depends on the CPU capability
_VARIANT_SCRIPT = r"""
import numpy as np, torch, onecycle_fused as oc
from onecycle_fused import ops
rng = np.random.default_rng(0)
def randn(n, dtype):
    return torch.from_numpy(rng.standard_normal(n)).to(dtype)
out = [ops.cpu_capability()]
for cls in (oc.FusedOneCycleSGD, oc.FusedOneCycleAdamW):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ps = [torch.nn.Parameter(randn(n, dtype)) for n in (1, 13, 1000, 70001)]
        opt = cls(ps, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, backend="cpu",
                  weight_decay=0.01)
        for _ in range(7):
            for p in ps:
                p.grad = randn(p.numel(), dtype)
            opt.step()
        out.append([p.detach().double().sum().item() for p in ps])
        out.append([p.detach().view(-1)[:64].double().tolist() for p in ps])
print(repr(out))
"""


def test_cpu_capability_variants_agree():
    """DEFAULT, AVX2 and AVX512 builds of the kernels give identical results
    (ONECYCLE_FUSED_CPU_KERNELS asks for a variant, torch's ATEN_CPU_CAPABILITY
    caps it; the inputs come from numpy, so they do not depend on it)."""
    results = {}
    for cap in ("default", "avx2", "avx512"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, ONECYCLE_FUSED_CPU_KERNELS=cap)
        proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = eval(proc.stdout.strip().splitlines()[-1])
        results[out[0]] = out[1:]
    assert "DEFAULT" in results
    values = list(results.values())
    for v in values[1:]:
        assert v == values[0], sorted(results)


def test_kernel_variant_choice():
    """float32/float64 run at most AVX2 (torch's rule for its fused optimizers),
    bfloat16/float16 the best variant; ONECYCLE_FUSED_CPU_KERNELS asks for one
    variant for all (another value is ignored, with a warning); never above
    torch's capability."""
    script = "import onecycle_fused; from onecycle_fused import ops; print(ops.cpu_capability())"
    # (TORCH_CPP_LOG_LEVEL=ERROR or above would hide the C++ warning checked below)
    base = {k: v for k, v in os.environ.items() if k not in ("ONECYCLE_FUSED_CPU_KERNELS", "TORCH_CPP_LOG_LEVEL")}

    def variant(**env):
        proc = subprocess.run([sys.executable, "-c", script], env=dict(base, **env), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("is not one of default, avx2, avx512" in proc.stderr) == (
            env.get("ONECYCLE_FUSED_CPU_KERNELS", "").lower() not in ("", "default", "avx2", "avx512")), proc.stderr
        return proc.stdout.split()[-1]

    torch_cap = torch.backends.cpu.get_cpu_capability()
    if torch_cap not in ("AVX2", "AVX512"):
        pytest.skip(f"torch's capability here is {torch_cap}")
    assert variant() == ("AVX2/AVX512" if torch_cap == "AVX512" else "AVX2")
    assert variant(ONECYCLE_FUSED_CPU_KERNELS="avx512") == torch_cap
    assert variant(ONECYCLE_FUSED_CPU_KERNELS="avx2") == "AVX2"
    assert variant(ONECYCLE_FUSED_CPU_KERNELS="default") == "DEFAULT"
    assert variant(ATEN_CPU_CAPABILITY="default") == "DEFAULT"
    assert variant(ATEN_CPU_CAPABILITY="avx2", ONECYCLE_FUSED_CPU_KERNELS="avx512") == "AVX2"
    # a misspelt or empty value is the automatic choice (a misspelt one warns),
    # not the slow DEFAULT kernels
    assert variant(ONECYCLE_FUSED_CPU_KERNELS="avx-512") == variant()
    assert variant(ONECYCLE_FUSED_CPU_KERNELS="") == variant()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch is not an OpenMP build on Linux")
def test_library_is_compiled_with_openmp():
    """at::parallel_for is an inline OpenMP pragma in these torch builds: compiled
    without -fopenmp it silently runs the CPU kernels on one thread. The pragma,
    when compiled, becomes calls to libgomp's GOMP_parallel."""
    import onecycle_fused

    libs = [f for f in os.listdir(os.path.dirname(onecycle_fused.__file__)) if f.startswith("_C.") and f.endswith(".so")]
    assert libs, "no _C library file found"
    with open(os.path.join(os.path.dirname(onecycle_fused.__file__), libs[0]), "rb") as f:
        assert b"GOMP_parallel" in f.read()
    # and the process holds one OpenMP runtime: torch's (ours resolved to it)
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp
