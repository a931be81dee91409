"""The Triton backend against the reference backend.

CI has no GPU: these tests run the kernels in triton's interpreter on CPU
tensors. TRITON_INTERPRET=1 must be in the environment before triton creates
the kernels, so this file runs in its own pytest process:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py

Without it (and without CUDA) the module skips. With CUDA and no interpreter
the same tests run on the GPU.

The interpreter costs ~10 ms per program, so tensors are small, chunks are
64 elements (block 32 x 2 iterations) to get several chunks per tensor, and
long runs use few tensors: the file takes ~60 s (30 s of CPU) on 2 cores.
"""
import gc
import math
import os
import weakref

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need CUDA or the interpreter: run with TRITON_INTERPRET=1 in its own pytest process",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from onecycle_fused import (  # noqa: E402
    FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD, LRRangeTest, OneCycle, TorchOneCycle,
)
from conftest import assert_same_optimizers  # noqa: E402
from onecycle_fused import ops  # noqa: E402
from onecycle_fused.backends import get_backend  # noqa: E402
from onecycle_fused.backends import triton as tb  # noqa: E402
from onecycle_fused.backends import triton_kernels as tk  # noqa: E402
from onecycle_fused.backends.reference import schedule_values  # noqa: E402
from onecycle_fused.schedule import ROW_WIDTH  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
SIZES = (0, 1, 7, 33, 64, 65, 130)  # empty, single, odd, one chunk, chunk + 1, three chunks
# DeepSpeed-style schedule that visits rising and falling stairs and the decay phase quickly
SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=3, cycle_second_step_size=4,
             decay_step_size=2, decay_lr_rate=0.3, cycle_min_mom=0.8, cycle_max_mom=0.95, decay_mom_rate=0.1)
STAIRS = dict(SCHED, cycle_first_stair_count=2, cycle_second_stair_count=3)


@pytest.fixture(autouse=True)
def _small_chunks():
    """64-element chunks (several per tensor) for every dtype, restored afterwards."""
    saved = {dt: tb.TritonBackend.launch_config(dt) for dt in tb._DTYPES}
    for dt in saved:
        tb.TritonBackend.configure(dt, block=32, iters=2, num_warps=1)
    yield
    for dt, cfg in saved.items():
        tb.TritonBackend.configure(dt, cfg.block, cfg.iters, cfg.num_warps)


def init_params(sizes=SIZES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]


def make_grads(steps, sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in sizes] for _ in range(steps)]


def run(cls, backend, init, grads, dtype, groups=None, **kw):
    """Optimizer ``cls`` on copies of ``init`` (as ``dtype``), stepped with ``grads``."""
    params = [torch.nn.Parameter(t.to(DEVICE, dtype).clone()) for t in init]
    if groups is not None:  # list of (indices, overrides)
        spec = [dict(params=[params[i] for i in idx], **over) for idx, over in groups]
    else:
        spec = params
    opt = cls(spec, backend=backend, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(DEVICE, dtype)
        opt.step()
    return params, opt


def state_tensors(opt, params):
    out = []
    for p in params:
        st = opt.state[p]
        out += [v for k, v in sorted(st.items()) if k != "step" and isinstance(v, torch.Tensor)]
    return out


def assert_ulps(actual, expected, ulps):
    """Each tensor within ``ulps`` units of its dtype (relative to the tensor's scale)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        if e.numel() == 0:
            continue
        eps = torch.finfo(e.dtype).eps
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        assert torch.equal(a64.isnan(), e64.isnan()), "NaN in one and not the other"
        tol = ulps * eps * (e64.abs() + e64.abs().max().clamp_min(1e-30) * 0.1)
        bad = (a64 - e64).abs() > tol
        assert not bad.any(), f"max diff {(a64 - e64).abs().max().item():.3g} at scale {e64.abs().max().item():.3g}"


def compare(cls, kw, steps=6, sizes=SIZES, dtype=torch.float32, groups=None, ulps=8, grads=None):
    init = init_params(sizes)
    grads = grads if grads is not None else make_grads(steps, sizes)
    a, oa = run(cls, "triton", init, grads, dtype, groups, **kw)
    b, ob = run(cls, "reference", init, grads, dtype, groups, **kw)
    assert torch.equal(oa.step_counter().cpu(), ob.step_counter().cpu())
    for pa, pb in zip(a, b):
        if pb in ob.state:
            assert torch.equal(oa.state[pa]["step"].cpu(), ob.state[pb]["step"].cpu())
        else:
            assert pa not in oa.state
    assert_ulps(a, b, ulps)
    assert_ulps(state_tensors(oa, a), state_tensors(ob, b), ulps)
    return a, b, oa, ob


# ---------------------------------------------------------------------------
# the schedule: bit-exact with the reference, every branch, hundreds of steps


@triton.jit
def _probe_schedule(rows, ks, lr_out, mom_out, n, BLOCK: tl.constexpr):
    """schedule_values of group 0 for a block of step counts at once."""
    offs = tl.arange(0, BLOCK)
    live = offs < n
    k = tl.load(ks + offs, mask=live, other=0)
    lr, mom = tk.schedule_values(rows, k)
    tl.store(lr_out + offs, lr, mask=live)
    tl.store(mom_out + offs, mom, mask=live)


def _row(schedule, momentum=0.9):
    row = schedule.row() + [0.0] * (ROW_WIDTH - len(schedule.row()))
    if not schedule.cycles_momentum:
        row[13] = momentum
    return torch.tensor([row], dtype=torch.float64, device=DEVICE)


SCHEDULES = {
    "continuous": OneCycle(**SCHED),
    "stairs": OneCycle(**STAIRS),
    "asymmetric-stairs": OneCycle(0.001, 0.3, cycle_first_step_size=7, cycle_second_step_size=13,
                                  cycle_first_stair_count=3, cycle_second_stair_count=5, decay_step_size=3,
                                  decay_lr_rate=0.01, decay_mom_rate=0.2),
    "no-second-phase": OneCycle(0.01, 0.1, cycle_first_step_size=5, cycle_second_step_size=0, decay_step_size=4,
                                decay_lr_rate=0.5),
    "no-decay": OneCycle(0.01, 0.1, cycle_first_step_size=4, decay_lr_rate=0.5),  # decay_step_size 0
    "constant-momentum": OneCycle(0.01, 0.1, cycle_first_step_size=4, cycle_momentum=False),
    "range-test": LRRangeTest(1e-4, lr_range_test_step_size=5, lr_range_test_step_rate=2.0),
    "range-test-staircase": LRRangeTest(1e-4, lr_range_test_step_size=5, lr_range_test_step_rate=2.0,
                                        lr_range_test_staircase=True),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_bit_exact(name):
    """Same float64 operations in the same order as reference.schedule_values."""
    table = _row(SCHEDULES[name])
    ks = torch.cat([torch.arange(300), torch.tensor([2000, 10**6, 2**40])]).to(DEVICE)
    lr = torch.empty(ks.numel(), dtype=torch.float64, device=DEVICE)
    mom = torch.empty_like(lr)
    # no FMA contraction, as the backend launches: IEEE float64 ops in the same order
    _probe_schedule[(1,)](table, ks, lr, mom, ks.numel(), BLOCK=512, enable_fp_fusion=False)
    for i, k in enumerate(ks.tolist()):
        want_lr, want_mom = schedule_values(table, torch.tensor(k, device=DEVICE))
        assert lr[i].item() == want_lr.item() and mom[i].item() == want_mom.item(), k


TORCH_SCHEDULES = {
    "torch-cos": TorchOneCycle(max_lr=0.1, total_steps=200),
    "torch-linear-three-phase": TorchOneCycle(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True,
                                              anneal_strategy="linear"),
    "torch-cos-three-phase": TorchOneCycle(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True),
    "torch-zero-last-phase": TorchOneCycle(max_lr=0.1, total_steps=13, pct_start=1.0, anneal_strategy="linear"),
    "torch-constant-momentum": TorchOneCycle(max_lr=0.1, total_steps=30, pct_start=0, cycle_momentum=False),
}


@pytest.mark.parametrize("name", sorted(TORCH_SCHEDULES))
def test_torch_onecycle_schedule_against_host(name):
    """TorchOneCycle rows against schedule.py's float64 host values (torch's
    OneCycleLR's, bit for bit): 'linear' bit-exact; 'cos' within 2 ulps,
    since tl.cos is numpy's cos in the interpreter and libdevice's __nv_cos
    compiled, neither of them the C library's that math.cos is."""
    sched = TORCH_SCHEDULES[name]
    table = _row(sched)
    T = sched.length
    ks = sorted(set(range(T + 3)) | {10**6, 2**40})
    ks_t = torch.tensor(ks, device=DEVICE)
    lr = torch.empty(len(ks), dtype=torch.float64, device=DEVICE)
    mom = torch.empty_like(lr)
    _probe_schedule[(1,)](table, ks_t, lr, mom, len(ks), BLOCK=256, enable_fp_fusion=False)
    for i, k in enumerate(ks):
        want = (sched.lr(k), sched.momentum(k) if sched.cycles_momentum else 0.9)
        for got, exp in zip((lr[i].item(), mom[i].item()), want):
            if sched.anneal_strategy == "linear":
                assert got == exp, (k, got, exp)
            else:
                assert abs(got - exp) <= 2 * math.ulp(exp), (k, got, exp)


@pytest.mark.parametrize("cls,kw", [
    (FusedOneCycleSGD, dict(momentum=0.9, nesterov=True)),
    (FusedOneCycleAdamW, dict(amsgrad=True)),
], ids=["sgd", "adamw"])
def test_torch_onecycle_through_optimizer(cls, kw):
    """A whole (short) TorchOneCycle schedule and two steps past its end."""
    sched = TorchOneCycle(max_lr=[0.1, 0.05], total_steps=6, pct_start=0.4, three_phase=True)
    compare(cls, dict(kw, schedule=sched), steps=9, sizes=(9, 65),
            groups=[([0], {}), ([1], {})])


# ---------------------------------------------------------------------------
# update math: every option, against the reference


SGD_OPTIONS = {
    "plain-momentum": dict(),
    "nesterov-wd": dict(nesterov=True, weight_decay=0.1),
    "dampening-maximize": dict(dampening=0.3, maximize=True, weight_decay=0.05),
    "no-buffer": dict(cycle_momentum=False, momentum=0.0),  # plain SGD: no buffer at all
    "constant-momentum": dict(cycle_momentum=False, momentum=0.7, nesterov=True),
}


@pytest.mark.parametrize("name", sorted(SGD_OPTIONS))
def test_sgd_options(name):
    a, b, oa, ob = compare(FusedOneCycleSGD, dict(STAIRS, **SGD_OPTIONS[name]), steps=8)
    if name == "no-buffer":
        assert all("momentum_buffer" not in oa.state[p] for p in a)


def test_sgd_zero_momentum_keeps_buffer():
    """A group whose momentum is 0 for now keeps its buffer untouched (reference semantics)."""
    sched = dict(SCHED, cycle_min_mom=0.0, cycle_max_mom=0.0)
    compare(FusedOneCycleSGD, sched, steps=4, sizes=(5, 70))



def _table_of(cls, **kw):
    """The device table of a one-group ``cls`` optimizer built with ``kw``:
    the row the ops read, made as the optimizer makes it."""
    opt = cls([torch.nn.Parameter(torch.zeros(1, device=DEVICE))], backend="reference", **kw)
    opt._refresh_tables()
    return opt._tables[DEVICE]


def test_sgd_momentum_row_without_a_buffer_steps_with_the_gradient():
    """The op with a momentum row but no buffer for a tensor: the kernel must go
    by the tensor (no buffer: step with the gradient, as the reference and the
    CUDA kernel do); it used to take the row's word and use the placeholder
    address, the parameter itself, as the buffer. (The optimizer no longer
    hands the op such a case, see the next test; the op still takes it.)"""
    tables = {m: _table_of(FusedOneCycleSGD, **dict(SCHED, cycle_momentum=False, momentum=m)) for m in (0.0, 0.9)}
    init = init_params((5, 70))
    grads = [g.float().to(DEVICE) for g in make_grads(1, (5, 70))[0]]
    results = {}
    for momentum, table in tables.items():
        params = [t.float().to(DEVICE).clone() for t in init]
        steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
        counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
        for _ in range(3):
            torch.ops.onecycle_fused_triton.step("sgd", params, grads, [], [], [], [0, 0], steps, [0, 0], table,
                                                 counter, None, None)
        results[momentum] = params
    for x, y in zip(results[0.9], results[0.0]):
        assert torch.equal(x, y)


def test_sgd_momentum_switched_on_later():
    """A group made without momentum (no buffer) whose momentum is set later:
    the optimizer makes the buffer then, and triton steps like the reference
    (and like torch.optim.SGD: tests/test_optim.py)."""
    sizes = (5, 70)
    init = init_params(sizes)
    grads = make_grads(4, sizes)
    out = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init]
        opt = FusedOneCycleSGD(params, backend=backend, **dict(SCHED, cycle_momentum=False, momentum=0.0))
        for k, step_grads in enumerate(grads):
            if k == 2:
                opt.param_groups[0]["momentum"] = 0.9
            for p, g in zip(params, step_grads):
                p.grad = g.float().to(DEVICE)
            opt.step()
        assert all("momentum_buffer" in opt.state[p] for p in params)
        out[backend] = params
    assert_ulps(out["triton"], out["reference"], ulps=4)


