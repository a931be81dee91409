"""The CUDA backend (csrc/cuda: one multi-tensor launch per dtype bucket)
against the reference backend, torch.optim's math with the schedule on the
device.

Two kinds of tests:

* ``gpu`` tests run the built ``_C_cuda`` library on a GPU (skipped by
  conftest without CUDA, and here when the library is not built);
* ``emulated`` tests run on the CPU, in CI: the same kernel source
  (multi_tensor.cuh + step_ops.cuh, the table from build_table_image) is
  compiled by the host compiler with csrc/cuda/cpu_emulation.cuh, which
  plays each CUDA thread on a std::thread, and is plugged in as the "cuda"
  backend for CPU tensors. They check the kernel's logic (chunks, vector and
  scalar paths, tails, grid-stride loop, last-block step counts, GradScaler
  flags, the shared math) but not the GPU's memory model or speed.

Oracles: the reference backend at the same dtype (fp32: within a few ulps),
and for bf16/fp16 the reference in float64 (the flash-attention rule: our
error against float64 at most twice the reference's own at that dtype).
"""
import math
import os

import pytest
import torch

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD, LRRangeTest, OneCycle, TorchOneCycle
from onecycle_fused import backends as _backends
from onecycle_fused import ops as _ops
from onecycle_fused.backends import get_backend
from onecycle_fused.schedule import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_backend_built() -> bool:
    b = get_backend("cuda")
    return b is not None and b.available()


@pytest.fixture
def _needs_library():
    if not _cuda_backend_built():
        pytest.skip("onecycle_fused._C_cuda is not built (needs a CUDA build of torch and nvcc)")


def gpu(test):
    """A test of the built CUDA library on a GPU."""
    return pytest.mark.gpu(pytest.mark.usefixtures("_needs_library")(test))


DEV = torch.device("cuda")
# visits the rising and falling halves of the cycle and the decay phase
SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_second_step_size=3,
             decay_step_size=2, decay_lr_rate=0.5, cycle_min_mom=0.8, cycle_max_mom=0.95, decay_mom_rate=0.2)
STEPS = 12
# empty, single, odd, one vector short of a chunk, several chunks, 2**20 + 3
SIZES = ((0,), (1,), (7,), (33, 5), (8191,), (3, 8197), ((1 << 20) + 3,))

CASES = [
    ("sgd", FusedOneCycleSGD, dict(SCHED)),
    ("sgd-nesterov-wd", FusedOneCycleSGD, dict(SCHED, nesterov=True, weight_decay=0.01)),
    ("sgd-dampening-maximize", FusedOneCycleSGD, dict(SCHED, dampening=0.1, maximize=True)),
    ("sgd-stairs", FusedOneCycleSGD, dict(SCHED, cycle_first_stair_count=2, cycle_second_stair_count=3)),
    ("sgd-constant-momentum", FusedOneCycleSGD, dict(SCHED, cycle_momentum=False, momentum=0.9)),
    ("sgd-no-buffer", FusedOneCycleSGD, dict(SCHED, cycle_momentum=False, momentum=0.0, weight_decay=0.1)),
    ("sgd-range-test", FusedOneCycleSGD,
     dict(schedule=LRRangeTest(0.01, lr_range_test_step_size=3, lr_range_test_step_rate=0.5), momentum=0.9)),
    ("adam", FusedOneCycleAdam, dict(SCHED)),
    ("adam-wd-amsgrad", FusedOneCycleAdam, dict(SCHED, weight_decay=0.01, amsgrad=True)),
    ("adam-maximize-eps", FusedOneCycleAdam, dict(SCHED, maximize=True, eps=1e-6, betas=(0.9, 0.99))),
    ("adam-range-test", FusedOneCycleAdam,
     dict(schedule=LRRangeTest(0.001, lr_range_test_step_size=2, lr_range_test_staircase=True))),
    ("adamw", FusedOneCycleAdamW, dict(SCHED)),
    ("adamw-amsgrad", FusedOneCycleAdamW, dict(SCHED, weight_decay=0.1, amsgrad=True)),
]
# torch's OneCycleLR: three phases and two steps past the end in STEPS
TORCH_SCHED = dict(max_lr=0.1, total_steps=10, pct_start=0.25, three_phase=True)
CASES += [
    ("sgd-torch-onecycle", FusedOneCycleSGD, dict(schedule=TorchOneCycle(**TORCH_SCHED), momentum=0.9)),
    ("adam-torch-onecycle-linear", FusedOneCycleAdam,
     dict(schedule=TorchOneCycle(**TORCH_SCHED, anneal_strategy="linear", cycle_momentum=False))),
]
LOW = (torch.bfloat16, torch.float16)


def init_values(sizes, seed=0, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, device=device, dtype=torch.float64) for s in sizes]


def grad_values(steps, sizes, seed=1, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)
    return [[torch.randn(s, generator=g, device=device, dtype=torch.float64) for s in sizes] for _ in range(steps)]


def make_param(value, dtype, misaligned=False):
    """A leaf parameter holding ``value``; misaligned: its data starts one
    element into its storage, so no 16-byte vector access is possible."""
    if not misaligned:
        return torch.nn.Parameter(value.to(dtype).clone())
    base = torch.empty(value.numel() + 1, device=value.device, dtype=dtype)
    view = base[1:].view(value.shape)
    view.copy_(value)
    return torch.nn.Parameter(view)


