"""The Triton backend on a GPU (tests marked ``gpu``; they skip without CUDA),
plus a compile-only check that runs in CI without a GPU.

On a GPU machine: ``python -m pytest tests/test_triton_gpu.py tests/test_triton.py``
(the second file then runs its interpreter tests on CUDA tensors, compiled).
"""
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD  # noqa: E402
from onecycle_fused.backends import triton_kernels as tk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, cycle_second_step_size=7,
             cycle_first_stair_count=3, decay_step_size=2, decay_lr_rate=0.3, cycle_min_mom=0.8, cycle_max_mom=0.95)
# ResNet-like mix: big, odd and tiny tensors, one empty, several chunks each
SIZES = (0, 1, 3, 64, 1000, 4097, 65536 + 3, 1 << 20)


# ---------------------------------------------------------------------------
# compile-only (CI, no GPU): the kernels lower to PTX for an H100


def _compile(kernel, dtype, aligned, has_scale):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"tensors": "*i64", "n_tensors": "i32", "chunks": "*i64", "n_chunks": "i32", "rows": "*fp64",
           "counter_ptr": "*i64", "scale_ptr": "*fp32", "inf_ptr": "*fp32", "done_ptr": "*i64",
           "dtype_ref": f"*{dtype}"}
    const = {"HAS_SCALE": has_scale, "HAS_INF": has_scale, "ADVANCE_COUNTER": True, "ALIGNED": aligned,
             "ROUND_BF16": False, "BLOCK": 512, "ITERS": 8}
    names = list(sig) + list(const)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})


@triton.jit
def _cos_only(x_ptr, out_ptr):
    tl.store(out_ptr, tl.cos(tl.load(x_ptr)))


def _libdevice_cos_fmas() -> int:
    """fma.rn.f64 in libdevice's float64 cos (__nv_cos) as compiled alone:
    its argument reduction and polynomial use FMAs on purpose."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_cos_only, signature={"x_ptr": "*fp64", "out_ptr": "*fp64"}, constexprs={})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    return ptx.count("fma.rn.f64")


@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process (TRITON_INTERPRET=1)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests below compile and run the kernels")
@pytest.mark.parametrize("kernel,dtype,aligned,has_scale", [
    ("sgd_kernel", "fp32", True, False),
    ("sgd_kernel", "bf16", False, True),
    ("adam_kernel", "fp16", True, True),
    ("adam_kernel", "fp32", False, False),
])
def test_kernels_compile_for_sm90(kernel, dtype, aligned, has_scale):
    """What the interpreter cannot show: the kernels compile for sm_90, keep
    IEEE float32 division / sqrt, contract nothing into an FMA beyond the
    explicit ones (float64 schedule bit-exact with the reference) and use
    vector accesses when the host says the addresses are 16-byte aligned."""
    try:
        compiled = _compile(getattr(tk, kernel), dtype, aligned, has_scale)
    except (ImportError, AttributeError, TypeError) as e:  # another triton's AOT API
        pytest.skip(f"triton {triton.__version__} AOT API differs: {e}")
    ptx = compiled.asm["ptx"]
    # the only float64 FMAs are those of TorchOneCycle's cos (libdevice's,
    # one call per program): the schedule's own operations are not contracted
    assert ptx.count("fma.rn.f64") == _libdevice_cos_fmas() > 0
    # float32 FMAs: only the explicit tl.fma where torch fuses (SGD: weight
    # decay, buffer, nesterov, param; Adam: weight decay, lerp's two formulas,
    # addcmul), each for 4 elements per thread (512 over 128 threads) in the
    # masked and the unmasked block: no other a*b+c was contracted
    assert ptx.count("fma.rn.f32") == 4 * 4 * 2
    assert "sqrt.approx" not in ptx and "div.full" not in ptx and "div.approx" not in ptx
    # 512 elements over 128 threads: v4.b32 for float32, v2.b32 (8 bytes) for 16-bit types
    vector = re.search(r"ld\.global(\.[a-z]+)*\.v[24]\.b32", ptx) is not None
    assert vector == aligned


@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process (TRITON_INTERPRET=1)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests below compile and run the kernels")
@pytest.mark.parametrize("kernel", ["sgd_kernel", "adam_kernel"])
def test_float64_kernels_compile_for_sm90_in_float64(kernel):
    """float64 parameters: the update in float64 with IEEE division and
    square root, FMAs only where the float32 kernels have them (4 a element,
    4 elements a thread, masked and unmasked blocks) besides libdevice's
    cos and, in Adam, the double-double powers' four products, no float32
    math (GradScaler's float32 scale converted up is the one .f32
    instruction), and 16-byte element accesses only where the host says the
    addresses are aligned."""
    try:
        aligned = _compile(getattr(tk, kernel), "fp64", True, True).asm["ptx"]
        unaligned = _compile(getattr(tk, kernel), "fp64", False, True).asm["ptx"]
    except (ImportError, AttributeError, TypeError) as e:  # another triton's AOT API
        pytest.skip(f"triton {triton.__version__} AOT API differs: {e}")
    for ptx in (aligned, unaligned):
        powers = 4 if kernel == "adam_kernel" else 0
        assert ptx.count("fma.rn.f64") == _libdevice_cos_fmas() + 4 * 4 * 2 + powers
        assert set(re.findall(r"[\w.]*\.f32\b", ptx)) == {"cvt.f64.f32"}, sorted(set(re.findall(r"[\w.]*\.f32\b", ptx)))
        assert "approx" not in ptx and "div.full" not in ptx
    vectors = [len(re.findall(r"ld\.global(\.[a-z]+)*\.v2\.b64", ptx)) for ptx in (aligned, unaligned)]
    assert vectors[0] > vectors[1], vectors


# ---------------------------------------------------------------------------
# on the GPU


def _pair(cls, kw, dtype, sizes=SIZES, steps=12, seed=0):
    """(triton params, reference params, triton opt, reference opt) after ``steps`` steps."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    # drawn in float64, so that float64 parameters get float64's precision
    init = [torch.randn(s, device="cuda", generator=g, dtype=torch.float64).to(dtype) for s in sizes]
    grads = [[torch.randn(s, device="cuda", generator=g, dtype=torch.float64).to(dtype) for s in sizes]
             for _ in range(steps)]
    out = []
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls(params, backend=backend, **kw)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr
            opt.step()
        out.append((params, opt))
    (a, oa), (b, ob) = out
    return a, b, oa, ob