def test_amsgrad_row_without_max_state_leaves_param_alone():
    """The op with an amsgrad row but no max_exp_avg_sq for a tensor: that
    tensor steps without amsgrad (the reference's and the CUDA kernel's rule)
    instead of writing the max into the parameter's address."""
    tables = {a: _table_of(FusedOneCycleAdam, amsgrad=a, **SCHED) for a in (False, True)}
    init = init_params((5, 70))
    grads = [g.float().to(DEVICE) for g in make_grads(1, (5, 70))[0]]
    results = {}
    for amsgrad, table in tables.items():
        params = [t.float().to(DEVICE).clone() for t in init]
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
        counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
        for _ in range(3):
            torch.ops.onecycle_fused_triton.step("adam", params, grads, exp_avgs, exp_avg_sqs, [], [3, 3], steps,
                                                 [0, 0], table, counter, None, None)
        results[amsgrad] = params + exp_avgs + exp_avg_sqs
    for x, y in zip(results[True], results[False]):
        assert torch.equal(x, y)


ADAM_OPTIONS = {
    "adam": (FusedOneCycleAdam, dict()),
    "adam-wd-amsgrad": (FusedOneCycleAdam, dict(weight_decay=0.1, amsgrad=True)),
    "adam-maximize": (FusedOneCycleAdam, dict(maximize=True, betas=(0.9, 0.99), eps=1e-6)),
    "adamw": (FusedOneCycleAdamW, dict()),
    "adamw-amsgrad-maximize": (FusedOneCycleAdamW, dict(weight_decay=0.2, amsgrad=True, maximize=True)),
    # beta1 below 0.5: torch's lerp takes its other formula
    "adam-low-beta1": (FusedOneCycleAdam, dict(cycle_min_mom=0.2, cycle_max_mom=0.4)),
    "adamw-constant-beta1": (FusedOneCycleAdamW, dict(cycle_momentum=False, betas=(0.85, 0.98))),
}


@pytest.mark.parametrize("name", sorted(ADAM_OPTIONS))
def test_adam_options(name):
    cls, kw = ADAM_OPTIONS[name]
    compare(cls, dict(STAIRS, **kw), steps=8)


@pytest.mark.parametrize("cls,kw", [
    (FusedOneCycleSGD, dict(nesterov=True, weight_decay=0.01)),
    (FusedOneCycleAdam, dict(amsgrad=True, weight_decay=0.01)),
], ids=["sgd", "adam"])
def test_long_run(cls, kw):
    """120 steps (rising, falling and decay phases several times over), few programs."""
    sched = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=20, cycle_second_step_size=30,
                 cycle_first_stair_count=4, decay_step_size=5, decay_lr_rate=0.2)
    compare(cls, dict(sched, **kw), steps=120, sizes=(3, 40), ulps=16)


def test_range_test_schedule_through_optimizer():
    compare(FusedOneCycleAdam, dict(schedule=LRRangeTest(1e-3, lr_range_test_step_size=2, lr_range_test_staircase=True)),
            steps=5, sizes=(9, 65))


def test_many_tensors_and_groups():
    """50 tensors of odd sizes in three groups with different options: one launch for them all."""
    sizes = [(i * 7) % 23 for i in range(50)]
    groups = [(range(0, 20), dict(weight_decay=0.1)), (range(20, 35), dict(nesterov=True, cycle_max_lr=0.2)),
              (range(35, 50), dict(dampening=0.5))]
    compare(FusedOneCycleSGD, SCHED, steps=3, sizes=sizes, groups=groups)


