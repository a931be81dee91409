"""Triton kernels: one launch updates every tensor of a (device, dtype) bucket.

Launch layout. The host (``backends/triton.py``) builds one int64 "launch
table" per bucket and keeps it on the device while the storages stay put:

* ``T_WIDTH`` int64 per tensor: addresses of param, grad, the three state
  tensors (SGD: momentum buffer; Adam: exp_avg, exp_avg_sq, max_exp_avg_sq;
  an absent state holds the param's address, which is how the kernels tell
  it is absent: it is never read or written), the
  element count, the parameter group (row of the float64 schedule table) and
  the address of the per-parameter int64 ``step``;
* ``C_WIDTH`` int64 per chunk: the tensor index and the chunk's first element;
* one int64 "done" slot, see ``_finish``.

Program ``pid`` updates chunk ``pid``: ``ITERS`` blocks of ``BLOCK`` elements.
Addresses come out of the table as integers and are turned into typed
pointers with ``.to(tl.pointer_type(...))``, which works compiled and in the
interpreter (``TRITON_INTERPRET=1``, on CPU tensors).

Every program evaluates lr and momentum in float64 from the counter and its
group's row, with the operations of ``reference.schedule_values`` in the same
order; nothing comes from the host per step. Division denominators that can
be 0 in a branch that is *not* selected are replaced by 1 so that the
interpreter (numpy) raises no warnings; the selected values are unchanged.

The element-wise math mirrors ``backends/reference.py`` (torch.optim's
single-tensor code) in float32 (in float64 for float64 parameters:
``_opmath``), with IEEE division and square root
(``div_rn`` / ``sqrt_rn``) where torch uses them: Triton's plain ``/`` and
``sqrt`` on float32 are the approximate PTX instructions (on float64 they
are IEEE), and an explicit
``tl.fma`` exactly where torch's CPU kernels (and ``csrc/update.h``) fuse:
``add(x, alpha=a)``, ``lerp`` and ``addcmul``; so fp32 SGD equals
``torch.optim.SGD`` bit for bit (triton 3.9's interpreter rounds ``fma``
once too; 3.6's rounds the product first).
The host launches with ``enable_fp_fusion=False``: no other ``a*b+c`` is
contracted into an FMA, so compiled kernels round exactly like the
interpreter (numpy) that CI runs, and
the float64 schedule equals the reference's bit for bit (checked in the PTX
for sm_90 with triton 3.9: no ``fma.rn.f64``, v4 loads when aligned). The
one exception is TorchOneCycle's ``cos``: ``tl.cos`` on float64 compiles to
libdevice's ``__nv_cos``, whose own argument reduction and polynomial use
``fma.rn.f64`` (the only ones in the PTX, triton 3.9, sm_90, compiled
without a GPU by ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``);
its result may differ from ``math.cos`` by an ulp or so, like CUDA's ``cos``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..schedule import ANNEAL_LINEAR, KIND_LRRANGETEST, KIND_ONECYCLE, KIND_TORCH_ONECYCLE, Row

# -- launch-table layout (mirrored by backends/triton.py) -------------------
T_PARAM, T_GRAD, T_STATE1, T_STATE2, T_STATE3, T_NUMEL, T_GROUP, T_STEP = range(8)
T_WIDTH = 8
C_WIDTH = 2

# jit functions may only read module globals that are constexpr
_T_PARAM = tl.constexpr(T_PARAM)
_T_GRAD = tl.constexpr(T_GRAD)
_T_STATE1 = tl.constexpr(T_STATE1)
_T_STATE2 = tl.constexpr(T_STATE2)
_T_STATE3 = tl.constexpr(T_STATE3)
_T_NUMEL = tl.constexpr(T_NUMEL)
_T_GROUP = tl.constexpr(T_GROUP)
_T_STEP = tl.constexpr(T_STEP)
_T_WIDTH = tl.constexpr(T_WIDTH)
_C_WIDTH = tl.constexpr(C_WIDTH)
_ROW_WIDTH = tl.constexpr(24)  # schedule.ROW_WIDTH, checked by backends/triton.py

_KIND = tl.constexpr(Row.KIND)
_FIRST_STEP_SIZE = tl.constexpr(Row.FIRST_STEP_SIZE)
_SECOND_STEP_SIZE = tl.constexpr(Row.SECOND_STEP_SIZE)
_FIRST_STAIR_COUNT = tl.constexpr(Row.FIRST_STAIR_COUNT)
_SECOND_STAIR_COUNT = tl.constexpr(Row.SECOND_STAIR_COUNT)
_DECAY_STEP_SIZE = tl.constexpr(Row.DECAY_STEP_SIZE)
_MIN_LR = tl.constexpr(Row.MIN_LR)
_MAX_LR = tl.constexpr(Row.MAX_LR)
_DECAY_LR_RATE = tl.constexpr(Row.DECAY_LR_RATE)
_MIN_MOM = tl.constexpr(Row.MIN_MOM)
_MAX_MOM = tl.constexpr(Row.MAX_MOM)
_DECAY_MOM_RATE = tl.constexpr(Row.DECAY_MOM_RATE)
_CYCLE_MOMENTUM = tl.constexpr(Row.CYCLE_MOMENTUM)
_MOMENTUM = tl.constexpr(Row.MOMENTUM)
_WEIGHT_DECAY = tl.constexpr(Row.WEIGHT_DECAY)
_DAMPENING = tl.constexpr(Row.DAMPENING)
_NESTEROV = tl.constexpr(Row.NESTEROV)
_MAXIMIZE = tl.constexpr(Row.MAXIMIZE)
_BETA2 = tl.constexpr(Row.BETA2)
_EPS = tl.constexpr(Row.EPS)
_DECOUPLED = tl.constexpr(Row.DECOUPLED)
_KIND_ONECYCLE = tl.constexpr(KIND_ONECYCLE)
_KIND_LRRANGETEST = tl.constexpr(KIND_LRRANGETEST)
_KIND_TORCH_ONECYCLE = tl.constexpr(KIND_TORCH_ONECYCLE)
_ANNEAL_LINEAR = tl.constexpr(ANNEAL_LINEAR)
_PI = tl.constexpr(3.141592653589793)  # math.pi

# how many step pointers the last program advances per iteration
_STEPS_BLOCK = tl.constexpr(128)


@triton.jit
def schedule_values(row, k_int):
    """(lr, momentum) in float64 for the group whose row starts at ``row``,
    after ``k_int`` (int64) applied steps: ``reference.schedule_values``.

    ``tl.where(d == 0, 1.0, d)`` guards a denominator that is 0 only where its
    branch is then discarded (the interpreter would warn); selected values are
    unchanged.
    """
    k = k_int.to(tl.float64)
    kind = tl.load(row + _KIND)
    torch_kind = kind == _KIND_TORCH_ONECYCLE
    # a TorchOneCycle row keeps other numbers in these columns (phase ends,
    # any sign, not integers): the OneCycle / LRRangeTest branches, discarded
    # for it, get harmless ones so that no modulo or division by 0 happens
    first = tl.where(torch_kind, 1.0, tl.load(row + _FIRST_STEP_SIZE))
    second = tl.where(torch_kind, 1.0, tl.load(row + _SECOND_STEP_SIZE))
    first_stairs = tl.load(row + _FIRST_STAIR_COUNT)
    min_lr = tl.load(row + _MIN_LR)
    lr_rate = tl.load(row + _DECAY_LR_RATE)
    # ---- OneCycle, cycle phase
    total = first + second
    ratio = first / total
    cycle = tl.floor(1 + k / total)
    x = 1.0 + k / total - cycle
    rising = x <= ratio
    # ratio == 1 (second == 0) means always rising
    scale = tl.where(rising, x / ratio, (x - 1) / tl.where(ratio == 1, 1.0, ratio - 1))
    stairs = tl.where(rising, first_stairs, tl.load(row + _SECOND_STAIR_COUNT))
    # k mod total, exactly, in integers (both are integral and k >= 0, total >= 1)
    c = (k_int % total.to(tl.int64)).to(tl.float64)
    pos = tl.where(c <= first, c * stairs / first, (total - c) * stairs / tl.where(second == 0, 1.0, second))
    scale = tl.where(stairs > 0, tl.floor(pos) / tl.where(stairs == 0, 1.0, stairs), scale)
    max_lr = tl.load(row + _MAX_LR)
    min_mom = tl.load(row + _MIN_MOM)
    max_mom = tl.load(row + _MAX_MOM)
    cycle_lr = min_lr + (max_lr - min_lr) * scale
    cycle_mom = max_mom - (max_mom - min_mom) * scale
    # ---- OneCycle, decay phase (interval < 0 inside the cycle, then discarded)
    decay_step = tl.load(row + _DECAY_STEP_SIZE)
    interval = (k - total) / tl.where(decay_step == 0, 1.0, decay_step)
    mom_rate = tl.load(row + _DECAY_MOM_RATE)
    lr_div = 1 + lr_rate * interval
    mom_div = 1 + mom_rate * interval
    decay_lr = tl.where((decay_step != 0) & (lr_rate != 0), min_lr / tl.where(lr_div == 0, 1.0, lr_div), min_lr)
    decay_mom = tl.where((decay_step != 0) & (mom_rate != 0), max_mom / tl.where(mom_div == 0, 1.0, mom_div), max_mom)
    in_cycle = k <= total
    onecycle_lr = tl.where(in_cycle, cycle_lr, decay_lr)
    onecycle_mom = tl.where(in_cycle, cycle_mom, decay_mom)
    # ---- LRRangeTest: FIRST_STEP_SIZE holds step_size, FIRST_STAIR_COUNT staircase
    rt_interval = k / first
    rt_interval = tl.where(first_stairs != 0, tl.floor(rt_interval), rt_interval)
    range_lr = min_lr * (1 + lr_rate * rt_interval)

    # ---- TorchOneCycle
    torch_lr, torch_mom = _torch_onecycle_values(row, k)

    lr = tl.where(kind == _KIND_LRRANGETEST, range_lr, onecycle_lr)
    lr = tl.where(torch_kind, torch_lr, lr)
    mom = tl.where(torch_kind, torch_mom, onecycle_mom)
    scheduled_mom = (kind != _KIND_LRRANGETEST) & (tl.load(row + _CYCLE_MOMENTUM) != 0)
    mom = tl.where(scheduled_mom, mom, tl.load(row + _MOMENTUM))
    return lr, mom


@triton.jit
def _torch_anneal(start, end, pct, cos_out, linear):
    """torch's OneCycleLR._annealing_linear / _annealing_cos (``cos_out`` =
    ``cos(pi * pct) + 1``), operation for operation."""
    return tl.where(linear, (end - start) * pct + start, end + (start - end) / 2.0 * cos_out)


@triton.jit
def _torch_onecycle_values(row, k):
    """``reference._torch_onecycle_values`` for one row (columns: schedule.Row).

    cos is ``tl.cos``: numpy's in the interpreter, libdevice's ``__nv_cos``
    compiled for float64; either may differ from Python's ``math.cos`` by an
    ulp or so.
    """
    end1 = tl.load(row + _FIRST_STEP_SIZE)
    end2 = tl.load(row + _SECOND_STEP_SIZE)
    last_end = tl.load(row + _DECAY_STEP_SIZE)
    three = tl.load(row + _SECOND_STAIR_COUNT) != 0
    initial_lr = tl.load(row + _MIN_LR)
    max_lr = tl.load(row + _MAX_LR)
    min_lr = tl.load(row + _DECAY_LR_RATE)
    base_mom = tl.load(row + _MIN_MOM)
    max_mom = tl.load(row + _MAX_MOM)
    # past the end (torch raises there) the values of k = T - 1 hold
    k = tl.where(k > tl.load(row + _DECAY_MOM_RATE), last_end, k)
    in_first = k <= end1
    # two phases: phase 2 ends where phase 1 does, so no k falls in it. (The
    # interpreter cannot `&` a scalar flag with a block of k, hence no flags.)
    in_second = (k > end1) & (k <= tl.where(three, end2, end1))
    start = tl.where(in_first, 0.0, tl.where(in_second, end1, tl.where(three, end2, end1)))
    end = tl.where(in_first, end1, tl.where(in_second, end2, last_end))
    lr_from = tl.where(in_first, initial_lr, tl.where(in_second, max_lr, tl.where(three, initial_lr, max_lr)))
    lr_to = tl.where(in_first, max_lr, tl.where(in_second, initial_lr, min_lr))
    mom_from = tl.where(in_first, max_mom, tl.where(in_second, base_mom, tl.where(three, max_mom, base_mom)))
    mom_to = tl.where(in_first, base_mom, max_mom)
    # a zero length is never selected (TorchOneCycle validates and holds),
    # but this row may not be a TorchOneCycle one: no 0 / 0 in the interpreter
    length = end - start
    pct = (k - start) / tl.where(length == 0, 1.0, length)
    linear = tl.load(row + _FIRST_STAIR_COUNT) == _ANNEAL_LINEAR
    cos_out = tl.cos(pct * _PI) + 1  # pct * pi == pi * pct; `constexpr * tensor` fails in the interpreter
    return (_torch_anneal(lr_from, lr_to, pct, cos_out, linear),
            _torch_anneal(mom_from, mom_to, pct, cos_out, linear))


@triton.jit
def _bias_corrections(beta1, beta2, t):
    """``1 - beta1**t`` and ``1 - beta2**t`` (float64, int64 ``t >= 1``), the
    powers by squaring in one loop.

    ``libdevice.pow`` is not available in the interpreter; squaring runs the
    same code in CI and on the GPU. Its relative error grows about in
    proportion to ``t`` (~600 float64 ulps of ``0.999**t`` at ``t = 10**4``)
    and, through ``1 - beta**t``, more where that cancels; rounded to
    float32 it mostly vanishes. Float64 parameters take
    :func:`_bias_corrections_dd` instead.
    """
    pow1 = beta1 * 0 + 1.0
    pow2 = beta2 * 0 + 1.0
    b1 = beta1
    b2 = beta2
    e = t
    while e > 0:
        odd = (e & 1) != 0
        pow1 = tl.where(odd, pow1 * b1, pow1)
        pow2 = tl.where(odd, pow2 * b2, pow2)
        b1 = b1 * b1
        b2 = b2 * b2
        e = e >> 1
    return 1 - pow1, 1 - pow2


@triton.jit
def _dd_mul(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) * (b_hi + b_lo) as a double-double (hi, lo): the
    product's rounding error exactly by an fma, the cross terms added, then
    renormalised (|hi| >= |lo|, so a fast two-sum)."""
    hi = a_hi * b_hi
    lo = tl.fma(a_hi, b_hi, -hi) + (a_hi * b_lo + a_lo * b_hi)
    s = hi + lo
    return s, lo - (s - hi)