def take_steps(opt, params, grads):
    """One step per entry of ``grads``, each grad in its parameter's dtype
    (None: that parameter has no grad in that step)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()


def run(cls, backend, inits, grads, dtype, misaligned=(), groups=None, **kw):
    params = [make_param(v, dtype, i in misaligned) for i, v in enumerate(inits)]
    spec = params if groups is None else [dict(params=[params[i] for i in idx], **o) for idx, o in groups]
    opt = cls(spec, backend=backend, **kw)
    take_steps(opt, params, grads)
    return params, opt


STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def assert_close_ulps(ours, ref):
    """A few ulps of the values' scale after a dozen steps (float32 or, with
    the same number of ulps, float64)."""
    if ours.dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=8e-15, atol=2e-15)
    else:
        torch.testing.assert_close(ours, ref, rtol=4e-6, atol=1e-6)


def assert_flash_rule(ours, ref_lowp, ref64, what):
    """Our distance from the float64 reference is at most twice the
    reference's own at the same low precision (or one ulp of the largest
    value, for tensors so small that the reference happens to be exact)."""
    if ours.numel() == 0:
        return
    ours_err = (ours.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    ulp = torch.finfo(ours.dtype).eps * ref64.abs().max().item()
    assert ours_err <= max(2 * ref_err, ulp), f"{what}: error {ours_err:.3g} vs reference's {ref_err:.3g}"


def compare_runs(cls, kw, dtype, sizes=SIZES, misaligned=(), steps=STEPS, groups=None, device=DEV):
    inits = init_values(sizes, device=device)
    grads = grad_values(steps, sizes, device=device)
    ours, opt = run(cls, "cuda", inits, grads, dtype, misaligned, groups, **kw)
    ref, ref_opt = run(cls, "reference", inits, grads, dtype, misaligned, groups, **kw)
    assert int(opt.step_counter()) == steps == int(ref_opt.step_counter())
    if dtype in (torch.float32, torch.float64):
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert_close_ulps(p, q)
            for k in STATE_KEYS:
                if k in ref_opt.state[q]:
                    assert_close_ulps(opt.state[p][k], ref_opt.state[q][k])
            assert int(opt.state[p]["step"]) == int(ref_opt.state[q]["step"]) == steps
        return
    ref64, opt64 = run(cls, "reference", [v.to(dtype).double() for v in inits],
                       [[g.to(dtype).double() for g in s] for s in grads], torch.float64, misaligned, groups, **kw)
    for i, (p, q, r) in enumerate(zip(ours, ref, ref64)):
        assert_flash_rule(p.detach(), q.detach(), r.detach(), f"param {i}")
        for k in STATE_KEYS:
            if k in ref_opt.state[q]:
                assert_flash_rule(opt.state[p][k], ref_opt.state[q][k], opt64.state[r][k], f"{k} {i}")
        assert int(opt.state[p]["step"]) == steps


# ---------------------------------------------------------------------------
# against the reference


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name,cls,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, cls, kw, dtype):
    compare_runs(cls, kw, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_misaligned_scalar_path(cls, dtype):
    """Parameters that start off a 16-byte boundary take the element-wise path."""
    compare_runs(cls, dict(SCHED), dtype, sizes=((1,), (8,), (9001,), (4, 1031)), misaligned=(0, 2, 3))


def many_tensors_case(n_tensors, device, steps=4):
    """n_tensors of 0..299 elements, fp32 / bf16 / fp16 in turn and every
    seventh fp64, three AdamW groups (one with amsgrad): four launches per
    step (only the last advances the counter), many tensors per block."""
    g = torch.Generator().manual_seed(3)
    sizes = [(int(torch.randint(0, 300, (1,), generator=g)),) for _ in range(n_tensors)]
    inits = init_values(sizes, device=device)
    grads = grad_values(steps, sizes, device=device)
    dtypes = [torch.float64 if i % 7 == 6 else (torch.float32, torch.bfloat16, torch.float16)[i % 3]
              for i in range(len(sizes))]
    groups = [dict(weight_decay=0.0), dict(weight_decay=0.1, amsgrad=True), dict(cycle_max_lr=0.05)]

    def go(backend):
        params = [make_param(v, dt) for v, dt in zip(inits, dtypes)]
        spec = [dict(params=params[j::4] + params[j + 3::4] if j == 0 else params[j::4], **groups[j])
                for j in range(3)]
        opt = FusedOneCycleAdamW(spec, backend=backend, **SCHED)
        take_steps(opt, params, grads)
        return params, opt

    ours, opt = go("cuda")
    ref, ref_opt = go("reference")
    assert int(opt.step_counter()) == steps
    for p, q in zip(ours, ref):
        if p.dtype in (torch.float32, torch.float64):
            assert_close_ulps(p, q)
        else:  # same math, low-precision rounding of the result: an ulp or two apart
            torch.testing.assert_close(p, q, rtol=2 * 2**-8, atol=1e-3)
        assert int(opt.state[p]["step"]) == steps


@gpu
def test_thousands_of_tensors_mixed_dtypes_and_groups():
    many_tensors_case(3000, DEV)


def params_without_grads_case(device):
    """A parameter without a grad is left alone (its step does not move); a
    step where no parameter has a grad still advances the counter."""
    inits = init_values(((10,), (20,)), device=device)
    params = [make_param(v, torch.float32) for v in inits]
    opt = FusedOneCycleSGD(params, backend="cuda", **SCHED)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(params[1].detach(), inits[1].float())
    assert int(opt.state[params[0]]["step"]) == 1 and len(opt.state[params[1]]) == 0
    params[0].grad = None
    opt.step()
    assert int(opt.step_counter()) == 2 and int(opt.state[params[0]]["step"]) == 1


@gpu
def test_params_without_grads_and_no_grads_at_all():
    params_without_grads_case(DEV)


@gpu
def test_schedule_values_op_matches_host():
    """The device schedule (schedule.h compiled by nvcc) equals schedule.py
    bit for bit."""
    opt = FusedOneCycleSGD([make_param(torch.zeros(3, device=DEV), torch.float32)], backend="cuda",
                           **dict(SCHED, cycle_first_stair_count=2, cycle_second_stair_count=3))
    opt.param_groups[0]["params"][0].grad = torch.zeros(3, device=DEV)
    opt.step()  # builds the table
    table = next(iter(opt._tables.values()))
    sched = OneCycle(**{k: v for k, v in SCHED.items()}, cycle_first_stair_count=2, cycle_second_stair_count=3)
    for k in list(range(0, 20)) + [10**6, 2**40]:
        got = torch.ops.onecycle_fused.schedule_values(table, k).cpu()
        assert got[0, 0].item() == sched.lr(k), k
        assert got[0, 1].item() == sched.momentum(k), k


@gpu
@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_torch_onecycle_schedule_values_op(anneal):
    """TorchOneCycle on the GPU (schedule.h compiled by nvcc) against
    schedule.py: 'linear' bit for bit; 'cos' within what CUDA's cos (up to 2
    ulps from the C library's, which math.cos is) can move the result:
    anneal = end + (start - end) / 2 * (cos + 1), so a cos off by d moves it
    by |start - end| / 2 * d. Near the end of the last phase that is many
    ulps of the small lr there (min_lr = max_lr / 2.5e5), not 2."""
    max_lr, base_mom, max_mom = [0.1, 0.02], 0.85, 0.95
    sched = TorchOneCycle(max_lr=max_lr, total_steps=40, pct_start=0.3, three_phase=True,
                          anneal_strategy=anneal, base_momentum=base_mom, max_momentum=max_mom)
    rows = [r + [0.0] * (24 - len(r)) for r in (sched.row(0), sched.row(1))]
    table = torch.tensor(rows, dtype=torch.float64, device=DEV)
    for k in list(range(0, 43)) + [10**6, 2**40]:
        got = torch.ops.onecycle_fused.schedule_values(table, k).cpu()
        for g in range(2):
            # span >= |start - end| of any phase; cos off by <= 2 ulps (<= 2**-51),
            # cos + 1 rounded (<= 2**-52 more): the result moves by <= span * 2**-51
            spans = (max_lr[g], max_mom - base_mom)
            for v, want, span in zip(got[g].tolist(), (sched.lr(k, g), sched.momentum(k, g)), spans):
                if anneal == "linear":
                    assert v == want, (k, g)
                else:
                    assert abs(v - want) <= 2 * math.ulp(want) + span * 2.0**-50, (k, g, v, want)


@gpu
@pytest.mark.parametrize("how", ["module-cuda", "groups-replaced"])
def test_optimizer_built_on_cpu_follows_params_to_the_gpu(how):
    """The client-optimizer pattern (DeepSpeed): the optimizer is built on CPU
    parameters, then the model moves to the GPU (in place, as
    ``module.cuda()``) or a wrapper puts GPU tensors into ``param_groups``.
    The steps run on the GPU, from the schedule position the CPU counter had,
    equal to an optimizer built on the GPU."""
    inits = init_values(((33, 5), (1000,)), device=torch.device("cpu"))
    cpu_params = [make_param(v, torch.float32) for v in inits]
    opt = FusedOneCycleAdamW(cpu_params, backend="auto", **SCHED)
    opt.set_step(3)
    if how == "module-cuda":
        for p in cpu_params:
            p.data = p.data.to(DEV)
        params = cpu_params
    else:
        params = [make_param(v.to(DEV), torch.float32) for v in inits]
        opt.param_groups[0]["params"] = params
    twin = [make_param(v.to(DEV), torch.float32) for v in inits]
    ref = FusedOneCycleAdamW(twin, backend="cuda", **SCHED)
    ref.set_step(3)
    for step_grads in grad_values(4, ((33, 5), (1000,))):
        for p, q, g in zip(params, twin, step_grads):
            p.grad = g.float()
            q.grad = g.float()
        opt.step()
        ref.step()
    assert opt.step_counter().device == params[0].device
    assert int(opt.step_counter()) == 7 == int(ref.step_counter())
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert opt.state[p]["exp_avg"].is_cuda and int(opt.state[p]["step"]) == 4


# ---------------------------------------------------------------------------
# no host sync, no copies, one launch


def _steady_optimizer(cls=FusedOneCycleAdamW, **kw):
    inits = init_values(((64, 33), (1000,), (5,)))
    params = [make_param(v, dt) for v, dt in zip(inits, (torch.float32, torch.bfloat16, torch.float32))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, backend="cuda", **SCHED, **kw)
    return params, opt


@gpu
def test_steady_state_steps_do_not_sync():
    params, opt = _steady_optimizer()
    opt.step()  # first step: state, table upload
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.step_counter()) == 5


def _profiled_steady_steps() -> list[str]:
    """The CUDA activity of three steady-state steps, as torch.profiler
    records it (the test below runs this in a process of its own)."""
    from torch.profiler import ProfilerActivity, profile

    params, opt = _steady_optimizer(amsgrad=True)
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@gpu
def test_steady_state_one_launch_per_dtype_and_no_host_copies():
    """The profiler session runs in a subprocess, so that CUPTI stays out of
    the process the other gpu tests share. (It was suspected of the
    SIGSEGVs of the first H100 session; the second showed the cause was a
    statically linked libstdc++, see tools/gpu_error_probe.py.)"""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_cuda_backend as t; "
            "print(json.dumps(t._profiled_steady_steps()))")
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = json.loads(done.stdout.strip().splitlines()[-1])
    if not names:  # e.g. CUPTI refused in a container (CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
        pytest.skip("the profiler recorded no CUDA activity (CUPTI unavailable)")
    ours = [n for n in names if "multi_tensor_step_kernel" in n]
    assert len(ours) == 3 * 2, names  # fp32 and bf16 buckets
    assert not [n for n in names if "HtoD" in n], names


# ---------------------------------------------------------------------------
# CUDA graphs


def _graph_case(cls, kw, realloc_grads):
    """opt.step() captured once after one eager step and replayed 5 times,
    next to an eager optimizer stepped 6 times with the same grads."""
    sizes = ((31, 7), (1000,), (3,), ((1 << 14) + 1,))
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float32)
    inits = init_values(sizes)
    grads = grad_values(6, sizes)

    def make():
        params = [make_param(v, dt) for v, dt in zip(inits, dtypes)]
        return params, cls(params, backend="cuda", **kw)

    eager, eopt = make()
    for step_grads in grads:
        for p, g in zip(eager, step_grads):
            p.grad = g.to(p.dtype)
        eopt.step()

    graphed, gopt = make()
    sources = [torch.empty_like(p) for p in graphed]  # the graph's grad inputs

    def feed(i):
        for s, g in zip(sources, grads[i]):
            s.copy_(g)

    feed(0)
    for p, s in zip(graphed, sources):
        p.grad = s.clone()
    gopt.step()  # eager first step: optimizer state, table
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, s in zip(graphed, sources):
            if realloc_grads:
                # grads made inside the capture have new storages: the step's
                # table is built (and uploaded by kernels) during capture
                p.grad = s * 1
            else:
                p.grad.copy_(s)
        gopt.step()
    for i in range(1, 6):
        feed(i)
        graph.replay()
    torch.cuda.synchronize()
    return eager, eopt, graphed, gopt


@gpu
@pytest.mark.parametrize("realloc_grads", [False, True], ids=["static-grads", "grads-made-in-capture"])
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(SCHED, nesterov=True)),
                                    (FusedOneCycleAdamW, dict(SCHED, amsgrad=True))],
                         ids=["sgd", "adamw"])
def test_graph_replay_equals_eager_bit_for_bit(cls, kw, realloc_grads):
    eager, eopt, graphed, gopt = _graph_case(cls, kw, realloc_grads)
    assert int(gopt.step_counter()) == 6 == int(eopt.step_counter())
    for p, q in zip(graphed, eager):
        assert torch.equal(p, q)
        for k in STATE_KEYS:
            if k in eopt.state[q]:
                assert torch.equal(gopt.state[p][k], eopt.state[q][k]), k
        assert int(gopt.state[p]["step"]) == 6


@gpu
def test_eager_step_after_capture_before_any_replay():
    """A table built while capturing (grads made inside the capture) is only
    written when the graph replays. An eager step with those very grads
    before the first replay hits that table in the cache: it must upload it
    rather than read uninitialised device memory."""
    sizes = ((31, 7), (1000,), (3,))
    inits = init_values(sizes)
    grads = grad_values(3, sizes)

    def make():
        params = [make_param(v, torch.float32) for v in inits]
        return params, FusedOneCycleAdamW(params, backend="cuda", **dict(SCHED, amsgrad=True))

    eager, eopt = make()
    graphed, gopt = make()
    sources = [torch.empty_like(p) for p in graphed]
    for p, g in zip(eager, grads[0]):
        p.grad = g.float()
    eopt.step()
    for s, p, g in zip(sources, graphed, grads[0]):
        s.copy_(g)
        p.grad = s.clone()
    gopt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, s in zip(graphed, sources):
            p.grad = s * 1  # new storages: the table is built (not written) during capture
        gopt.step()
    # eager step 2 with the capture's grad tensors, before any replay
    for p, q, g in zip(graphed, eager, grads[1]):
        p.grad.copy_(g)
        q.grad = g.float()
    gopt.step()
    eopt.step()
    # and the graph still replays step 3
    for s, q, g in zip(sources, eager, grads[2]):
        s.copy_(g)
        q.grad = g.float()
    graph.replay()
    eopt.step()
    torch.cuda.synchronize()
    assert int(gopt.step_counter()) == 3 == int(eopt.step_counter())
    for p, q in zip(graphed, eager):
        assert torch.equal(p, q)
        for k in STATE_KEYS:
            if k in eopt.state[q]:
                assert torch.equal(gopt.state[p][k], eopt.state[q][k]), k


def _plain_sgd_graph():
    """A zero parameter, grads of one, plain SGD (no momentum) under SCHED: one
    eager step, then a captured step. Each step subtracts lr(k)."""
    p = make_param(torch.zeros(4, device=DEV), torch.float32)
    opt = FusedOneCycleSGD([p], backend="cuda", **dict(SCHED, cycle_momentum=False, momentum=0.0))
    p.grad = torch.ones_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return p, opt, graph


def _after_plain_sgd_steps(n):
    """The parameter of _plain_sgd_graph after n steps, rounded as the kernel rounds."""
    sched = OneCycle(**dict(SCHED, cycle_momentum=False))
    expected = torch.zeros(4, dtype=torch.float32)
    for k in range(n):
        expected -= torch.tensor(sched.lr(k), dtype=torch.float32)
    return expected


@gpu
def test_graph_replay_advances_the_schedule():
    """With equal grads each replay, the update sizes follow lr(k): the
    schedule is read from the counter at replay, not baked in at capture."""
    p, opt, graph = _plain_sgd_graph()
    for _ in range(1, 10):
        graph.replay()
    assert int(opt.step_counter()) == 10
    torch.testing.assert_close(p.detach().cpu(), _after_plain_sgd_steps(10), rtol=1e-6, atol=1e-7)


@gpu
def test_graph_captured_before_add_param_group_still_replays():
    """add_param_group replaces the device's group table (one more row). A
    graph captured before still reads the old one: it is kept alive, so the
    replay reads its values, not memory reused by other tensors."""
    p, opt, graph = _plain_sgd_graph()
    q = make_param(torch.zeros(4, device=DEV), torch.float32)
    opt.add_param_group({"params": [q]})
    q.grad = torch.ones_like(q)
    opt.step()  # eager: the table now has two rows, in a new tensor
    junk = [torch.full((2, 24), float("nan"), dtype=torch.float64, device=DEV) for _ in range(512)]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    del junk
    assert int(opt.step_counter()) == 5
    torch.testing.assert_close(p.detach().cpu(), _after_plain_sgd_steps(5), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# GradScaler


def grad_scaler_case(cls, device, dtype=torch.float32):
    """Steps 2 and 5 get an inf gradient: they change nothing and do not
    count, the others equal the reference backend's under the same scaler."""
    inits = init_values(((16, 8), (8,), (1001,)), device=device)

    def go(backend):
        params = [make_param(v, dtype) for v in inits]
        opt = cls(params, backend=backend, **SCHED)
        scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, growth_interval=3)
        counts = []
        for i in range(8):
            loss = sum((p**2).sum() * (0.1 * (j + 1)) for j, p in enumerate(params)) * (1 + 0.1 * i)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if i in (2, 5):
                params[1].grad[3] = math.inf
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            if i in (2, 5):
                assert all(torch.equal(b, p) for b, p in zip(before, params)), f"step {i} changed a parameter"
            counts.append(int(opt.step_counter()))
        return params, opt, counts

    ours, opt, counts = go("cuda")
    ref, ref_opt, ref_counts = go("reference")
    assert counts == ref_counts == [1, 2, 2, 3, 4, 4, 5, 6]
    for p, q in zip(ours, ref):
        assert_close_ulps(p, q)
        assert int(opt.state[p]["step"]) == 6


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdam])
def test_grad_scaler_with_forced_infs(cls, dtype):
    grad_scaler_case(cls, DEV, dtype)