def test_one_launch_per_dtype_bucket(monkeypatch):
    """Every tensor of a (device, dtype) bucket in one launch, whatever the
    number of tensors and groups; one launch per dtype with mixed dtypes, the
    counter advancing once; a step with no grad at all is the one-program
    counter kernel."""
    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for algo, kernel in list(tb._KERNELS.items()):
        monkeypatch.setitem(tb._KERNELS, algo, Counting(algo, kernel))
    monkeypatch.setattr(tk, "advance_kernel", Counting("advance", tk.advance_kernel))
    sizes = [(i * 7) % 23 for i in range(60)]  # several chunks, empty tensors too
    params = [torch.nn.Parameter(t.to(DEVICE)) for t in init_params(sizes)]
    opt = FusedOneCycleSGD([dict(params=params[:30], weight_decay=0.1), dict(params=params[30:], nesterov=True)],
                           backend="triton", **SCHED)
    for k in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        launches.clear()
        opt.step()
        assert launches == ["sgd"], k
    mixed = [torch.nn.Parameter(t.to(DEVICE, dt)) for t, dt in
             zip(init_params((9, 70, 5, 3)), (torch.float32, torch.bfloat16, torch.float16, torch.float32))]
    opt = FusedOneCycleAdam(mixed, backend="triton", **SCHED)
    for p in mixed:
        p.grad = torch.randn_like(p)
    launches.clear()
    opt.step()
    assert sorted(launches) == ["adam"] * 3 and int(opt.step_counter()) == 1
    opt.zero_grad()
    launches.clear()
    opt.step()
    assert launches == ["advance"] and int(opt.step_counter()) == 2


def test_params_without_grads_and_late_params():
    """Tensors without a grad on some steps keep their own step counts (torch semantics)."""
    sizes = (5, 33, 8)
    grads = make_grads(6, sizes)
    for k, step_grads in enumerate(grads):
        if k % 2 == 1:
            step_grads[1] = None
        if k < 3:
            step_grads[2] = None
    a, b, oa, ob = compare(FusedOneCycleAdam, dict(SCHED, amsgrad=True), sizes=sizes, grads=grads)
    assert [int(oa.state[p]["step"]) for p in a] == [6, 3, 3]


def test_no_grads_still_advance_counter():
    p = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    opt = FusedOneCycleSGD([p], backend="triton", **SCHED)
    opt.step()
    opt.step()
    assert int(opt.step_counter()) == 2 and len(opt.state) == 0


# ---------------------------------------------------------------------------
# dtypes: low precision no further from float64 than the reference at the same dtype


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(nesterov=True, weight_decay=0.05)),
                                    (FusedOneCycleAdamW, dict(amsgrad=True))], ids=["sgd", "adamw"])
def test_low_precision(dtype, cls, kw):
    sizes = (7, 65)
    init = init_params(sizes)
    grads = make_grads(10, sizes)
    kw = dict(STAIRS, **kw)
    ours, _ = run(cls, "triton", init, grads, dtype, **kw)
    ref, _ = run(cls, "reference", init, grads, dtype, **kw)
    exact, _ = run(cls, "reference", init, grads, torch.float64, **kw)
    eps = torch.finfo(dtype).eps
    for o, r, e in zip(ours, ref, exact):
        err_ours = (o.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_ours <= 2 * err_ref + eps * e.abs().max().item(), (err_ours, err_ref)
    assert_ulps(ours, ref, ulps=4)


@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(weight_decay=0.05, dampening=0.1)),
                                    (FusedOneCycleAdam, dict(amsgrad=True, weight_decay=0.01, maximize=True)),
                                    (FusedOneCycleAdamW, dict(weight_decay=0.1))], ids=["sgd", "adam", "adamw"])
def test_float64_computes_in_float64(cls, kw):
    """float64 parameters step in float64 (as the reference and torch.optim
    do), with IEEE division and square root: SGD bit for bit with the
    reference; Adam bit for bit with the cpu op (whose element sqrt is
    correctly rounded, as here: the reference's, torch's CPU sqrt, is not,
    so it is an ulp off at most), also over 40 steps with beta2 = 0.9999,
    where ``1 - beta2**t`` cancels most: the bias corrections' powers must
    be pow's value (plain squaring was ~400 ulps off there). The float32
    math these kernels use for the other dtypes would be ~1e-7 off."""
    if cls is FusedOneCycleSGD:
        compare(cls, dict(STAIRS, **kw), dtype=torch.float64, ulps=0)
        return
    compare(cls, dict(STAIRS, **kw), dtype=torch.float64, ulps=1)
    if DEVICE.type != "cpu" or not ops.cpu_library_loaded():
        # (compiled on a GPU the kernels step CUDA tensors; the comparison above stands)
        pytest.skip("the cpu op needs the interpreter's CPU tensors and onecycle_fused._C")
    sizes = (7, 65)
    init, grads = init_params(sizes), make_grads(40, sizes)
    kw = dict(STAIRS, betas=(0.9, 0.9999), cycle_max_lr=1.0, **kw)
    ours, opt = run(cls, "triton", init, grads, torch.float64, **kw)
    cpu, cpu_opt = run(cls, "cpu", init, grads, torch.float64, **kw)
    assert all(torch.equal(a.detach().cpu(), b.detach()) for a, b in zip(ours, cpu))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(state_tensors(opt, ours), state_tensors(cpu_opt, cpu)))


@triton.jit
def _probe_narrow(x_ptr, out_ptr, n, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0)
    tl.store(out_ptr + offs, tk._narrow(x, out_ptr.dtype.element_ty, ROUND_BF16), mask=live)


def test_bf16_rounding_matches_torch():
    """float32 -> bfloat16 rounds to nearest even, ties and specials included, like torch."""
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, -3.4e38, 1e-40, 0.0, -0.0])
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = torch.cat([ties, specials, torch.randn(500) * 10]).to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    _probe_narrow[(1,)](x, out, x.numel(), ROUND_BF16=INTERPRET, BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])


def test_mixed_dtypes_one_counter():
    """fp32, bf16, fp16 and fp64 params in one optimizer: four launches, the counter advances once."""
    sizes = (9, 40, 3, 70)
    init = init_params(sizes)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    results = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.to(DEVICE, dt)) for t, dt in zip(init, dtypes)]
        opt = FusedOneCycleAdam(params, backend=backend, **SCHED)
        for step_grads in make_grads(4, sizes):
            for p, g in zip(params, step_grads):
                p.grad = g.to(DEVICE, p.dtype)
            opt.step()
        assert int(opt.step_counter()) == 4
        results[backend] = params
    assert_ulps(results["triton"], results["reference"], ulps=4)


@pytest.mark.parametrize("complex_dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(nesterov=True, weight_decay=0.05)),
                                    (FusedOneCycleAdamW, dict(amsgrad=True))], ids=["sgd", "adamw"])