def _assert_ulps(xs, ys, ulps):
    for x, y in zip(xs, ys):
        if y.numel() == 0:
            continue
        eps = torch.finfo(y.dtype).eps
        x64, y64 = x.detach().double(), y.detach().double()
        tol = ulps * eps * (y64.abs() + 0.1 * y64.abs().max())
        assert ((x64 - y64).abs() <= tol).all(), (x64 - y64).abs().max().item()


CASES = [
    (FusedOneCycleSGD, dict(nesterov=True, weight_decay=0.01)),
    (FusedOneCycleSGD, dict(dampening=0.2, maximize=True)),
    (FusedOneCycleAdam, dict(amsgrad=True, weight_decay=0.01)),
    (FusedOneCycleAdamW, dict(maximize=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("cls,kw", CASES, ids=["sgd-nesterov", "sgd-dampening", "adam-amsgrad", "adamw"])
def test_against_reference(cls, kw, dtype):
    a, b, oa, ob = _pair(cls, dict(SCHED, **kw), dtype)
    assert int(oa.step_counter()) == int(ob.step_counter()) == 12
    # float64: the reference's bias corrections take CUDA's pow (up to 2 ulps
    # off), ours a correctly rounded one, and 1 - beta**t magnifies that
    # difference up to ~100x in early steps; float32 math would be ~1e9 ulps off
    ulps = {torch.float32: 8, torch.float64: 64}.get(dtype, 2)
    _assert_ulps(a, b, ulps=ulps)


@pytest.mark.gpu
def test_no_host_sync():
    """Steps, including a launch-table rebuild and GradScaler inputs, never synchronise."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SIZES]
    opt = FusedOneCycleAdamW(params, backend="triton", **SCHED)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(3):
            for p in params:
                p.grad = torch.randn_like(p)  # new storages: the table is rebuilt
            # torch.full, not torch.tensor(..., device="cuda"): the latter copies
            # from pageable host memory and synchronises (pytorch#120996)
            opt.grad_scale = torch.full((), 2.0, device="cuda")
            opt.found_inf = torch.full((), float(k == 1), device="cuda")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(opt.step_counter()) == 3


def _eager_run(cls, kw, init, grads):
    """Params cloned from ``init``, stepped eagerly with each list of ``grads``: (params, optimizer)."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(params, backend="triton", **kw)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    return params, opt


def _assert_same_run(params, opt, eager, opt_e, steps):
    """Bit for bit the eager run: parameters, every state tensor, the step count."""
    assert int(opt.step_counter()) == int(opt_e.step_counter()) == steps
    for x, y in zip(params, eager):
        assert torch.equal(x, y)
        for key, v in opt_e.state[y].items():
            assert torch.equal(opt.state[x][key], v), key


def _on_side_stream(fn):
    """``fn()`` on a side stream, ordered after the current stream's work and
    before its next: torch's warm-up before a CUDA-graph capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _replay_with(graph, sources, grads):
    """Replay ``graph`` once per list in ``grads``, copied first into the
    tensors the graph reads its grads from (``sources``)."""
    for step_grads in grads:
        for s, gr in zip(sources, step_grads):
            s.copy_(gr)
        graph.replay()


def _captured_step(cls, kw, init, first_grads):
    """Params cloned from ``init`` with static grads, one warm-up step on a side
    stream (state, kernels and launch table exist before capture), then one
    ``step()`` captured: (params, optimizer, static grads, graph)."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(params, backend="triton", **kw)
    static = [torch.zeros_like(t) for t in init]
    for p, s in zip(params, static):
        p.grad = s

    def warm_up():
        for s, gr in zip(static, first_grads):
            s.copy_(gr)
        opt.step()

    _on_side_stream(warm_up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return params, opt, static, graph


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [CASES[0], CASES[2]], ids=["sgd", "adam"])
def test_cuda_graph_replay_equals_eager(cls, kw):
    """Capture one step, replay it: bit for bit the eager run, the schedule advancing on the device."""
    kw = dict(SCHED, **kw)
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g) for s in SIZES]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in SIZES] for _ in range(20)]

    eager, opt_e = _eager_run(cls, kw, init, grads)

    graphed, opt_g, static, graph = _captured_step(cls, kw, init, grads[0])
    _replay_with(graph, static, grads[1:])
    torch.cuda.synchronize()
    _assert_same_run(graphed, opt_g, eager, opt_e, steps=20)