# ---------------------------------------------------------------------------
# int64 indexing


@gpu
def test_bf16_tensor_over_2_31_elements():
    """One bf16 tensor of 2**31 + 9 elements: elements on both sides of
    2**31 are updated like the reference updates the same values."""
    n = (1 << 31) + 9
    need = 3 * 2 * n + (1 << 30)  # param, grad, momentum buffer in bf16, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device=DEV).manual_seed(5)
    p = torch.nn.Parameter(torch.randn(n, generator=g, device=DEV, dtype=torch.bfloat16))
    windows = [slice(0, 4096), slice((1 << 31) - 2048, (1 << 31) + 2048), slice(n - 4096, n)]
    small = [torch.nn.Parameter(p.detach()[w].clone()) for w in windows]
    opt = FusedOneCycleSGD([p], backend="cuda", **SCHED)
    ref = FusedOneCycleSGD(small, backend="reference", **SCHED)
    for _ in range(2):  # first step (buf = grad) and a momentum step
        p.grad = torch.randn(n, generator=g, device=DEV, dtype=torch.bfloat16)
        for s, w in zip(small, windows):
            s.grad = p.grad[w].clone()
        opt.step()
        ref.step()
        p.grad = None
    for s, w in zip(small, windows):
        torch.testing.assert_close(p.detach()[w], s.detach(), rtol=2 * 2**-8, atol=1e-5)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"][w], ref.state[s]["momentum_buffer"],
                                   rtol=2 * 2**-8, atol=1e-5)