def test_complex_params_step_as_real_views(cls, kw, complex_dtype):
    """Complex parameters (with a real one beside them) reach the kernels as
    their real views (complex128's as float64), as in torch.optim; the
    reference was checked against torch.optim on complex parameters
    (test_optim.py)."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.complex128) for s in (7, 33)] + [torch.randn(5, generator=g)]
    results = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.to(DEVICE, complex_dtype if t.is_complex() else complex_dtype.to_real(),
                                          copy=True)) for t in init]
        opt = cls(params, backend=backend, **SCHED, **kw)
        gg = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gg, dtype=torch.complex128 if p.is_complex() else
                                     torch.float64).to(DEVICE, p.dtype)
            opt.step()
        results[backend] = [torch.view_as_real(p) if p.is_complex() else p for p in params]
    assert not torch.equal(results["triton"][0].cpu(), torch.view_as_real(init[0]).to(complex_dtype.to_real()))
    assert_ulps(results["triton"], results["reference"], ulps=8)


# ---------------------------------------------------------------------------
# GradScaler: grads divided by the scale; a found inf changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdam], ids=["sgd", "adam"])
def test_grad_scale_and_skip(cls, dtype):
    sizes = (7, 70)
    init = init_params(sizes)
    grads = make_grads(5, sizes)
    out = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.to(DEVICE, dtype).clone()) for t in init]
        opt = cls(params, backend=backend, **SCHED)
        snapshots = []
        for k, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = (g * 1024).to(DEVICE, dtype)
            opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
            opt.found_inf = torch.tensor(1.0 if k in (0, 3) else 0.0, device=DEVICE)
            before = [t.clone() for t in params + state_tensors(opt, params)]
            opt.step()
            if k in (0, 3):  # skipped: nothing moved, no step counted
                after = params + state_tensors(opt, params)
                assert all(torch.equal(x, y) for x, y in zip(before, after))
            snapshots.append(int(opt.step_counter()))
        assert snapshots == [0, 1, 2, 2, 3]
        assert [int(opt.state[p]["step"]) for p in params] == [3, 3]
        out[backend] = params + state_tensors(opt, params)
    assert_ulps(out["triton"], out["reference"], ulps=8)


# the skipped step computes with the inf grad (and throws it away): numpy says so
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_with_torch_grad_scaler():
    """The real GradScaler: an inf gradient skips the step on both backends alike."""
    if not INTERPRET:
        pytest.skip("covered on the GPU by test_triton_gpu")
    sizes = (6, 33)
    init = init_params(sizes)
    out = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = FusedOneCycleAdamW(params, backend=backend, **SCHED)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
        for k, step_grads in enumerate(make_grads(5, sizes)):
            if k == 2:
                step_grads[1][3] = float("inf")
            opt.zero_grad()
            loss = sum((p * g.float()).sum() for p, g in zip(params, step_grads))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert int(opt.step_counter()) == 4
        out[backend] = params + state_tensors(opt, params)
    assert_ulps(out["triton"], out["reference"], ulps=8)


# ---------------------------------------------------------------------------
# the launch table: built once, reused, rebuilt when a storage moves


@pytest.fixture(params=["C", "python"])
def launch_key(request, monkeypatch):
    """The launch tables' cache key as ``_C.launch_key`` takes it, and as
    Python takes it when ``_C`` did not load."""
    if request.param == "python":
        monkeypatch.setattr(tb, "_launch_key", None)
    else:
        fn = tb._compiled_launch_key()
        if fn is None:
            pytest.skip("onecycle_fused._C did not load")
        monkeypatch.setattr(tb, "_launch_key", fn)
    tb._launcher.clear_cache()
    yield request.param
    tb._launcher.clear_cache()


def test_compiled_launch_key_tells_tensors_apart():
    """_C.launch_key: equal bytes for the same tensors in the same places,
    different for any change of address, dtype, device, size, stride,
    negative bit, None, or of where one list ends; None (the Python key then) for what is not a
    tensor or None, or has no address to read."""
    key = tb._compiled_launch_key()
    if key is None:
        pytest.skip("onecycle_fused._C did not load")
    a = torch.zeros(4, 6)
    b = torch.zeros(4, 6)
    base = key([a, b], [None, a])
    assert isinstance(base, bytes) and key([a, b], (None, a)) == base
    variants = {
        "address": key([a, a], [None, a]),
        "dtype": key([a, b.view(torch.int32)], [None, a]),
        "device": key([a, b.to("meta")], [None, a]),
        "size": key([a, b.view(6, 4)], [None, a]),
        "stride": key([a, b.t()], [None, a]),
        "offset": key([a, b[1:]], [None, a]),
        "negative bit": key([a, torch._neg_view(b)], [None, a]),
        "none": key([a, b], [a, a]),
        "list ends": key([a, b, None], [a]),
        "0-d": key([a, b], [None, a[0, 0]]),
    }
    for what, v in variants.items():
        assert isinstance(v, bytes) and v != base, what
    assert len(set(variants.values())) == len(variants)
    assert key([a, 1], [None]) is None and key("ab") is None
    assert key([torch.zeros(3, 3).to_sparse()]) is None


def test_launch_table_cache(launch_key):
    sizes = (5, 70)
    init = init_params(sizes)
    grads = make_grads(4, sizes)
    params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init]
    opt = FusedOneCycleSGD(params, backend="triton", **SCHED)
    launcher = tb._launcher
    launcher.clear_cache()
    builds = []
    original = launcher._build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    launcher._build = counting_build
    try:
        holders = [torch.zeros_like(p) for p in params]
        for k in range(3):  # grads written into the same storages: one build
            for p, h, g in zip(params, holders, grads[k]):
                h.copy_(g)
                p.grad = h
            opt.step()
        assert len(builds) == 1
        for p, g in zip(params, grads[3]):  # new grad storages: rebuilt
            p.grad = g.float().to(DEVICE).clone()
        opt.step()
        assert len(builds) == 2
    finally:
        launcher._build = original
    # and the math still matches the reference
    ref_params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init]
    ref = FusedOneCycleSGD(ref_params, backend="reference", **SCHED)
    for step_grads in grads:
        for p, g in zip(ref_params, step_grads):
            p.grad = g.float().to(DEVICE)
        ref.step()
    assert_ulps(params, ref_params, ulps=4)


def test_launch_table_used_in_a_capture_survives_eviction(monkeypatch):
    """A launch table hit while a CUDA graph is being captured is pinned: the
    graph replays with its raw address, so the 4-entry LRU (shared by every
    optimizer of the bucket's algorithm, dtype and device) must not free it
    when other parameter sets come and go. Capture is simulated here (the
    interpreter has no CUDA); test_triton_gpu.py replays a real graph."""
    launcher = tb._launcher
    launcher.clear_cache()
    sizes = (5, 70)
    params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init_params(sizes)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = FusedOneCycleSGD(params, backend="triton", **SCHED)
    opt.step()  # warm-up: the table is built
    capturing = [True]
    monkeypatch.setattr(tb, "_capturing", lambda device: capturing[0])
    opt.step()  # "captured": a cache hit
    capturing[0] = False
    (key, captured), = launcher._cache[("sgd", torch.float32, DEVICE)].items()
    others = []
    for i in range(tb._CACHE_ENTRIES + 2):  # other optimizers push it out of the LRU
        ps = [torch.nn.Parameter(torch.zeros(s, device=DEVICE)) for s in (3 + i, 9)]
        for p in ps:
            p.grad = torch.ones_like(p)
        o = FusedOneCycleSGD(ps, backend="triton", **SCHED)
        o.step()
        others.append((ps, o))
    assert key not in launcher._cache[("sgd", torch.float32, DEVICE)]
    launcher.clear_cache()
    assert any(launch is captured for launch in launcher._pinned.values())


def _simulated_uploads(monkeypatch):
    """Launch tables built as on CUDA (a separate table filled by a copy from
    "pinned" host memory, one stream) on the interpreter's CPU tensors, and a
    switch that says "capturing". On CPU the copies run at once; on a GPU a captured copy
    runs at each replay (test_triton_gpu.py replays real graphs)."""
    monkeypatch.setattr(tb, "_uploaded", lambda device: True)
    monkeypatch.setattr(tb, "_pinned_empty", lambda numel: torch.empty(numel, dtype=torch.int64))
    monkeypatch.setattr(tb, "_stream_id", lambda device: 0)  # one stream
    capturing = [False]
    monkeypatch.setattr(tb, "_capturing", lambda device: capturing[0])
    return capturing


def test_grads_allocated_in_a_capture_get_a_table_from_the_warm_up_spare(monkeypatch):
    """README (CUDA graphs): grads that a captured backward allocates (new
    addresses) need a new launch table inside the capture. Its host image goes
    into the spare pinned buffer that the warm-up step's table left (pinned
    memory is not allocated while capturing), which the graph's copy reads at
    every replay: so that buffer moves to the new table for good, the table is
    kept past the LRU, and an eager hit before any replay fills it. That hit
    also gives the table a spare, for a later capture."""
    capturing = _simulated_uploads(monkeypatch)
    launcher = tb._launcher
    launcher.clear_cache()
    sizes = (5, 70, 300)
    init, grads = init_params(sizes), make_grads(4, sizes)
    kw = dict(SCHED, momentum=0.9, weight_decay=0.01)
    # every grad kept alive: new ones must get new addresses (a freed one's
    # address, reused, would find that grad's table: a valid hit, but not the
    # new table this test follows; it failed so about 1 run in 30)
    kept = []
    params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init]
    opt = FusedOneCycleSGD(params, backend="triton", **kw)
    for p, g in zip(params, grads[0]):
        p.grad = g.float().to(DEVICE)
    opt.step()  # warm-up
    bucket = launcher._cache[("sgd", torch.float32, DEVICE)]
    (warm,) = bucket.values()
    assert warm.spare is not None and warm.spare.numel() == warm.table.numel() and warm.written
    spare_ptr = warm.spare.data_ptr()

    capturing[0] = True
    kept += [p.grad for p in params]
    for p, g in zip(params, grads[1]):
        p.grad = g.float().to(DEVICE)  # "allocated in the capture": new addresses
    opt.step()
    capturing[0] = False
    captured = list(bucket.values())[-1]
    assert captured is not warm and warm.spare is None  # the spare moved to the captured table
    assert captured.staged.data_ptr() == spare_ptr and not captured.written
    assert captured.table.data_ptr() != captured.staged.data_ptr()
    assert any(launch is captured for launch in launcher._pinned.values())

    for p, g in zip(params, grads[2]):
        p.grad.copy_(g.float())  # the capture's grads, stepped eagerly: a hit fills the table
    opt.step()
    assert captured.written and torch.equal(captured.table, captured.staged)
    # that eager use gave the captured table a spare of its own: a second
    # capture (new grads again, as in a new graph) finds one
    assert captured.spare is not None and captured.spare.numel() == captured.table.numel()
    capturing[0] = True
    kept += [p.grad for p in params]
    for p, g in zip(params, grads[3]):
        p.grad = g.float().to(DEVICE)
    opt.step()
    capturing[0] = False
    assert captured.spare is None and not list(bucket.values())[-1].written
    ref, _ = run(FusedOneCycleSGD, "reference", init, grads, torch.float32, **kw)
    assert_ulps(params, ref, ulps=4)


def test_capture_without_a_spare_refuses_before_stepping(monkeypatch):
    """A new launch table while capturing with no same-sized spare (no eager
    warm-up table in the bucket, or its spare already taken): RuntimeError,
    and no parameter, state or step count has moved."""
    capturing = _simulated_uploads(monkeypatch)
    launcher = tb._launcher
    sizes = (5, 70)
    params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init_params(sizes)]
    opt = FusedOneCycleAdam(params, backend="triton", **SCHED)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # state exists: only the table is missing below
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for spares_left in (False, True):
        launcher.clear_cache()
        if spares_left:  # a bucket whose only spare has another size
            other = [torch.nn.Parameter(torch.zeros(9, device=DEVICE))]
            other[0].grad = torch.ones_like(other[0])
            FusedOneCycleAdam(other, backend="triton", **SCHED).step()
        capturing[0] = True
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="no pinned buffer"):
            opt.step()
        capturing[0] = False
        assert int(opt.step_counter()) == 1
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        for p, saved in zip(params, state):
            assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


def test_launch_table_read_on_another_stream_is_recorded_there(monkeypatch):
    """The caching allocator ties a table to the stream that allocated it
    (the step that built it). A hit from another stream says so once
    (record_stream), so that a table evicted while that stream's kernels
    still read it is not handed out again. A captured hit records nothing:
    the table is pinned for good. Streams and the allocator are simulated."""
    capturing = _simulated_uploads(monkeypatch)
    current, recorded = [1], []
    monkeypatch.setattr(tb, "_stream_id", lambda device: current[0])
    monkeypatch.setattr(tb, "_record_stream", lambda table, device: recorded.append((table.data_ptr(), current[0])))
    launcher = tb._launcher
    launcher.clear_cache()
    params = [torch.nn.Parameter(t.to(DEVICE).clone()) for t in init_params((5, 70))]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = FusedOneCycleSGD(params, backend="triton", **SCHED)
    opt.step()  # built on stream 1
    (launch,) = launcher._cache[("sgd", torch.float32, DEVICE)].values()
    opt.step()
    assert recorded == []
    current[0] = 2
    opt.step()
    opt.step()
    assert recorded == [(launch.table.data_ptr(), 2)]
    current[0] = 1
    opt.step()
    current[0], capturing[0] = 3, True
    opt.step()
    capturing[0] = False
    assert recorded == [(launch.table.data_ptr(), 2)]
    assert any(x is launch for x in launcher._pinned.values())


def test_launch_config_chunking():
    """Other block / iteration splits give the same result (chunk boundaries move)."""
    sizes = (1, 100, 257)
    init = init_params(sizes)
    grads = make_grads(3, sizes)
    tb.TritonBackend.configure(torch.float32, block=16, iters=1, num_warps=1)
    a, _ = run(FusedOneCycleAdam, "triton", init, grads, torch.float32, **SCHED)
    tb.TritonBackend.configure(torch.float32, block=128, iters=4, num_warps=2)
    b, _ = run(FusedOneCycleAdam, "triton", init, grads, torch.float32, **SCHED)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# backend plumbing


def test_backend_selection_and_errors():
    backend = get_backend("triton")
    assert backend is not None and backend.available()
    assert all(backend.supports(DEVICE, dt) for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    assert not backend.supports(DEVICE, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="triton"):
        FusedOneCycleSGD([torch.nn.Parameter(torch.ones(2, dtype=torch.float8_e4m3fn, device=DEVICE))],
                         backend="triton", **SCHED)
    with pytest.raises(ValueError, match="power of two"):
        tb.TritonBackend.configure(torch.float32, block=48, iters=1, num_warps=1)


def test_noncontiguous_dense_params():
    """A channels-last (dense, not contiguous) parameter is updated element for element."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = {}
    for backend in ("triton", "reference"):
        p = torch.nn.Parameter(x.float().to(DEVICE).clone(memory_format=torch.channels_last))
        opt = FusedOneCycleSGD([p], backend=backend, **SCHED)
        for k in range(3):
            # position-dependent grads, so a layout mix-up would show
            g = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).sin() * (k + 1)
            p.grad = g.to(DEVICE).contiguous(memory_format=torch.channels_last)
            opt.step()
        out[backend] = p
    assert out["triton"].is_contiguous(memory_format=torch.channels_last)
    assert_ulps([out["triton"]], [out["reference"]], ulps=4)