@triton.jit
def _bias_corrections_dd(beta1, beta2, t):
    """``1 - beta1**t`` and ``1 - beta2**t`` for float64 parameters: powers
    by squaring in double-double arithmetic (~100-bit products), rounded to
    float64 once, so ``beta**t`` is correctly rounded, as the C library's
    ``pow`` that the reference and the cpu op take on the CPU is in practice
    (CUDA's ``pow``, up to 2 ulps, is not), and ``1 - beta**t`` the same
    exact subtraction. Plain squaring's error,
    invisible in float32, would move float64 Adam ~400 ulps off the
    reference in 40 steps at ``beta2 = 0.9999``."""
    zero = beta1 * 0
    p1_hi = zero + 1.0
    p1_lo = zero
    p2_hi = zero + 1.0
    p2_lo = zero
    b1_hi = beta1
    b1_lo = zero
    b2_hi = beta2
    b2_lo = zero
    e = t
    while e > 0:
        odd = (e & 1) != 0
        m1_hi, m1_lo = _dd_mul(p1_hi, p1_lo, b1_hi, b1_lo)
        m2_hi, m2_lo = _dd_mul(p2_hi, p2_lo, b2_hi, b2_lo)
        p1_hi = tl.where(odd, m1_hi, p1_hi)
        p1_lo = tl.where(odd, m1_lo, p1_lo)
        p2_hi = tl.where(odd, m2_hi, p2_hi)
        p2_lo = tl.where(odd, m2_lo, p2_lo)
        b1_hi, b1_lo = _dd_mul(b1_hi, b1_lo, b1_hi, b1_lo)
        b2_hi, b2_lo = _dd_mul(b2_hi, b2_lo, b2_hi, b2_lo)
        e = e >> 1
    return 1 - p1_hi, 1 - p2_hi