# ---------------------------------------------------------------------------
# the op itself


def _sgd_args(params, grads, bufs, steps, table, counter, grad_scale=None, found_inf=None):
    return (params, grads, bufs, steps, [0] * len(params), table, counter, grad_scale, found_inf)


def _table():
    opt = FusedOneCycleSGD([make_param(torch.zeros(1, device=DEV), torch.float32)], backend="cuda", **SCHED)
    opt.param_groups[0]["params"][0].grad = torch.zeros(1, device=DEV)
    opt.step()
    return next(iter(opt._tables.values()))


@gpu
def test_opcheck():
    table = _table()
    params = [torch.randn(s, device=DEV) for s in (5, 0, 130)]
    args = _sgd_args(params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
                     [torch.zeros((), dtype=torch.int64, device=DEV) for _ in params], table,
                     torch.zeros((), dtype=torch.int64, device=DEV), torch.full((1,), 2.0, device=DEV),
                     torch.zeros((1,), device=DEV))
    torch.library.opcheck(torch.ops.onecycle_fused.sgd_step_, args)
    n = len(params)
    adam_args = (params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.zeros_like(p) for p in params], [torch.empty(0, device=DEV) for _ in params],
                 [torch.zeros((), dtype=torch.int64, device=DEV) for _ in params], [0] * n, table,
                 torch.zeros((), dtype=torch.int64, device=DEV), None, None)
    torch.library.opcheck(torch.ops.onecycle_fused.adam_step_, adam_args)


@gpu
def test_found_inf_changes_nothing_at_op_level():
    table = _table()
    p = torch.randn(100, device=DEV)
    buf = torch.randn(100, device=DEV)
    step = torch.full((), 3, dtype=torch.int64, device=DEV)
    counter = torch.full((), 7, dtype=torch.int64, device=DEV)
    before = (p.clone(), buf.clone())
    torch.ops.onecycle_fused.sgd_step_(*_sgd_args([p], [torch.randn_like(p)], [buf], [step], table, counter,
                                                  None, torch.ones((), device=DEV)))
    assert torch.equal(p, before[0]) and torch.equal(buf, before[1])
    assert int(step) == 3 and int(counter) == 7


@gpu
def test_channels_last_params_are_handled():
    """Dense permuted layouts (channels_last) are updated in memory order."""
    value = torch.randn(4, 6, 3, 5, device=DEV)
    p = torch.nn.Parameter(value.clone().to(memory_format=torch.channels_last))
    q = torch.nn.Parameter(value.clone())
    opt = FusedOneCycleSGD([p], backend="cuda", **SCHED)
    ref = FusedOneCycleSGD([q], backend="reference", **SCHED)
    for _ in range(3):
        g = torch.randn(4, 6, 3, 5, device=DEV)
        p.grad = g.clone().to(memory_format=torch.channels_last)
        q.grad = g.clone()
        opt.step()
        ref.step()
    assert_close_ulps(p, q)