def test_dtensor_params_use_their_local_shards(tmp_path):
    """FSDP2 parameters are DTensors: the kernels update their local shards in place."""
    dist = pytest.importorskip("torch.distributed")
    if not INTERPRET or not dist.is_available():
        pytest.skip("single-process gloo mesh on CPU tensors")
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sizes = (6, 70)
        init = init_params(sizes)
        grads = make_grads(3, sizes)
        out = {}
        for backend in ("triton", "reference"):
            params = [torch.nn.Parameter(distribute_tensor(t.float(), mesh, [Shard(0)])) for t in init]
            opt = FusedOneCycleAdamW(params, backend=backend, amsgrad=True, **SCHED)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = distribute_tensor(g.float(), mesh, [Shard(0)])
                opt.step()
            out[backend] = [p.full_tensor() for p in params]
        assert_ulps(out["triton"], out["reference"], ulps=8)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("relayout", ["transposed", "expanded"])
def test_grad_at_a_cached_address_in_another_layout(relayout, launch_key):
    """A grad that comes back at the address of a cached launch table but in
    another layout (``p.grad = p.grad.t()``; an expanded grad over one
    element) is not a cache hit: the kernels would pair its elements with the
    parameter's by memory order, or read past its storage."""
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    g = torch.arange(36, dtype=torch.float32).reshape(6, 6).cos()
    out = {}
    for backend in ("triton", "reference"):
        p = torch.nn.Parameter(x.to(DEVICE).clone())
        opt = FusedOneCycleAdamW([p], backend=backend, **SCHED)
        for _ in range(2):
            p.grad = g.to(DEVICE).clone()
            opt.step()
        p.grad = p.grad.t() if relayout == "transposed" else p.grad[:1, :1].expand(6, 6)
        opt.step()
        out[backend] = [p.detach().clone()] + state_tensors(opt, [p])
    assert_ulps(out["triton"], out["reference"], ulps=4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["behind", "transposed"])
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(momentum=0.9)), (FusedOneCycleAdamW, {})])
def test_grad_sharing_part_of_its_parameters_memory_steps_as_its_clone(cls, kw, kind, compiled):
    """A grad that is a view of its parameter's storage, one element behind
    it (element j's grad is element j-1, which the previous block writes) or
    transposed: read from a copy, so the step equals the step with a clone of
    the grad (torch.optim's result: tests/test_optim.py), eager and compiled
    (traced, conform sees no addresses: the op's eager body copies it). It
    was stepped in place, reading elements other blocks had written."""
    if compiled and not INTERPRET:
        pytest.skip("inductor on the GPU: tests/test_triton_gpu.py")
    n = 12  # 144 elements: three 64-element chunks
    out = []
    for shared in (True, False):
        gen = torch.Generator().manual_seed(6)
        p = torch.nn.Parameter(torch.zeros(n, n, device=DEVICE))
        opt = cls([p], backend="triton", **SCHED, **kw)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(3):
            base = torch.randn(n * n + 1, generator=gen).to(DEVICE)
            # (made with set_, not as views: aot_autograd refuses aliased
            # inputs of which only some have a ._base)
            data, grad = (torch.empty(0, device=DEVICE).set_(base.untyped_storage(), offset, (n, n), strides)
                          for offset, strides in [(1, (n, 1)), (1, (1, n)) if kind == "transposed" else (0, (n, 1))])
            p.data, p.grad = (data, grad) if shared else (data.clone(), grad.clone())
            step()
            out.append(p.detach().clone())
    half = len(out) // 2
    for a, b in zip(out[:half], out[half:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("first_grad", ["plain", "transposed"])
@pytest.mark.parametrize("other", ["params", "grads"])
@pytest.mark.parametrize("state", ["shifted", "transposed"])
def test_state_sharing_part_of_the_params_or_grads_memory_is_refused(state, other, first_grad):
    """A state that partially overlaps its parameter or grad: RuntimeError
    naming both (torch.optim refuses it too), nothing stepped. Also when
    the first parameter's grad needs a copy in its layout and the state is
    transposed: the table build stopped at the first parameter, and
    conform's copy of the state hid the overlap from the build after it
    (the state was stepped, and its copy written back over the parameter)."""
    p = torch.nn.Parameter(torch.randn(3, 3, device=DEVICE))
    q = torch.nn.Parameter(torch.randn(8, 8, device=DEVICE))
    opt = FusedOneCycleAdamW([p, q], backend="triton", **SCHED)
    for _ in range(2):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    p.grad = torch.randn_like(p).t() if first_grad == "transposed" else torch.randn_like(p)
    if state == "shifted":
        base = torch.randn(65, device=DEVICE)
        if other == "params":
            q.data = base[:64].view(8, 8)
        else:
            q.grad = base[:64].view(8, 8)
        opt.state[q]["exp_avg"] = base[1:].view(8, 8)
    else:
        q.grad = torch.randn_like(q)
        opt.state[q]["exp_avg"] = (q.detach() if other == "params" else q.grad).t()
    before = [p.detach().clone(), q.detach().clone(), opt.state[p]["exp_avg"].clone(), int(opt.step_counter())]
    with pytest.raises(RuntimeError, match=rf"{other}\[1\] and exp_avgs\[1\] partially overlap in memory"):
        opt.step()
    after = [p.detach().clone(), q.detach().clone(), opt.state[p]["exp_avg"].clone(), int(opt.step_counter())]
    assert all(torch.equal(x, y) for x, y in zip(before[:3], after[:3])) and before[3] == after[3]


@pytest.mark.parametrize("what", ["param", "state"])
def test_a_written_tensor_whose_elements_share_memory_is_refused(what):
    """A parameter or state with a stride-0 dimension (expand()) cannot be
    written element by element: RuntimeError naming it, as torch.optim's
    in-place ops refuse it, and nothing stepped. The step used to launch,
    advance the counter, and fail writing conform's copy back."""
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    q = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    opt = FusedOneCycleSGD([p, q], backend="triton", momentum=0.9, **SCHED)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    if what == "param":
        q.data = q.detach()[:1].expand(4)
    else:
        opt.state[q]["momentum_buffer"] = opt.state[q]["momentum_buffer"][:1].expand(4)
    before = [p.detach().clone(), q.detach().clone(), opt.state[p]["momentum_buffer"].clone(), int(opt.step_counter())]
    name = "params" if what == "param" else "momentum_buffers"
    with pytest.raises(RuntimeError, match=rf"{name}\[1\] has elements that share one memory location"):
        opt.step()
    after = [p.detach().clone(), q.detach().clone(), opt.state[p]["momentum_buffer"].clone(), int(opt.step_counter())]
    assert all(torch.equal(x, y) for x, y in zip(before[:3], after[:3])) and before[3] == after[3] == 1


def test_state_at_a_cached_address_in_another_dtype(launch_key):
    """A state replaced at its own address by a view of itself in another
    dtype of the same size keeps strides and sizes: the cache key has the
    dtypes too, so the step refuses it (ValueError, nothing moved) as the
    other backends do, instead of stepping its bytes as the parameter's dtype."""
    p = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16))
    opt = FusedOneCycleAdamW([p], backend="triton", **SCHED)
    p.grad = torch.ones_like(p)  # kept at its address: the step's launch table is cached
    for _ in range(2):
        opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].view(torch.float16)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="float16"):
        opt.step()
    assert torch.equal(p.detach(), before) and int(opt.step_counter()) == 2