@pytest.mark.gpu
def test_cuda_graph_survives_other_optimizers_launch_tables():
    """The launch-table cache keeps 4 tables per (algorithm, dtype, device),
    shared by every optimizer. A graph captured with one of them must keep
    replaying correctly after other optimizers' tables pushed it out of that
    cache and their memory was reused."""
    from onecycle_fused.backends import triton as tb

    g = torch.Generator(device="cuda").manual_seed(1)
    init = [torch.randn(s, device="cuda", generator=g) for s in (70, 4097)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]
    eager = [torch.nn.Parameter(t.clone()) for t in init]
    opt_e = FusedOneCycleSGD(eager, backend="triton", **SCHED)
    graphed, opt_g, static, graph = _captured_step(FusedOneCycleSGD, SCHED, init, grads[0])
    for i in range(tb._CACHE_ENTRIES + 2):  # other parameter sets evict the captured table from the LRU
        ps = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in (3 + i, 9)]
        for p in ps:
            p.grad = torch.ones_like(p)
        FusedOneCycleSGD(ps, backend="triton", **SCHED).step()
    tb._launcher.clear_cache()
    junk = [torch.full((1 << 16,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]  # reuse freed blocks
    for k, step_grads in enumerate(grads):
        for p, gr in zip(eager, step_grads):
            p.grad = gr.clone()
        opt_e.step()
        if k > 0:
            _replay_with(graph, static, [step_grads])
    torch.cuda.synchronize()
    del junk
    assert int(opt_g.step_counter()) == int(opt_e.step_counter()) == 4
    for x, y in zip(graphed, eager):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [CASES[0], CASES[2]], ids=["sgd", "adam"])
def test_grads_allocated_during_capture_replay_equal_eager(cls, kw):
    """README: grads made inside the capture (new addresses, from the graph's
    pool, as after ``zero_grad(set_to_none=True)``) get a launch table built
    while capturing, filled by a captured copy from the warm-up table's spare
    pinned buffer. An eager step with those grads before the first replay
    fills it too; replays then equal the eager run bit for bit."""
    kw = dict(SCHED, **kw)
    g = torch.Generator(device="cuda").manual_seed(2)
    sizes = (3, 1000, 4097)
    init = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in sizes] for _ in range(6)]

    eager, opt_e = _eager_run(cls, kw, init, grads)

    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(params, backend="triton", **kw)
    sources = [torch.empty_like(t) for t in init]

    def warm_up():  # state, and a launch table with a spare of the same size
        for p, gr in zip(params, grads[0]):
            p.grad = gr.clone()
        opt.step()

    _on_side_stream(warm_up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, src in zip(params, sources):
            p.grad = src * 1  # new storages: the table is built while capturing
        opt.step()
    for p, gr in zip(params, grads[1]):
        p.grad.copy_(gr)  # the capture's grads, an eager step before any replay
    opt.step()
    _replay_with(graph, sources, grads[2:])
    torch.cuda.synchronize()
    _assert_same_run(params, opt, eager, opt_e, steps=6)


@pytest.mark.gpu
def test_capture_without_a_warm_up_table_is_refused():
    """With no eager table of the same size in the bucket (here: the cache
    cleared after the warm-up) a table built while capturing has no pinned
    buffer to copy from: RuntimeError, raised before anything is launched."""
    from onecycle_fused.backends import triton as tb

    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in (70, 4097)]
    opt = FusedOneCycleSGD(params, backend="triton", **SCHED)

    def warm_up():  # state and a launch table for these grads
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()

    _on_side_stream(warm_up)
    tb._launcher.clear_cache()
    with pytest.raises(RuntimeError, match="no pinned buffer"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()


@pytest.mark.gpu
def test_torch_compile_traces_the_op():
    """torch.compile sees the custom op (declared mutations) and gives the eager result."""
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = (5, 4097)
    init = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    grads = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    ref_opt = FusedOneCycleSGD([torch.nn.Parameter(torch.zeros(1, device="cuda"))], backend="reference", **SCHED)
    ref_opt._refresh_tables()
    table = ref_opt._tables[torch.device("cuda", torch.cuda.current_device())]

    def step(params, bufs, steps, counter):
        torch.ops.onecycle_fused_triton.step("sgd", params, grads, bufs, [], [], [1, 1], steps, [0, 0], table,
                                             counter, None, None)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):  # inductor
        params = [t.clone() for t in init]
        bufs = [torch.zeros_like(t) for t in init]
        steps = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in init]
        counter = torch.zeros((), dtype=torch.int64, device="cuda")
        for _ in range(3):
            fn(params, bufs, steps, counter)
        results.append(params + bufs + steps + [counter])
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_torch_compile_optimizer_step():
    """The whole optimizer step under torch.compile (inductor) equals eager."""
    g = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=g) for s in (5, 4097)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]
    out = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = FusedOneCycleAdamW(params, backend="triton", amsgrad=True, **SCHED)
        step = torch.compile(opt.step) if compiled else opt.step
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr
            step()
        out.append(params + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")])
    for x, y in zip(*out):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_int64_offsets():
    """A tensor past 2**31 elements: its last elements are updated (int64 indexing)."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (1 << 30):
        pytest.skip("needs ~13 GB of free GPU memory")
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones_like(p)
    p.grad[-3:] = torch.tensor([2.0, 4.0, 8.0], device="cuda")
    # plain SGD (no buffer): p <- p - lr * g with lr = cycle_min_lr at step 0
    opt = FusedOneCycleSGD([p], backend="triton", cycle_min_lr=0.125, cycle_max_lr=0.5, cycle_momentum=False)
    opt.step()
    tail = p.detach()[-4:].float().cpu()
    assert torch.equal(tail, torch.tensor([1 - 0.125, 1 - 0.25, 1 - 0.5, 1 - 1.0]))
    assert p.detach()[:4].float().cpu().eq(0.875).all()
    del p, opt
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_other_device_index():
    """Parameters on a non-current GPU are launched under that device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    a, b, _, _ = _pair(FusedOneCycleSGD, SCHED, torch.float32, sizes=(7, 70), steps=3)
    params = [torch.nn.Parameter(t.detach().to("cuda:1")) for t in a]
    opt = FusedOneCycleSGD(params, backend="triton", **SCHED)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert int(opt.step_counter()) == 1