@gpu
def test_grad_with_other_strides_is_read_in_param_layout():
    """A grad set by hand with strides unlike its parameter's is used as is
    (through a copy in the parameter's layout)."""
    value = torch.randn(6, 4, device=DEV)
    grads = [torch.randn(4, 6, device=DEV).t() for _ in range(3)]
    p = torch.nn.Parameter(value.clone())
    q = torch.nn.Parameter(value.clone())
    opt = FusedOneCycleSGD([p], backend="cuda", **SCHED)
    ref = FusedOneCycleSGD([q], backend="reference", **SCHED)
    for g in grads:
        p.grad = g
        q.grad = g.contiguous()
        opt.step()
        ref.step()
    assert_close_ulps(p, q)


@gpu
@pytest.mark.parametrize("kind", ["behind", "transposed"])
@pytest.mark.parametrize("cls, kw", [(FusedOneCycleSGD, dict(momentum=0.9)), (FusedOneCycleAdamW, {})])
def test_grad_sharing_part_of_its_parameters_memory_is_read_from_a_copy(cls, kw, kind):
    """A grad that is a view of its parameter's storage (one element behind
    it, or transposed) steps as its clone does (torch.optim's result): read
    from a copy enqueued before the kernel. In place, blocks would read
    elements other blocks had written (1M elements: many blocks)."""
    n = 1024
    out = []
    for shared in (True, False):
        gen = torch.Generator(device=DEV).manual_seed(3)
        p = torch.nn.Parameter(torch.zeros(n, n, device=DEV))
        opt = cls([p], backend="cuda", **SCHED, **kw)
        for _ in range(3):
            base = torch.randn(n * n + 1, device=DEV, generator=gen)
            data = base[1:].view(n, n)
            grad = data.t() if kind == "transposed" else base[:-1].view(n, n)
            p.data, p.grad = (data, grad) if shared else (data.clone(), grad.clone())
            opt.step()
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1])


@gpu
def test_state_sharing_part_of_the_params_memory_is_refused():
    p = torch.nn.Parameter(torch.randn(100, device=DEV))
    opt = FusedOneCycleAdamW([p], backend="cuda", **SCHED)
    p.grad = torch.randn_like(p)
    opt.step()
    base = torch.randn(101, device=DEV)
    p.data = base[:100]
    opt.state[p]["exp_avg_sq"] = base[1:]
    before = (p.detach().clone(), int(opt.step_counter()))
    with pytest.raises(RuntimeError, match=r"params\[0\] and exp_avg_sqs\[0\] partially overlap"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and int(opt.step_counter()) == before[1]


@gpu
@pytest.mark.parametrize("mixed", [False, True])
def test_states_follow_parameters_into_another_memory_format(mixed):
    """model.to(memory_format=torch.channels_last) after the state was made
    left states the op refuses (it walks them with the parameter's offsets):
    every later step raised. They are now copied into the parameter's
    layout and stepped. ``mixed``: a CPU parameter too, whose device steps
    first; the layouts are fixed before any device steps, so none is stepped
    twice. Oracle: torch.optim.AdamW on the same schedule, which takes such
    states, on the same devices."""
    sched = OneCycle(**SCHED)

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 3))
        return m.to(DEV), (torch.nn.Parameter(torch.ones(5)) if mixed else None)

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 9, 9, generator=gen).to(DEV), torch.randn(4, 2, 5, 5, generator=gen).to(DEV))
            for _ in range(6)]

    def train(m, extra, opt, fused):
        for k, (x, y) in enumerate(data):
            if k == 3:
                m.to(memory_format=torch.channels_last)
            if not fused:
                opt.param_groups[0].update(lr=sched.lr(k), betas=(sched.momentum(k), 0.999))
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if extra is not None:
                extra.grad = torch.full_like(extra, 0.1 * (k + 1))
            opt.step()

    ours, ours_extra = model()
    opt = FusedOneCycleAdamW(list(ours.parameters()) + ([ours_extra] if mixed else []), backend="auto", **SCHED)
    train(ours, ours_extra, opt, True)
    ref, ref_extra = model()
    torch_opt = torch.optim.AdamW(list(ref.parameters()) + ([ref_extra] if mixed else []), lr=0.1)
    train(ref, ref_extra, torch_opt, False)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if mixed:
        torch.testing.assert_close(ours_extra, ref_extra, rtol=1e-6, atol=1e-7)
        assert int(opt.step_counter("cpu")) == len(data)
    assert int(opt.step_counter(DEV)) == len(data)


@gpu
def test_a_strided_cuda_parameter_beside_a_cpu_one_is_refused_before_either_steps():
    """The cuda op refuses a parameter that is not dense, but only for its
    device: beside a CPU parameter (whose device steps first) the CPU one
    had moved. The optimizer checks first now: ValueError, nothing moved on
    either device."""
    c = torch.nn.Parameter(torch.randn(4))
    g = torch.nn.Parameter(torch.randn(4, 6, device=DEV))
    opt = FusedOneCycleAdamW([c, g], backend="auto", **SCHED)
    c.grad, g.grad = torch.randn(4), torch.randn(4, 6, device=DEV)
    opt.step()
    g.data = torch.randn(4, 12, device=DEV)[:, ::2]
    opt.state[g]["exp_avg"] = torch.zeros_like(g)
    opt.state[g]["exp_avg_sq"] = torch.zeros_like(g)
    c.grad, g.grad = torch.randn(4), torch.randn(4, 6, device=DEV)
    before = (c.detach().clone(), g.detach().clone(), int(opt.step_counter("cpu")), int(opt.step_counter(DEV)))
    with pytest.raises(ValueError, match=r"params\[0\] must be dense in memory"):
        opt.step()
    assert torch.equal(c.detach(), before[0]) and torch.equal(g.detach(), before[1])
    assert (int(opt.step_counter("cpu")), int(opt.step_counter(DEV))) == before[2:]


@gpu
def test_groups_without_parameters_hand_their_count_to_the_gpu():
    """A group with no parameters keeps the count on the CPU; CUDA parameters
    added later take it over, and the CPU counter goes."""
    opt = FusedOneCycleSGD([{"params": []}], backend="auto", **SCHED)
    opt.step()
    opt.step()
    p = torch.nn.Parameter(torch.zeros(10, device=DEV))
    opt.add_param_group({"params": [p]})
    assert list(opt._counters) == [p.device] and opt.step_counter().is_cuda
    p.grad = torch.ones_like(p)
    opt.step()
    assert int(opt.step_counter()) == 3