@pytest.mark.parametrize("relayout", ["transposed", "slice"])
def test_state_at_a_cached_address_in_another_layout(relayout, launch_key):
    """A state tensor replaced at its own address by one of another layout
    (``state['exp_avg'].t()``; a slice of it) is not a cache hit either: the
    kernels would walk it in the parameter's memory order, or over the
    parameter's numel past the state's end; every backend raises ValueError there."""
    shape = (6, 6) if relayout == "transposed" else (36,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    g = torch.arange(36, dtype=torch.float32).reshape(shape).cos().to(DEVICE)
    out = {}
    for backend in ("triton", "reference"):
        p = torch.nn.Parameter(x.to(DEVICE).clone())
        opt = FusedOneCycleAdamW([p], backend=backend, **SCHED)
        p.grad = g  # kept at its address: the step's launch table is cached
        for _ in range(2):
            opt.step()
        st = opt.state[p]
        if relayout == "transposed":
            st["exp_avg"] = st["exp_avg"].t()
            opt.step()
            out[backend] = [p.detach().clone()] + state_tensors(opt, [p])
        else:
            st["exp_avg_sq"] = st["exp_avg_sq"][:18]
            before = p.detach().clone()
            with pytest.raises(ValueError):
                opt.step()
            assert torch.equal(p.detach(), before)
    if relayout == "transposed":
        assert_ulps(out["triton"], out["reference"], ulps=4)


@pytest.mark.parametrize("bad_state", [torch.zeros(7), torch.zeros(2, 7)], ids=["broadcastable", "other"])
def test_state_of_another_shape_next_to_a_relaid_grad_changes_nothing(bad_state):
    """A state of another shape than its parameter is a ValueError with
    nothing stepped, also when the step goes through copies for a grad laid
    out unlike its parameter: the state used to be copied into the
    parameter's shape too (broadcast, or a RuntimeError), the kernels ran, and
    writing the copy back failed after the parameter and counter had moved."""
    p = torch.nn.Parameter(torch.randn(3, 7, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    opt = FusedOneCycleAdamW([p], backend="triton", **SCHED)
    p.grad = torch.ones(3, 7, device=DEVICE)
    opt.step()
    opt.state[p]["exp_avg"] = bad_state.to(DEVICE)
    p.grad = torch.ones(7, 3, device=DEVICE).t()  # the parameter's shape, other strides
    before = [p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()]
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg_sq"], before[1])
    assert int(opt.step_counter()) == 1 and int(opt.state[p]["step"]) == 1


def _transposed(x):
    return torch.nn.Parameter(x.t())  # dense, not contiguous


def _strided_view(x):
    big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    big[:, ::2] = x
    return torch.nn.Parameter(big[:, ::2])  # not dense: every other element of its storage


@pytest.mark.parametrize("make_param", [torch.nn.Parameter, _transposed, _strided_view],
                         ids=["contiguous", "transposed", "strided_view"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(nesterov=True)), (FusedOneCycleAdamW, dict(amsgrad=True))],
                         ids=["sgd", "adamw"])
def test_any_param_and_grad_layout_is_stepped_correctly(cls, kw, make_param, grad_layout):
    """A parameter that is a transposed or strided view, and a grad with other
    strides than its parameter, step like the reference (and the cpu op).
    They used to raise ValueError: the kernels walk a grad in its parameter's
    memory order and cannot walk a non-dense tensor; such tensors now go
    through copies in a layout the kernels can walk."""
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("triton", "reference"):
        p = make_param(x.to(DEVICE).clone())
        opt = cls([p], backend=backend, **SCHED, **kw)
        for k in range(4):
            g = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).sin() * (k + 1)
            p.grad = g.to(DEVICE) if grad_layout == "contiguous" else g.t().contiguous().t().to(DEVICE)
            opt.step()
        out[backend] = (p.detach().clone(), [t.clone() for t in state_tensors(opt, [p])])
    assert_ulps([out["triton"][0]], [out["reference"][0]], ulps=4)
    assert_ulps(out["triton"][1], out["reference"][1], ulps=4)


def test_custom_op_registered():
    """The step is a custom op with declared mutations and a fake kernel (torch.compile sees it)."""
    op = torch.ops.onecycle_fused_triton.step.default
    schema = str(op._schema)
    mutated = {arg.name for arg in op._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutated == {"params", "state1", "state2", "state3", "steps", "counter"}, schema
    # through the dispatcher, same result as the direct call
    sizes = (5, 70)
    init = init_params(sizes)
    grads = make_grads(2, sizes)[0]

    def go(use_op):
        params = [t.to(DEVICE).clone() for t in init]
        bufs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params]
        opt = FusedOneCycleSGD([torch.nn.Parameter(torch.zeros(1, device=DEVICE))], backend="reference", **SCHED)
        opt._refresh_tables()
        table = opt._tables[DEVICE]
        counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
        gs = [g.float().to(DEVICE) for g in grads]
        if use_op:  # only present states travel through the op, flagged per parameter
            torch.ops.onecycle_fused_triton.step("sgd", params, gs, bufs, [], [], [1, 1], steps, [0, 0], table,
                                                 counter, None, None)
        else:
            tb._launcher.run("sgd", params, gs, bufs, [None, None], [None, None], steps, [0, 0], table, counter,
                             None, None)
        return params + bufs + steps + [counter]

    assert all(torch.equal(x, y) for x, y in zip(go(True), go(False)))


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_opcheck(algo):
    """torch.library.opcheck: schema (declared mutations are the real ones),
    fake kernel, autograd registration and AOT dispatch."""
    cls = FusedOneCycleSGD if algo == "sgd" else FusedOneCycleAdam  # the table row holds its hyper-parameters
    ref = cls([torch.nn.Parameter(torch.zeros(1, device=DEVICE))], backend="reference", **SCHED)
    ref._refresh_tables()
    table = ref._tables[DEVICE]
    sizes = (5, 70)
    params = [torch.randn(s, device=DEVICE) for s in sizes]
    grads = [torch.randn(s, device=DEVICE) for s in sizes]
    zeros = lambda: [torch.zeros(s, device=DEVICE) for s in sizes]  # noqa: E731
    if algo == "sgd":
        states, present = (zeros(), [], []), [1, 1]
    else:  # amsgrad state on the second parameter only
        states, present = (zeros(), zeros(), zeros()[1:]), [3, 7]
    steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in sizes]
    counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
    args = (algo, params, grads, *states, present, steps, [0, 0], table, counter,
            torch.tensor(2.0, device=DEVICE), torch.tensor(0.0, device=DEVICE))
    torch.library.opcheck(torch.ops.onecycle_fused_triton.step.default, args)