@triton.jit
def _chunk(tensors, chunks, pid, elem_ty, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Chunk ``pid``: its first element, its tensor's size, group row offset,
    step count, the addresses of param, grad and the three states, and
    whether the tensor has state 1 and state 3 (SGD's momentum buffer, Adam's
    max_exp_avg_sq).

    Presence is per tensor, as in the reference and the CUDA kernel, not the
    group row's HAS_MOMENTUM_BUFFER / AMSGRAD: a row may ask for a buffer a
    tensor lacks (momentum switched on after the state was made), and the
    absent state's address is the parameter's own."""
    rec = tensors + tl.load(chunks + pid.to(tl.int64) * _C_WIDTH) * _T_WIDTH
    start = tl.multiple_of(tl.load(chunks + pid.to(tl.int64) * _C_WIDTH + 1), BLOCK)
    numel = tl.load(rec + _T_NUMEL)
    row = tl.load(rec + _T_GROUP) * _ROW_WIDTH
    step = tl.load(tl.load(rec + _T_STEP).to(tl.pointer_type(tl.int64)))
    p_addr = tl.load(rec + _T_PARAM)
    s1_addr = tl.load(rec + _T_STATE1)
    s3_addr = tl.load(rec + _T_STATE3)
    has1 = tl.where(s1_addr != p_addr, True, False)
    has3 = tl.where(s3_addr != p_addr, True, False)
    p = p_addr.to(tl.pointer_type(elem_ty))
    g = tl.load(rec + _T_GRAD).to(tl.pointer_type(elem_ty))
    s1 = s1_addr.to(tl.pointer_type(elem_ty))
    s2 = tl.load(rec + _T_STATE2).to(tl.pointer_type(elem_ty))
    s3 = s3_addr.to(tl.pointer_type(elem_ty))
    if ALIGNED:  # the host checked that every address is 16-byte aligned: vector loads
        p = tl.multiple_of(p, 16)
        g = tl.multiple_of(g, 16)
        s1 = tl.multiple_of(s1, 16)
        s2 = tl.multiple_of(s2, 16)
        s3 = tl.multiple_of(s3, 16)
    return start, numel, row, step, p, g, s1, s2, s3, has1, has3


@triton.jit
def _narrow(x, elem_ty, ROUND_BF16: tl.constexpr):
    """float32 -> the parameter dtype, rounding to nearest even.

    The interpreter (triton 3.9) truncates float32 -> bfloat16, a bias that
    adds up over steps; there (``ROUND_BF16``) the rounding is done on the
    bits. Compiled, the hardware conversion already rounds to nearest even.
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(elem_ty)


@triton.jit
def _opmath(x, elem_ty):
    """``x`` in the type the update computes in: float64 for float64
    parameters, float32 for the others (torch.optim's opmath)."""
    if elem_ty == tl.float64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _div(x, y, elem_ty):
    """IEEE division in the opmath type (float64's ``/`` already is)."""
    if elem_ty == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sqrt(x, elem_ty):
    """IEEE square root in the opmath type (float64's ``sqrt`` already is)."""
    if elem_ty == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _finish(tensors, n_tensors, counter_ptr, done_ptr, increment, ADVANCE_COUNTER: tl.constexpr):
    """Advance the step counts once every program has read them.

    Every program reads its tensor's ``step`` and the counter before it
    updates, so they may only change after the last program has read them.
    Each program bumps the ``done`` slot (acq_rel); the one that sees all
    others done advances every ``step`` of the bucket (and the counter for the
    last bucket of the device step) and resets the slot for the next launch.
    """
    tl.debug_barrier()  # all threads of this program finished reading
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if prev == tl.num_programs(0) - 1:
        for j in range(0, n_tensors, _STEPS_BLOCK):
            idx = j + tl.arange(0, _STEPS_BLOCK).to(tl.int64)
            live = idx < n_tensors
            step_ptrs = tl.load(tensors + idx * _T_WIDTH + _T_STEP, mask=live, other=0).to(tl.pointer_type(tl.int64))
            steps = tl.load(step_ptrs, mask=live, other=0)
            tl.store(step_ptrs, steps + increment, mask=live)
        if ADVANCE_COUNTER:
            tl.store(counter_ptr, tl.load(counter_ptr) + increment)
        tl.atomic_xchg(done_ptr, 0, sem="acq_rel")


@triton.jit
def _scale_and_skip(scale_ptr, inf_ptr, k, elem_ty, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr):
    """GradScaler's (grad divisor, step-applies flag, int64 step increment)."""
    if HAS_SCALE:
        scale = _opmath(tl.load(scale_ptr), elem_ty)
    else:
        scale = 1.0  # unused
    if HAS_INF:
        ok = tl.where(tl.load(inf_ptr).to(tl.float32) == 0, True, False)
    else:
        ok = tl.where(k >= 0, True, False)  # always true: a flag of the same type as above
    return scale, ok, ok.to(tl.int64)


# Scalar flags are written ``tl.where(cond, True, False)``: the interpreter
# (triton 3.9) tags a scalar comparison with its operands' dtype, and
# broadcasting it into a block mask then yields floats that ``&`` rejects. The
# select carries int1 and folds away when compiled.


@triton.jit
def _sgd_block(
    p_ptr, g_ptr, b_ptr, offs, live, scale, ok, lr, mom, wd, keep, nesterov, maximize, has_buf, first_step,
    moving, decays, elem_ty, HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of SGD. Unmasked (``MASKED`` False) for blocks inside the
    tensor: a mask that may change every element (``offs < numel``) stops the
    compiler from using vector loads."""
    if MASKED:
        grad = _opmath(tl.load(g_ptr + offs, mask=live, other=0), elem_ty)
        param = _opmath(tl.load(p_ptr + offs, mask=live, other=0), elem_ty)
        buf_live = live & has_buf
        write = live & ok
    else:
        grad = _opmath(tl.load(g_ptr + offs), elem_ty)
        param = _opmath(tl.load(p_ptr + offs), elem_ty)
        buf_live = has_buf
        write = ok
    if HAS_SCALE:
        grad = _div(grad, scale, elem_ty)
    grad = tl.where(maximize, -grad, grad)
    grad = tl.where(decays, tl.fma(param, wd, grad), grad)  # grad.add(param, alpha=wd): fused
    old = _opmath(tl.load(b_ptr + offs, mask=buf_live, other=0), elem_ty)
    # torch's first step: buf = grad; afterwards mom*buf + (1-dampening)*grad
    # (buf.mul_(mom).add_(grad, alpha=keep): the add fused). A momentum of 0
    # leaves the buffer alone and steps with the gradient.
    new_buf = tl.where(first_step, grad, tl.fma(grad, keep, old * mom))
    new_buf = tl.where(moving, new_buf, old)
    direction = tl.where(nesterov, tl.fma(new_buf, mom, grad), new_buf)
    direction = tl.where(moving & has_buf, direction, grad)
    tl.store(b_ptr + offs, _narrow(new_buf, elem_ty, ROUND_BF16), mask=buf_live & ok)
    # param.add_(direction, alpha=-lr): fused
    tl.store(p_ptr + offs, _narrow(tl.fma(direction, -lr, param), elem_ty, ROUND_BF16), mask=write)


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def sgd_kernel(
    tensors, n_tensors, chunks, n_chunks, rows, counter_ptr, scale_ptr, inf_ptr, done_ptr, dtype_ref,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ADVANCE_COUNTER: tl.constexpr, ALIGNED: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """torch.optim.SGD (``reference.ReferenceBackend._sgd``) over one bucket."""
    pid = tl.program_id(0)
    k = tl.load(counter_ptr)
    elem_ty = dtype_ref.dtype.element_ty
    scale, ok, increment = _scale_and_skip(scale_ptr, inf_ptr, k, elem_ty, HAS_SCALE, HAS_INF)
    if pid < n_chunks:
        start, numel, row, step, p_ptr, g_ptr, b_ptr, _s2, _s3, has_buf, _has3 = _chunk(
            tensors, chunks, pid, elem_ty, BLOCK, ALIGNED
        )
        row = rows + row
        lr64, mom64 = schedule_values(row, k)
        # torch hands lr / momentum to its kernels as Python floats rounded to
        # the compute type; (1 - dampening) likewise
        lr = _opmath(lr64, elem_ty)
        mom = _opmath(mom64, elem_ty)
        wd = _opmath(tl.load(row + _WEIGHT_DECAY), elem_ty)
        keep = _opmath(1.0 - tl.load(row + _DAMPENING), elem_ty)
        nesterov = tl.where(tl.load(row + _NESTEROV) != 0, True, False)
        maximize = tl.where(tl.load(row + _MAXIMIZE) != 0, True, False)
        first_step = tl.where(step == 0, True, False)
        moving = tl.where(mom != 0, True, False)
        decays = tl.where(wd != 0, True, False)
        if start + BLOCK * ITERS <= numel:
            for it in range(ITERS):
                offs = start + it * BLOCK + tl.arange(0, BLOCK)
                _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < numel, scale, ok, lr, mom, wd, keep, nesterov, maximize,
                           has_buf, first_step, moving, decays, elem_ty, HAS_SCALE, ROUND_BF16, False)
        else:
            for it in range(ITERS):
                offs = start + it * BLOCK + tl.arange(0, BLOCK)
                _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < numel, scale, ok, lr, mom, wd, keep, nesterov, maximize,
                           has_buf, first_step, moving, decays, elem_ty, HAS_SCALE, ROUND_BF16, True)
    _finish(tensors, n_tensors, counter_ptr, done_ptr, increment, ADVANCE_COUNTER)


@triton.jit
def _adam_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, live, scale, ok, wd, eps, maximize, amsgrad, decays_param,
    decays_grad, decay_factor, weight, near_start, beta2, one_minus_beta2, step_size, bias_correction2_sqrt,
    elem_ty, HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of Adam / AdamW (masked only where the tensor ends, see ``_sgd_block``)."""
    if MASKED:
        grad = _opmath(tl.load(g_ptr + offs, mask=live, other=0), elem_ty)
        param = _opmath(tl.load(p_ptr + offs, mask=live, other=0), elem_ty)
        exp_avg = _opmath(tl.load(m_ptr + offs, mask=live, other=0), elem_ty)
        exp_avg_sq = _opmath(tl.load(v_ptr + offs, mask=live, other=0), elem_ty)
        ams_live = live & amsgrad
        write = live & ok
    else:
        grad = _opmath(tl.load(g_ptr + offs), elem_ty)
        param = _opmath(tl.load(p_ptr + offs), elem_ty)
        exp_avg = _opmath(tl.load(m_ptr + offs), elem_ty)
        exp_avg_sq = _opmath(tl.load(v_ptr + offs), elem_ty)
        ams_live = amsgrad
        write = ok
    if HAS_SCALE:
        grad = _div(grad, scale, elem_ty)
    grad = tl.where(maximize, -grad, grad)
    param = tl.where(decays_param, param * decay_factor, param)
    grad = tl.where(decays_grad, tl.fma(param, wd, grad), grad)  # grad.add(param, alpha=wd): fused
    # torch's vectorized lerp: the formula depends on which end the weight is
    # near, one fma either way (weight - 1 is exact in float32 for |weight| >= 0.5)
    diff = grad - exp_avg
    exp_avg = tl.where(near_start, tl.fma(weight, diff, exp_avg), tl.fma(weight - 1, diff, grad))
    # mul_(beta2).addcmul_(grad, grad, value=1 - beta2): addcmul fused
    exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)
    old_max = _opmath(tl.load(vmax_ptr + offs, mask=ams_live, other=0), elem_ty)
    second = tl.where(amsgrad, tl.maximum(old_max, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL), exp_avg_sq)
    denom = _div(_sqrt(second, elem_ty), bias_correction2_sqrt, elem_ty) + eps
    new_param = param + _div(exp_avg * -step_size, denom, elem_ty)
    tl.store(vmax_ptr + offs, _narrow(second, elem_ty, ROUND_BF16), mask=ams_live & ok)
    tl.store(m_ptr + offs, _narrow(exp_avg, elem_ty, ROUND_BF16), mask=write)
    tl.store(v_ptr + offs, _narrow(exp_avg_sq, elem_ty, ROUND_BF16), mask=write)
    tl.store(p_ptr + offs, _narrow(new_param, elem_ty, ROUND_BF16), mask=write)


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def adam_kernel(
    tensors, n_tensors, chunks, n_chunks, rows, counter_ptr, scale_ptr, inf_ptr, done_ptr, dtype_ref,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ADVANCE_COUNTER: tl.constexpr, ALIGNED: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """torch.optim.Adam / AdamW (``reference.ReferenceBackend._adam``) over one bucket."""
    pid = tl.program_id(0)
    k = tl.load(counter_ptr)
    elem_ty = dtype_ref.dtype.element_ty
    scale, ok, increment = _scale_and_skip(scale_ptr, inf_ptr, k, elem_ty, HAS_SCALE, HAS_INF)
    if pid < n_chunks:
        start, numel, row, step, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, _has1, amsgrad = _chunk(
            tensors, chunks, pid, elem_ty, BLOCK, ALIGNED
        )
        row = rows + row
        lr64, beta1 = schedule_values(row, k)
        beta2 = tl.load(row + _BETA2)
        eps = _opmath(tl.load(row + _EPS), elem_ty)
        wd64 = tl.load(row + _WEIGHT_DECAY)
        wd = _opmath(wd64, elem_ty)
        maximize = tl.where(tl.load(row + _MAXIMIZE) != 0, True, False)
        decoupled = tl.load(row + _DECOUPLED)
        decays_param = tl.where((decoupled != 0) & (wd64 != 0), True, False)
        decays_grad = tl.where((decoupled == 0) & (wd64 != 0), True, False)
        # scalars in float64 where torch computes them with Python floats
        decay_factor = _opmath(1 - lr64 * wd64, elem_ty)
        weight = _opmath(1 - beta1, elem_ty)
        near_start = tl.where(tl.abs(weight) < 0.5, True, False)
        one_minus_beta2 = _opmath(1 - beta2, elem_ty)
        if elem_ty == tl.float64:
            bias_correction1, bias_correction2 = _bias_corrections_dd(beta1, beta2, step + 1)
        else:
            bias_correction1, bias_correction2 = _bias_corrections(beta1, beta2, step + 1)
        step_size = _opmath(lr64 / bias_correction1, elem_ty)
        # float64 sqrt is IEEE (sqrt.rn.f64) compiled too
        bias_correction2_sqrt = _opmath(tl.sqrt(bias_correction2), elem_ty)
        beta2 = _opmath(beta2, elem_ty)
        if start + BLOCK * ITERS <= numel:
            for it in range(ITERS):
                offs = start + it * BLOCK + tl.arange(0, BLOCK)
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, scale, ok, wd, eps, maximize,
                            amsgrad, decays_param, decays_grad, decay_factor, weight, near_start, beta2,
                            one_minus_beta2, step_size, bias_correction2_sqrt, elem_ty, HAS_SCALE, ROUND_BF16, False)
        else:
            for it in range(ITERS):
                offs = start + it * BLOCK + tl.arange(0, BLOCK)
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, scale, ok, wd, eps, maximize,
                            amsgrad, decays_param, decays_grad, decay_factor, weight, near_start, beta2,
                            one_minus_beta2, step_size, bias_correction2_sqrt, elem_ty, HAS_SCALE, ROUND_BF16, True)
    _finish(tensors, n_tensors, counter_ptr, done_ptr, increment, ADVANCE_COUNTER)


@triton.jit
def advance_kernel(counter_ptr, inf_ptr, HAS_INF: tl.constexpr):
    """Advance the counter of a device step that has no tensor to update."""
    if HAS_INF:
        increment = (tl.load(inf_ptr).to(tl.float32) == 0).to(tl.int64)
    else:
        increment = 1
    tl.store(counter_ptr, tl.load(counter_ptr) + increment)