@gpu
def test_clear_errors():
    table = _table()
    counter = torch.zeros((), dtype=torch.int64, device=DEV)

    def call(p, g, buf=None):
        buf = torch.zeros_like(p) if buf is None else buf
        torch.ops.onecycle_fused.sgd_step_(
            *_sgd_args([p], [g], [buf], [torch.zeros((), dtype=torch.int64, device=DEV)], table, counter))

    strided = torch.randn(10, 10, device=DEV)[:, ::2]
    with pytest.raises(ValueError, match=r"params\[0\] must be dense"):
        call(strided, torch.randn_like(strided))
    p = torch.randn(6, 4, device=DEV)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] must match params\[0\]"):
        call(p, torch.randn_like(p), torch.zeros(4, 6, device=DEV).t())
    with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
        call(p, torch.randn(6, 5, device=DEV))
    with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
        call(p, torch.randn(6, 4, device=DEV, dtype=torch.bfloat16))
    p_int = torch.arange(3, device=DEV, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"params\[0\] has dtype"):
        call(p_int, p_int.clone())
    with pytest.raises(ValueError, match=r"group_ids\[0\]"):
        torch.ops.onecycle_fused.sgd_step_([p], [p.clone()], [torch.zeros_like(p)],
                                           [torch.zeros((), dtype=torch.int64, device=DEV)], [5], table, counter,
                                           None, None)
    # a CPU counter with CUDA params (the op dispatches to CUDA): a ValueError,
    # not the CUDAGuard's RuntimeError
    cpu_counter = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"counter must be a CUDA tensor"):
        torch.ops.onecycle_fused.sgd_step_(*_sgd_args([p], [p.clone()], [torch.zeros_like(p)],
                                                      [torch.zeros((), dtype=torch.int64, device=DEV)], table,
                                                      cpu_counter))
    assert int(counter) == 0 and int(cpu_counter) == 0


# ---------------------------------------------------------------------------
# the Python side's CUDA-only paths (host mirror, capture guards, devices);
# their logic is also checked on the CPU in tests/test_cuda_paths_on_cpu.py


def _mirror_matches_counter(opt, sched_kw):
    """get_last_lr() and the lr mirror equal the schedule at the counter."""
    k = int(opt.step_counter())
    expected = OneCycle(**{n: v for n, v in sched_kw.items() if n in OneCycle(0.0, 0.0).params()}).lr(k)
    assert opt.get_last_lr() == [expected] == [opt.param_groups[0]["lr"]], k


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_cuda_found_inf_with_cpu_and_cuda_params_in_one_optimizer(cls):
    """Mixed devices with GradScaler's flags on the GPU (set as GradScaler
    sets them; GradScaler itself has the same race in its own CPU unscale).
    The CPU kernels read found_inf through a blocking copy: a non-blocking
    one into pinned memory was read before it landed (here: found_inf is
    written after a long GPU sleep, so the CPU parameter was stepped). The
    mirror reads the CPU counter (it used to hand it to
    torch.cuda.current_stream, a ValueError)."""
    torch.manual_seed(0)
    cpu_p = torch.nn.Parameter(torch.randn(64, 8))
    gpu_p = torch.nn.Parameter(torch.randn(1000, device=DEV))
    opt = cls([cpu_p, gpu_p], **SCHED)  # auto: a CPU backend and a GPU one
    for i in range(6):
        cpu_p.grad, gpu_p.grad = torch.randn_like(cpu_p), torch.randn_like(gpu_p)
        found_inf = torch.zeros((), device=DEV)
        torch.cuda._sleep(50_000_000)  # tens of ms: the flag is written long after the step is called
        found_inf.fill_(1.0 if i in (2, 4) else 0.0)
        opt.grad_scale, opt.found_inf = torch.full((), 2.0, device=DEV), found_inf
        before = cpu_p.detach().clone()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        assert torch.equal(before, cpu_p) == (i in (2, 4)), f"step {i}"
    torch.cuda.synchronize()
    assert int(opt.step_counter(DEV)) == int(opt.step_counter("cpu")) == 4
    assert int(opt.state[cpu_p]["step"]) == int(opt.state[gpu_p]["step"]) == 4
    _mirror_matches_counter(opt, SCHED)


@pytest.mark.gpu
def test_mirror_after_grad_scaler_steps_then_plain_steps():
    """The asynchronous copy of the counter made by a CUDA GradScaler step
    may land steps later; the plain steps taken meanwhile still count."""
    p = torch.nn.Parameter(torch.randn(1 << 20, device=DEV))
    opt = FusedOneCycleSGD([p], **SCHED)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    for i in range(3):
        opt.zero_grad()
        scaler.scale((p**2).sum()).backward()
        if i == 1:
            p.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
    for _ in range(4):  # no scaler: found_inf None
        p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    assert int(opt.step_counter()) == 6
    _mirror_matches_counter(opt, SCHED)


@gpu
def test_eager_steps_after_graph_replays_keep_the_mirror_right():
    """Replays leave the host count stale; the next eager step copies the
    counter without a sync and get_last_lr waits for that copy (the mirror
    used to run one step ahead after such a step)."""
    p, opt, graph = _plain_sgd_graph()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # eager, stale host count: no sync
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.step_counter()) == 6
    _mirror_matches_counter(opt, SCHED)