def test_state_packing_round_trip():
    a, b, c = torch.ones(1), torch.ones(2), torch.ones(3)
    states = ([a, None, b], [None, None, c], [None, None, None])
    present, packed = tb.pack_states(*states)
    assert present == [1, 0, 3] and packed == [[a, b], [c], []]
    assert tb.unpack_states(present, *packed) == [list(s) for s in states]


@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(nesterov=True)), (FusedOneCycleAdamW, dict(amsgrad=True))],
                         ids=["sgd", "adamw"])
def test_torch_compile_optimizer_step(cls, kw):
    """torch.compile traces optimizer.step through the custom op (functionalised
    mutations) in one graph (fullgraph=True: dynamo could not trace conform's
    Tensor.is_neg() and broke the graph there, the step then running eagerly)
    and gives the eager result. aot_eager: no C++ compiler needed."""
    if not INTERPRET:
        pytest.skip("inductor on the GPU: tests/test_triton_gpu.py")
    torch._dynamo.reset()  # (every test compiles opt.step's code: its recompile limit would be shared)
    sizes = (5, 70)
    init = init_params(sizes)
    grads = make_grads(4, sizes)
    out = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.float().clone()) for t in init]
        opt = cls(params, backend="triton", **dict(SCHED, **kw))
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.float()
            step()
        assert int(opt.step_counter()) == 4
        out.append(params + state_tensors(opt, params))
    assert all(torch.equal(x, y) for x, y in zip(*out))


def _channels_last(*shape):
    return torch.randn(*shape).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("make_param,make_grad", [
    (lambda: torch.randn(8, 6), lambda: torch.randn(6, 8).t()),
    (lambda: torch.randn(8, 12)[:, ::2], lambda: torch.randn(8, 6)),
    (lambda: _channels_last(2, 3, 4, 5), lambda: torch.randn(2, 3, 4, 5)),
    (lambda: _channels_last(2, 3, 4, 5), lambda: torch.randn(2, 4, 5, 3).permute(0, 3, 1, 2)),
    (lambda: _channels_last(2, 3, 4, 5), lambda: torch.randn(2, 3, 4, 10)[..., ::2]),
], ids=["transposed-grad", "strided-view-param", "channels-last-param", "permuted-grad", "sliced-grad"])
def test_torch_compile_step_with_layouts_to_conform(make_param, make_grad):
    """Under torch.compile the layout copies (``conform``) are traced by dynamo.
    A grad that is a view (transposed, permuted, sliced) gets symbolic
    strides from its base there, and reading them with ``Tensor.stride()``
    failed while tracing. Grads laid out unlike their parameter or not dense,
    a parameter that is a strided view: the compiled step gives the eager
    step's values."""
    if not INTERPRET:
        pytest.skip("inductor on the GPU: tests/test_triton_gpu.py")
    torch._dynamo.reset()  # (as above: unreset, the later cases hit the limit and ran eagerly)
    torch.manual_seed(0)
    grads = [make_grad() for _ in range(4)]
    out = []
    for compiled in (False, True):
        torch.manual_seed(1)
        p = torch.nn.Parameter(make_param())  # the same values and layout both times
        opt = FusedOneCycleSGD([p], backend="triton", **SCHED)
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        for g in grads:
            p.grad = g  # as made: a view (dynamo follows its base)
            step()
        out.append(p.detach())
    assert out[1].stride() == out[0].stride()
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def _torch_optim_run(torch_cls, sched, init, grads, kw, mom_key):
    """torch.optim's single-tensor step driven by the schedule's host values."""
    params = [t.to(DEVICE).clone() for t in init]
    opt = torch_cls(params, lr=0.1, foreach=False, **kw)
    for k, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.to(DEVICE, p.dtype)
        group = opt.param_groups[0]
        group["lr"] = sched.lr(k)
        if mom_key == "momentum":
            group["momentum"] = sched.momentum(k)
        else:
            group["betas"] = (sched.momentum(k), group["betas"][1])
        opt.step()
    return params, opt


@triton.jit
def _probe_fma(x_ptr, out_ptr):
    tl.store(out_ptr, tl.fma(tl.load(x_ptr), tl.load(x_ptr + 1), tl.load(x_ptr + 2)))


def _interpreted_fma_rounds_once() -> bool:
    """(1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 fused, 0 when the product is
    rounded first: triton 3.9's interpreter fuses, 3.6's does not (compiled,
    ``tl.fma`` is ``fma.rn.f32`` on every version)."""
    x = torch.tensor([1 + 2**-12, 1 + 2**-12, -(1 + 2**-11)], dtype=torch.float32)
    out = torch.zeros(1)
    _probe_fma[(1,)](x, out)
    return out.item() == 2**-24


@pytest.mark.skipif(not INTERPRET, reason="torch's CPU kernels are the oracle's rounding")
@pytest.mark.parametrize("cls,torch_cls,kw", [
    (FusedOneCycleSGD, torch.optim.SGD, dict(weight_decay=0.5)),
    (FusedOneCycleSGD, torch.optim.SGD, dict(weight_decay=0.5, nesterov=True, maximize=True)),
    (FusedOneCycleSGD, torch.optim.SGD, dict(dampening=0.3)),
    (FusedOneCycleAdam, torch.optim.Adam, dict(weight_decay=0.5)),
    (FusedOneCycleAdamW, torch.optim.AdamW, dict(weight_decay=0.5, amsgrad=True)),
], ids=["sgd-wd", "sgd-nesterov", "sgd-dampening", "adam-wd", "adamw-amsgrad"])
def test_fused_roundings_match_torch_optim(cls, torch_cls, kw):
    """Where torch's CPU kernels fuse a multiply and an add (``add(x, alpha=a)``,
    ``lerp``, ``addcmul``) the kernels use an fma too, as csrc/update.h does:
    fp32 SGD equals torch.optim.SGD bit for bit and Adam stays within its
    sqrt's rounding. Unfused, a gradient cancelled by weight decay (one
    element, grad = -wd * param) left SGD's buffer 22 ulps from torch's."""
    if not _interpreted_fma_rounds_once():
        pytest.skip(f"triton {triton.__version__}'s interpreter rounds tl.fma's product first")
    sizes = (1, 33, 130)
    init = init_params(sizes)
    grads = make_grads(40, sizes)
    grads[0][0] = -0.5 * init[0].double() * (1 + 2**-20)  # weight decay cancels the gradient
    sched = dict(SCHED, cycle_max_lr=0.5)
    ours, opt = run(cls, "triton", init, grads, torch.float32, **sched, **kw)
    mom_key = "momentum" if cls is FusedOneCycleSGD else "betas"
    tkw = dict(kw, momentum=0.9) if cls is FusedOneCycleSGD else kw
    ref, ropt = _torch_optim_run(torch_cls, opt.schedule, init, grads, tkw, mom_key)
    state = [k for k in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in ropt.state[ref[0]]]
    ours_state = [opt.state[p][k] for p in ours for k in state]
    ref_state = [ropt.state[p][k] for p in ref for k in state]
    if cls is FusedOneCycleSGD:
        for a, b in zip(ours + ours_state, ref + ref_state):
            assert torch.equal(a.detach(), b)
    else:
        assert_ulps([p.detach() for p in ours], ref, 4)
        assert_ulps(ours_state, ref_state, 4)


def test_unsupported_dtype_error_names_only_the_lacking_dtype():
    # a group of float32 and float8 parameters: the error names float8, not
    # float32 too (which the backend takes)
    ps = [torch.nn.Parameter(torch.zeros(3, device=DEVICE)),
          torch.nn.Parameter(torch.zeros(3, device=DEVICE, dtype=torch.float8_e4m3fn))]
    with pytest.raises(ValueError, match=r"does not support \['torch.float8_e4m3fn'\] parameters"):
        opt = FusedOneCycleSGD(ps, **SCHED, backend="triton")
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()


# ---------------------------------------------------------------------------
# step plans (TritonPlan): later steps skip the optimizer's loop over
# parameters; bit for bit the list path, which every surprise falls back to