@pytest.mark.gpu
def test_capture_refuses_what_a_replay_would_redo():
    """State made during capture would be zeroed at every replay, and the
    group table's upload cannot be captured: a RuntimeError naming the fix,
    nothing changed, and the capture ends cleanly."""
    p = torch.nn.Parameter(torch.zeros(4, device=DEV))
    q = torch.nn.Parameter(torch.zeros(4, device=DEV))
    opt = FusedOneCycleAdamW([p, q], **SCHED)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="run one step eagerly"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()  # no eager step yet
    opt.step()
    q.grad = torch.ones_like(q)  # q has no state yet
    with pytest.raises(RuntimeError, match="create optimizer state"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert len(opt.state[q]) == 0
    opt.step()
    opt.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(RuntimeError, match="hyper-parameter changed"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    torch.cuda.synchronize()
    assert int(opt.step_counter()) == 2


@gpu
def test_hyper_parameter_change_uploads_the_table_without_a_sync():
    params, opt = _steady_optimizer()
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    opt.param_groups[0]["weight_decay"] = 0.05
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(opt._tables[params[0].device][0, Row.WEIGHT_DECAY].cpu(), torch.tensor(0.05, dtype=torch.float64))


@pytest.mark.gpu
def test_step_counter_of_plain_cuda():
    p = torch.nn.Parameter(torch.zeros(4, device=DEV))
    opt = FusedOneCycleSGD([p], **SCHED)
    assert opt.step_counter("cuda") is opt.step_counter(p.device) is opt.step_counter()


@pytest.mark.gpu
def test_float64_with_float32_on_the_gpu_steps_in_the_cuda_backend_with_one_counter():
    """float64 parameters are the cuda backend's too (float64 math): with
    float32 ones on the same GPU, two launches a step advance one counter,
    and both match the reference."""
    inits = init_values(((10,), (1031,)))
    grads = grad_values(3, ((10,), (1031,)))

    def go(backend):
        params = [make_param(inits[0], torch.float32), make_param(inits[1], torch.float64)]
        opt = FusedOneCycleAdamW(params, backend=backend, **SCHED)
        take_steps(opt, params, grads)
        return params, opt

    ours, opt = go("auto")
    assert opt._backend_for[ours[0].device].name == "cuda"
    assert int(opt.step_counter()) == 3 and list(opt._counters) == [ours[0].device]
    _mirror_matches_counter(opt, SCHED)
    ref, _ = go("reference")
    for p, q in zip(ours, ref):
        assert_close_ulps(p, q)


@pytest.mark.gpu
def test_cpu_checkpoint_loads_onto_gpu_params():
    """A checkpoint saved on the CPU, loaded into an optimizer of GPU params:
    states, per-parameter steps and the counter land on the GPU, and the run
    continues as the CPU one does."""
    torch.manual_seed(0)
    init = torch.randn(33)
    grads = [torch.randn(33) for _ in range(5)]
    cpu_p = torch.nn.Parameter(init.clone())
    cpu_opt = FusedOneCycleAdamW([cpu_p], backend="reference", **SCHED)
    for g in grads[:3]:
        cpu_p.grad = g.clone()
        cpu_opt.step()
    sd = cpu_opt.state_dict()
    gpu_p = torch.nn.Parameter(cpu_p.detach().to(DEV))
    gpu_opt = FusedOneCycleAdamW([gpu_p], backend="reference", **SCHED)
    gpu_opt.load_state_dict(sd)
    st = gpu_opt.state[gpu_p]
    assert all(st[k].device == gpu_p.device for k in ("exp_avg", "exp_avg_sq", "step"))
    assert st["step"].dtype == torch.int64 and gpu_opt.step_counter().device == gpu_p.device
    for g in grads[3:]:
        cpu_p.grad, gpu_p.grad = g.clone(), g.to(DEV)
        cpu_opt.step()
        gpu_opt.step()
    torch.testing.assert_close(gpu_p.detach().cpu(), cpu_p.detach(), rtol=1e-6, atol=1e-7)
    assert int(gpu_opt.step_counter()) == 5
    _mirror_matches_counter(gpu_opt, SCHED)


# ---------------------------------------------------------------------------
# the kernel source emulated on the CPU (runs in CI)

_EMULATION_HEADER = os.path.join(ROOT, "csrc", "cuda", "cpu_emulation.cuh")
_emulation_loaded = False


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """Builds csrc/cuda/cpu_emulation.cuh (~30 s of one core) and registers
    onecycle_fused_emu::step."""
    global _emulation_loaded
    if not _emulation_loaded:
        from torch.utils.cpp_extension import CUDA_HOME, load_inline

        include = os.path.join(CUDA_HOME or "/usr/local/cuda", "include")
        if not os.path.exists(os.path.join(include, "cuda_bf16.h")):
            pytest.skip("the emulation needs the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h)")
        load_inline(
            "onecycle_fused_emu", cpp_sources=[f'#include "{_EMULATION_HEADER}"\n'], is_python_module=False,
            build_directory=str(tmp_path_factory.mktemp("emulation_build")), extra_include_paths=[include],
            # -ffp-contract=off: the shared math must round each operation, as setup.py builds it
            extra_cflags=["-O2", "-ffp-contract=off"], verbose=False,
        )
        _emulation_loaded = True


class EmulatedCUDABackend:
    """The "cuda" backend for CPU tensors: buckets by dtype like
    cuda_impl::prepare_step (float32, float16, bfloat16, float64; the last
    bucket advances the counter) and runs the emulated kernel once per bucket."""

    name = "cuda"
    grid = 0  # blocks per launch; 0: as the CUDA launcher would (min(chunks, 4) here)

    def available(self):
        return True

    order = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def supports(self, device, dtype):
        return dtype in self.order

    def step(self, batch):
        n = len(batch.params)
        none = torch.empty(0)
        if batch.algo == "sgd":
            states = ([none if b is None else b for b in batch.momentum_buffers], [none] * n, [none] * n)
        else:
            states = (batch.exp_avgs, batch.exp_avg_sqs, [none if m is None else m for m in batch.max_exp_avg_sqs])
        buckets = [[i for i, p in enumerate(batch.params) if p.dtype == dt] for dt in self.order]
        buckets = [b for b in buckets if b] or [[]]
        for j, idx in enumerate(buckets):
            def pick(xs):
                return [xs[i] for i in idx]

            torch.ops.onecycle_fused_emu.step(
                "sgd" if batch.algo == "sgd" else "adam", pick(batch.params), pick(batch.grads), pick(states[0]),
                pick(states[1]), pick(states[2]), pick(batch.steps), pick(batch.group_ids), batch.table,
                batch.counter, batch.grad_scale, batch.found_inf, self.grid, j == len(buckets) - 1,
            )


@pytest.fixture
def emulated(emulated_kernel, monkeypatch):
    backend = EmulatedCUDABackend()
    monkeypatch.setitem(_backends._INSTANCES, "cuda", backend)
    return backend


CPU = torch.device("cpu")
# the emulation runs 32-thread blocks: chunks of 512 fp32 / 1024 16-bit /
# 256 fp64 elements. Empty, single, odd, one vector short of a chunk, a chunk and a
# bit, many chunks with a ragged tail.
EMU_SIZES = ((0,), (1,), (7,), (33, 5), (511,), (1027,), (20011,))
EMU_CASES = [(name, cls, kw, dt) for name, cls, kw in CASES
             for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]


@pytest.mark.parametrize("name,cls,kw,dtype", EMU_CASES, ids=[f"{c[0]}-{c[3]}" for c in EMU_CASES])
def test_emulated_kernel_matches_reference(emulated, name, cls, kw, dtype):
    compare_runs(cls, kw, dtype, sizes=EMU_SIZES, device=CPU)


@pytest.mark.skipif(not _ops.cpu_library_loaded(), reason="onecycle_fused._C is not built")
@pytest.mark.parametrize("name,cls,kw", CASES, ids=[c[0] for c in CASES])
def test_emulated_float64_equals_the_cpu_op(emulated, name, cls, kw):
    """In float64 the kernel (emulated) and the cpu op share update.h's
    math and the float64 schedule: the same bits, params and states, as the
    README says."""
    inits = init_values(EMU_SIZES, device=CPU)
    grads = grad_values(STEPS, EMU_SIZES, device=CPU)
    ours, opt = run(cls, "cuda", inits, grads, torch.float64, **kw)
    cpu, cpu_opt = run(cls, "cpu", inits, grads, torch.float64, **kw)
    for p, q in zip(ours, cpu):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == cpu_opt.state[q].keys()
        for k in STATE_KEYS:
            if k in opt.state[p]:
                assert torch.equal(opt.state[p][k], cpu_opt.state[q][k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_emulated_misaligned_scalar_path(emulated, dtype):
    compare_runs(FusedOneCycleAdamW, dict(SCHED, amsgrad=True), dtype, sizes=((1,), (8,), (9001,), (4, 1031)),
                 misaligned=(0, 2, 3), steps=4, device=CPU)


@pytest.mark.parametrize("grid", [1, 2, 7])
def test_emulated_grid_stride_and_last_block(emulated, grid):
    """One block doing every chunk, two blocks, and more blocks than some
    buckets have chunks: every chunk is updated once, every step count and
    the counter advance once."""
    emulated.grid = grid
    many_tensors_case(150, CPU, steps=3)


def test_emulated_params_without_grads(emulated):
    params_without_grads_case(CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdam])
def test_emulated_grad_scaler_with_forced_infs(emulated, cls, dtype):
    grad_scaler_case(cls, CPU, dtype)


# ---------------------------------------------------------------------------
# emulated edge cases: alignment, chunk boundaries, step counts, skipped steps


def _offset_view(value, dtype, offset):
    """``value`` in a tensor whose data starts ``offset`` elements into its
    storage (offset 0: a fresh, 16-byte aligned allocation)."""
    base = torch.empty(value.numel() + offset, dtype=dtype, device=value.device)
    view = base[offset:].view(value.shape)
    view.copy_(value)
    return view


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(SCHED, nesterov=True, weight_decay=0.01)),
                                    (FusedOneCycleAdamW, dict(SCHED, weight_decay=0.1, amsgrad=True))],
                         ids=["sgd", "adamw"])
def test_emulated_mixed_alignment_in_one_launch(emulated, cls, kw, dtype):
    """One launch over tensors whose parameter, grad or state starts 2, 4, 8
    or 16 bytes off a 16-byte boundary next to aligned ones: the vector path
    is taken only where all of a tensor's pointers are 16-byte aligned (a
    misaligned one would raise here, as it would fault on a GPU), and every
    tensor is updated like the reference does."""
    emulated.grid = 3
    sizes = ((1031,), (4, 517), (2053,), (16,), (1,), (9,))
    # (param offset, grad offset) in elements; 16-bit: 2, 8, 14 bytes; fp32: 4, 16 (aligned), 28;
    # fp64: 8, 32 (aligned), 56
    offsets = ((1, 0), (0, 1), (4, 4), (7, 0), (0, 0), (1, 1))
    inits = init_values(sizes, device=CPU)
    grads = grad_values(4, sizes, device=CPU)

    def go(backend):
        params = [torch.nn.Parameter(_offset_view(v, dtype, po)) for v, (po, _) in zip(inits, offsets)]
        opt = cls(params, backend=backend, **kw)
        for i, step_grads in enumerate(grads):
            for p, g, (_, go_) in zip(params, step_grads, offsets):
                p.grad = _offset_view(g.to(dtype), dtype, go_)
            opt.step()
            if i == 0:  # state tensors off the boundary too, as a state loaded into views would be
                for p in params[2:4]:
                    for key in STATE_KEYS:
                        if key in opt.state[p]:
                            opt.state[p][key] = _offset_view(opt.state[p][key], dtype, 3)
        return params, opt

    ours, opt = go("cuda")
    ref, ref_opt = go("reference")
    assert int(opt.step_counter()) == 4
    for p, q in zip(ours, ref):
        if dtype in (torch.float32, torch.float64):
            assert_close_ulps(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=2 * 2**-8, atol=1e-3)
        assert int(opt.state[p]["step"]) == 4


@pytest.mark.parametrize("grid", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_chunk_boundaries(emulated, grid, dtype):
    """Sizes at and around multiples of the chunk (512 fp32 / 1024 16-bit /
    256 fp64 elements in the emulation) and of the vector, with one block or
    more blocks than some tensors have chunks."""
    emulated.grid = grid
    sizes = ((511,), (512,), (513,), (1023,), (1024,), (1025,), (2048,), (3,), (0,), (4,))
    compare_runs(FusedOneCycleAdam, dict(SCHED, amsgrad=True), dtype, sizes=sizes, steps=3, device=CPU)


@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, dict(SCHED, dampening=0.2)),
                                    (FusedOneCycleAdam, dict(SCHED, weight_decay=0.05))], ids=["sgd", "adam"])
def test_emulated_step_counts_differ_within_a_block(emulated, cls, kw):
    """Parameters of one group that got their first grad at different steps
    have different step counts (SGD's first-step rule, Adam's bias
    corrections): one block walks all their chunks and must not reuse one
    tensor's per-chunk coefficients for another."""
    emulated.grid = 1
    sizes = ((5,), (600,), (7,), (1100,), (3,))
    inits = init_values(sizes, device=CPU)
    grads = grad_values(6, sizes, device=CPU)

    def go(backend):
        params = [make_param(v, torch.float32) for v in inits]
        opt = cls(params, backend=backend, **kw)
        for i, step_grads in enumerate(grads):
            for j, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = g.float() if j <= i else None  # param j joins at step j
            opt.step()
        return params, opt

    ours, opt = go("cuda")
    ref, ref_opt = go("reference")
    for j, (p, q) in enumerate(zip(ours, ref)):
        assert_close_ulps(p, q)
        assert int(opt.state[p]["step"]) == int(ref_opt.state[q]["step"]) == 6 - j


@pytest.mark.parametrize("grid", [1, 3])
def test_emulated_skipped_step_with_several_buckets(emulated, grid):
    """found_inf set: no launch of any dtype bucket changes a parameter, a
    state, a step count or the counter; the next step runs normally."""
    emulated.grid = grid
    sizes = ((700,), (33, 5), (0,), (2100,), (300,))
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float16, torch.float64)
    inits = init_values(sizes, device=CPU)
    params = [make_param(v, dt) for v, dt in zip(inits, dtypes)]
    opt = FusedOneCycleAdamW(params, backend="cuda", **dict(SCHED, amsgrad=True))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()

    def snapshot():
        return [t.clone() for p in params for t in [p.detach(), *opt.state[p].values()]]

    before = snapshot()
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.full((), 4.0)
    try:
        opt.step()
    finally:
        del opt.found_inf, opt.grad_scale
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(opt.step_counter()) == 1
    opt.step()
    assert int(opt.step_counter()) == 2 and all(int(opt.state[p]["step"]) == 2 for p in params)


def test_emulated_only_empty_tensors(emulated):
    """Every parameter empty: no chunk at all, one block; the step counts and
    the counter still advance."""
    params = [make_param(torch.zeros(s), dt) for s, dt in (((0,), torch.float32), ((0, 3), torch.bfloat16))]
    opt = FusedOneCycleAdam(params, backend="cuda", **SCHED)
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert int(opt.step_counter()) == 2 and all(int(opt.state[p]["step"]) == 2 for p in params)


def test_emulated_many_small_tensors(emulated):
    """5,000 tensors of 0-6 elements in one launch: one chunk each, the
    grid-stride loop over thousands of chunks per block and a binary search
    over a long chunk table."""
    emulated.grid = 4
    g = torch.Generator().manual_seed(11)
    sizes = [(int(torch.randint(0, 7, (1,), generator=g)),) for _ in range(5000)]
    compare_runs(FusedOneCycleSGD, dict(SCHED, nesterov=True), torch.float32, sizes=sizes, steps=2, device=CPU)


@gpu
@pytest.mark.parametrize("cls, kw", [
    (FusedOneCycleSGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    (FusedOneCycleAdam, {}),
    (FusedOneCycleAdamW, dict(amsgrad=True, weight_decay=0.01)),
], ids=["sgd-nesterov", "adam", "adamw-amsgrad"])
def test_torch_compile_fullgraph_of_the_step_equals_eager(cls, kw):
    """The default GPU backend (auto picks cuda) under torch.compile with
    fullgraph=True, as the README shows it: the same op as eager, so equal
    bit for bit, fp32 and bf16 parameters in one group, the counter and the
    lr mirror (read outside the graph) too. Until the third H100 session
    only the triton op had been compiled on a GPU."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g).to(dt)
            for s, dt in (((5,), torch.float32), ((4097,), torch.bfloat16), ((33, 7), torch.float32))]
    grads = [[torch.randn(t.shape, device="cuda", generator=g).to(t.dtype) for t in init] for _ in range(6)]
    out = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls(params, backend="cuda", **SCHED, **kw)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        lrs = []
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr
            step()
            lrs.append(opt.get_last_lr())
        states = [v for p in params for _, v in sorted(opt.state[p].items())]
        out.append((params + states, int(opt.step_counter()), lrs))
    (a, count_a, lrs_a), (b, count_b, lrs_b) = out
    assert count_a == count_b == len(grads) and lrs_a == lrs_b
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch._dynamo.reset()