PLAN_ALGOS = [
    (FusedOneCycleSGD, dict(SCHED, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (FusedOneCycleAdam, dict(SCHED, amsgrad=True)),
    (FusedOneCycleAdamW, dict(SCHED)),
]
# (size, dtype, group): mixed dtypes (a launch each), several groups, an empty tensor
PLAN_LAYOUT = [(7, torch.float32, 0), (33, torch.bfloat16, 0), (1, torch.float16, 1), (0, torch.float32, 1),
               (70, torch.float32, 2)]


def _plan_twins(cls, kw):
    """A planned optimizer and one on the list path, over equal parameters."""
    twins = []
    for planned in (True, False):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, dtype)) for n, dtype, _ in PLAN_LAYOUT]
        groups = [{"params": [p for p, (_, _, g) in zip(params, PLAN_LAYOUT) if g == gid]} for gid in range(3)]
        groups[1]["weight_decay"] = 0.05
        opt = cls(groups, backend="triton", **kw)
        opt._step_plan_enabled = planned
        twins.append((params, opt))
    return twins


def _plan_grads(params, k):
    for i, p in enumerate(params):  # new tensors each step, as after zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(100 * k + i)
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype)


@pytest.mark.parametrize("cls,kw", PLAN_ALGOS, ids=["sgd", "adam-amsgrad", "adamw"])
def test_plans_step_bit_for_bit_like_the_list_path(cls, kw, launch_key):
    twins = _plan_twins(cls, kw)
    for k in range(6):
        for params, opt in twins:
            _plan_grads(params, k)
            opt.step()
        assert_same_optimizers(*twins)
    planned = twins[0][1]._plan.planned_steps
    # every step but the first goes through the plan; without _C (the key in
    # Python leaves out the grads' dtypes and sizes) none does
    assert planned == (5 if launch_key == "C" else 0) and twins[1][1]._plan.planned_steps == 0


def test_plans_fall_back_on_every_change_and_match_the_list_path():
    """Each step changes something a plan was built from, or that it must
    see: a grad gone, a first grad (state to create), a state replaced by
    assignment, a grad in another layout (conform's copies), grads of
    another dtype or shape and a sparse one (the list path's errors, nothing
    changed), then steady state again."""
    twins = _plan_twins(FusedOneCycleAdamW, dict(SCHED))

    def change(k, params, opt):
        if k < 5:
            params[4].grad = None  # its first grad comes at step 5
        if k == 2:
            params[0].grad = None
        if k == 7:
            opt.state[params[2]]["exp_avg"] = opt.state[params[2]]["exp_avg"].clone()
        if k == 9:
            params[4].grad = torch.empty_strided((70,), (2,), device=DEVICE).copy_(params[4].grad)  # strided

    # (steady steps between the changes: three plans in a row thrown away
    # unused would pause planning for 64 steps)
    for k in range(14):
        for params, opt in twins:
            _plan_grads(params, k)
            change(k, params, opt)
            if k == 11:
                before = [p.detach().clone() for p in params]
                params[0].grad_dtype = None  # torch's own check would refuse a float16 grad
                params[0].grad = torch.zeros(params[0].shape, dtype=torch.float16, device=DEVICE)
                with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
                    opt.step()
                params[0].grad = torch.zeros_like(params[0])
                params[0].grad.data = torch.zeros(3, 3, device=DEVICE)  # (the setter checks shapes)
                with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
                    opt.step()
                params[0].grad = torch.zeros_like(params[0]).to_sparse()
                with pytest.raises(RuntimeError, match="sparse"):
                    opt.step()
                assert all(torch.equal(a, b) for a, b in zip(before, params))
                params[0].grad = torch.ones_like(params[0])
            opt.step()
        assert_same_optimizers(*twins)
    assert twins[0][1]._plan.planned_steps == 7  # steps 1, 4, 6, 8, 10, 12 and 13


def test_plans_hold_states_weakly():
    """Offloading a state by assignment frees the old tensor (the plan holds
    states weakly, as the compiled backends' plans do); the next step uses
    the new one."""
    twins = _plan_twins(FusedOneCycleSGD, dict(SCHED, momentum=0.9))
    for k in range(3):
        for params, opt in twins:
            _plan_grads(params, k)
            opt.step()
    assert twins[0][1]._plan.planned_steps == 2
    refs = []
    for params, opt in twins:
        refs.append(weakref.ref(opt.state[params[4]]["momentum_buffer"]))
        opt.state[params[4]]["momentum_buffer"] = opt.state[params[4]]["momentum_buffer"].clone()
    gc.collect()
    assert all(r() is None for r in refs)
    for params, opt in twins:
        _plan_grads(params, 3)
        opt.step()
    assert_same_optimizers(*twins)


def test_plans_with_several_devices_step_all_or_none():
    """With parameters on two devices every plan is asked first: a grad that
    the triton device's launch table refuses sends both devices to the list
    path, which raises before either is stepped. A meta parameter stands for
    the second device, served by a plan-capable stand-in of the reference
    backend."""
    from onecycle_fused.backends.reference import ReferenceBackend

    stepped = []

    class StandInPlan:
        def ready(self, table, counter):
            return True

        def step(self, table, counter, grad_scale, found_inf):
            stepped.append(1)
            counter.add_(1)
            return True

    class StandIn(ReferenceBackend):
        def make_plan(self, batch, watched):
            return StandInPlan()

    m = torch.nn.Parameter(torch.empty(4, device="meta"))
    c = torch.nn.Parameter(torch.randn(5, device=DEVICE))
    opt = FusedOneCycleAdamW([{"params": [c]}, {"params": [m]}], backend="reference", **SCHED)
    opt._counters[DEVICE] = opt._counters.pop(DEVICE)  # the meta device's plan first
    opt._backend_for[torch.device("meta")] = StandIn()
    opt._backend_for[DEVICE] = get_backend("triton")
    for _ in range(3):
        m.grad, c.grad = torch.empty_like(m), torch.randn(5, device=DEVICE)
        opt.step()
    assert len(stepped) == 2 and opt._plan.planned_steps == 2
    c.grad_dtype = None  # torch's own check would refuse a float16 grad
    c.grad = torch.zeros(5, dtype=torch.float16, device=DEVICE)
    m.grad = torch.empty_like(m)
    before = (c.detach().clone(), int(opt.step_counter(DEVICE)))
    with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
        opt.step()
    assert len(stepped) == 2  # the meta device was not stepped either
    assert torch.equal(c.detach(), before[0]) and int(opt.step_counter(DEVICE)) == before[1]


@pytest.mark.parametrize("which", ["grad", "state", "grad-at-a-cached-address"])
def test_tensors_with_the_negative_bit_step_as_their_values(which, launch_key):
    """A tensor with its negative bit set (``torch._neg_view``, the imaginary
    part of a conjugate) holds the negation of its memory: the kernels read
    it from a copy, and a cached table of the plain tensor at that address
    is no hit. The reference backend is the oracle."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(6))
    g = torch.arange(40, dtype=torch.float32).sin()
    out = {}
    for backend in ("triton", "reference"):
        p = torch.nn.Parameter(x.to(DEVICE).clone())
        opt = FusedOneCycleAdamW([p], backend=backend, **SCHED)
        grad = g.to(DEVICE).clone()
        for k in range(4):
            p.grad = grad
            if which == "grad" or which == "grad-at-a-cached-address" and k == 3:
                p.grad = torch._neg_view(grad)
            if which == "state" and k == 2:
                st = opt.state[p]["exp_avg"]
                opt.state[p]["exp_avg"] = torch._neg_view(st.neg())  # the same values
            opt.step()
        out[backend] = [p.detach().clone(), opt.state[p]["exp_avg"].resolve_neg(), opt.state[p]["exp_avg_sq"]]
    # a grad read with the wrong sign moves the step by ~1e6 ulps; 32 leaves
    # room for triton 3.6's interpreter, which rounds tl.fma's product first
    assert_ulps(out["triton"], out["reference"], ulps=32)


def test_a_step_count_shared_by_hand_is_split():
    """``opt.state[q]["step"] = opt.state[p]["step"]``: the kernel's last
    block advances the step counts a block of them at a time, so a count
    shared by two parameters of one block went up once a step, and by two
    parameters further apart twice (reference and cpu: twice). Each
    parameter now gets its own copy at the next step (tests/test_optim.py
    checks the other backends): every count is the number of steps, and the
    run is the one where nothing was shared."""
    runs = []
    for share in (True, False):
        params = [torch.nn.Parameter(torch.full((2,), float(i), device=DEVICE)) for i in range(130)]
        opt = FusedOneCycleAdamW(params, backend="triton", **SCHED)
        for k in range(3):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.01 * (i + k + 1))
            opt.step()
            if k == 0 and share:
                opt.state[params[1]]["step"] = opt.state[params[0]]["step"]
                opt.state[params[129]]["step"] = opt.state[params[2]]["step"]
        runs.append((params, opt))
    (shared, opt), (plain, _) = runs
    assert [int(opt.state[p]["step"]) for p in shared] == [3] * 130
    for p, q in zip(shared, plain):
        assert torch.equal(p, q)
