"""Triton kernels: one launch updates every tensor of a (device, dtype) bucket.

Launch layout. The host (``backends/triton.py``) builds one int64 "launch
table" per bucket and keeps it on the device while the storages stay put:

* ``T_WIDTH`` int64 per tensor: addresses of param, grad, the three state
  tensors (SGD: momentum buffer; Adam: exp_avg, exp_avg_sq, max_exp_avg_sq;
  an unused state holds the param's address and is never written), the
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
single-tensor code) in float32, with IEEE division and square root
(``div_rn`` / ``sqrt_rn``) where torch uses them: Triton's plain ``/`` and
``sqrt`` on float32 are the approximate PTX instructions.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..schedule import KIND_LRRANGETEST, KIND_ONECYCLE, Row

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
_AMSGRAD = tl.constexpr(Row.AMSGRAD)
_DECOUPLED = tl.constexpr(Row.DECOUPLED)
_HAS_MOMENTUM_BUFFER = tl.constexpr(Row.HAS_MOMENTUM_BUFFER)
_KIND_ONECYCLE = tl.constexpr(KIND_ONECYCLE)
_KIND_LRRANGETEST = tl.constexpr(KIND_LRRANGETEST)

# how many step pointers the last program advances per iteration
_STEPS_BLOCK = tl.constexpr(128)


@triton.jit
def _flag(cond):
    """A scalar condition as a clean int1. The interpreter (triton 3.9) tags a
    scalar comparison with its operands' dtype, and broadcasting it into a
    block mask then yields floats that ``&`` rejects; a select of constants
    carries the right dtype there and folds away when compiled."""
    return tl.where(cond, True, False)


@triton.jit
def _nonzero(d):
    """``d``, or 1 where ``d`` is 0 (only for branches that are then discarded)."""
    return tl.where(d == 0, 1.0, d)


@triton.jit
def schedule_values(row, k_int):
    """(lr, momentum) in float64 for the group whose row starts at ``row``,
    after ``k_int`` (int64) applied steps: ``reference.schedule_values``."""
    k = k_int.to(tl.float64)
    kind = tl.load(row + _KIND)
    first = tl.load(row + _FIRST_STEP_SIZE)
    second = tl.load(row + _SECOND_STEP_SIZE)
    first_stairs = tl.load(row + _FIRST_STAIR_COUNT)
    min_lr = tl.load(row + _MIN_LR)
    lr_rate = tl.load(row + _DECAY_LR_RATE)
    # ---- OneCycle, cycle phase
    total = first + second
    ratio = first / total
    cycle = tl.floor(1 + k / total)
    x = 1.0 + k / total - cycle
    rising = x <= ratio
    # ratio == 1 (second == 0) means always rising: the other quotient is unused
    scale = tl.where(rising, x / ratio, (x - 1) / _nonzero(ratio - 1))
    stairs = tl.where(rising, first_stairs, tl.load(row + _SECOND_STAIR_COUNT))
    # k mod total, exactly, in integers (both are integral and k >= 0, total >= 1)
    c = (k_int % total.to(tl.int64)).to(tl.float64)
    pos = tl.where(c <= first, c * stairs / first, (total - c) * stairs / _nonzero(second))
    scale = tl.where(stairs > 0, tl.floor(pos) / _nonzero(stairs), scale)
    max_lr = tl.load(row + _MAX_LR)
    min_mom = tl.load(row + _MIN_MOM)
    max_mom = tl.load(row + _MAX_MOM)
    cycle_lr = min_lr + (max_lr - min_lr) * scale
    cycle_mom = max_mom - (max_mom - min_mom) * scale
    # ---- OneCycle, decay phase
    decay_step = tl.load(row + _DECAY_STEP_SIZE)
    interval = (k - total) / _nonzero(decay_step)
    mom_rate = tl.load(row + _DECAY_MOM_RATE)
    decay_lr = tl.where((decay_step != 0) & (lr_rate != 0), min_lr / _nonzero(1 + lr_rate * interval), min_lr)
    decay_mom = tl.where((decay_step != 0) & (mom_rate != 0), max_mom / _nonzero(1 + mom_rate * interval), max_mom)
    in_cycle = k <= total
    onecycle_lr = tl.where(in_cycle, cycle_lr, decay_lr)
    onecycle_mom = tl.where(in_cycle, cycle_mom, decay_mom)
    # ---- LRRangeTest: FIRST_STEP_SIZE holds step_size, FIRST_STAIR_COUNT staircase
    rt_interval = k / first
    rt_interval = tl.where(first_stairs != 0, tl.floor(rt_interval), rt_interval)
    range_lr = min_lr * (1 + lr_rate * rt_interval)

    lr = tl.where(kind == _KIND_LRRANGETEST, range_lr, onecycle_lr)
    scheduled_mom = (kind == _KIND_ONECYCLE) & (tl.load(row + _CYCLE_MOMENTUM) != 0)
    mom = tl.where(scheduled_mom, onecycle_mom, tl.load(row + _MOMENTUM))
    return lr, mom


@triton.jit
def _pow_int(base, n):
    """``base ** n`` for a float64 ``base`` and an int64 ``n >= 0``, by squaring.

    ``libdevice.pow`` is not available in the interpreter; squaring runs the
    same code in CI and on the GPU. Its relative error (about 2 ulp of
    float64 per bit of ``n``) vanishes when the bias corrections are rounded
    to float32.
    """
    result = base * 0 + 1.0
    b = base
    e = n
    while e > 0:
        result = tl.where((e & 1) != 0, result * b, result)
        b = b * b
        e = e >> 1
    return result


@triton.jit
def _chunk(tensors, chunks, pid, OFFSET_HINT: tl.constexpr):
    """The tensor record and the first element of chunk ``pid``."""
    rec = tensors + tl.load(chunks + pid.to(tl.int64) * _C_WIDTH) * _T_WIDTH
    start = tl.load(chunks + pid.to(tl.int64) * _C_WIDTH + 1)
    start = tl.multiple_of(start, OFFSET_HINT)
    numel = tl.load(rec + _T_NUMEL)
    row = tl.load(rec + _T_GROUP) * _ROW_WIDTH
    step = tl.load(tl.load(rec + _T_STEP).to(tl.pointer_type(tl.int64)))
    return rec, start, numel, row, step


@triton.jit
def _address(rec, col, elem_ty, ALIGNED: tl.constexpr):
    ptr = tl.load(rec + col).to(tl.pointer_type(elem_ty))
    if ALIGNED:  # the host checked that every address is 16-byte aligned
        ptr = tl.multiple_of(ptr, 16)
    return ptr


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
def _scale_and_skip(scale_ptr, inf_ptr, k, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr):
    """GradScaler's (grad divisor, step-applies flag, int64 step increment)."""
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0  # unused
    if HAS_INF:
        ok = _flag(tl.load(inf_ptr).to(tl.float32) == 0)
    else:
        ok = _flag(k >= 0)  # always true: a scalar flag of the same type as above
    return scale, ok, ok.to(tl.int64)


@triton.jit
def sgd_kernel(
    tensors, n_tensors, chunks, n_chunks, rows, counter_ptr, scale_ptr, inf_ptr, done_ptr, dtype_ref,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ADVANCE_COUNTER: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """torch.optim.SGD (``reference.ReferenceBackend._sgd``) over one bucket."""
    pid = tl.program_id(0)
    k = tl.load(counter_ptr)
    scale, ok, increment = _scale_and_skip(scale_ptr, inf_ptr, k, HAS_SCALE, HAS_INF)
    if pid < n_chunks:
        elem_ty = dtype_ref.dtype.element_ty
        rec, start, numel, row, step = _chunk(tensors, chunks, pid, BLOCK)
        lr64, mom64 = schedule_values(rows + row, k)
        # torch hands lr / momentum to its kernels as Python floats rounded to
        # the compute type; (1 - dampening) likewise
        lr = lr64.to(tl.float32)
        mom = mom64.to(tl.float32)
        wd = tl.load(rows + row + _WEIGHT_DECAY).to(tl.float32)
        keep = (1.0 - tl.load(rows + row + _DAMPENING)).to(tl.float32)
        nesterov = _flag(tl.load(rows + row + _NESTEROV) != 0)
        maximize = _flag(tl.load(rows + row + _MAXIMIZE) != 0)
        has_buf = _flag(tl.load(rows + row + _HAS_MOMENTUM_BUFFER) != 0)
        first_step = _flag(step == 0)
        p_ptr = _address(rec, _T_PARAM, elem_ty, ALIGNED)
        g_ptr = _address(rec, _T_GRAD, elem_ty, ALIGNED)
        b_ptr = _address(rec, _T_STATE1, elem_ty, ALIGNED)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            live = offs < numel
            grad = tl.load(g_ptr + offs, mask=live, other=0).to(tl.float32)
            if HAS_SCALE:
                grad = tl.div_rn(grad, scale)
            param = tl.load(p_ptr + offs, mask=live, other=0).to(tl.float32)
            grad = tl.where(maximize, -grad, grad)
            grad = tl.where(wd != 0, grad + wd * param, grad)
            buf_live = live & has_buf
            old = tl.load(b_ptr + offs, mask=buf_live, other=0).to(tl.float32)
            # torch's first step: buf = grad; afterwards mom*buf + (1-dampening)*grad.
            # A momentum of 0 leaves the buffer alone and steps with the gradient.
            later = old * mom + keep * grad
            new_buf = tl.where(first_step, grad, later)
            new_buf = tl.where(mom != 0, new_buf, old)
            direction = tl.where(nesterov, grad + new_buf * mom, new_buf)
            direction = tl.where(mom != 0, direction, grad)
            direction = tl.where(has_buf, direction, grad)
            tl.store(b_ptr + offs, new_buf.to(elem_ty), mask=buf_live & ok)
            tl.store(p_ptr + offs, (param - direction * lr).to(elem_ty), mask=live & ok)
    _finish(tensors, n_tensors, counter_ptr, done_ptr, increment, ADVANCE_COUNTER)


@triton.jit
def adam_kernel(
    tensors, n_tensors, chunks, n_chunks, rows, counter_ptr, scale_ptr, inf_ptr, done_ptr, dtype_ref,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ADVANCE_COUNTER: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """torch.optim.Adam / AdamW (``reference.ReferenceBackend._adam``) over one bucket."""
    pid = tl.program_id(0)
    k = tl.load(counter_ptr)
    scale, ok, increment = _scale_and_skip(scale_ptr, inf_ptr, k, HAS_SCALE, HAS_INF)
    if pid < n_chunks:
        elem_ty = dtype_ref.dtype.element_ty
        rec, start, numel, row, step = _chunk(tensors, chunks, pid, BLOCK)
        lr64, beta1 = schedule_values(rows + row, k)
        beta2 = tl.load(rows + row + _BETA2)
        eps = tl.load(rows + row + _EPS).to(tl.float32)
        wd64 = tl.load(rows + row + _WEIGHT_DECAY)
        wd = wd64.to(tl.float32)
        maximize = _flag(tl.load(rows + row + _MAXIMIZE) != 0)
        amsgrad = _flag(tl.load(rows + row + _AMSGRAD) != 0)
        decoupled = _flag((tl.load(rows + row + _DECOUPLED) != 0) & (wd != 0))
        coupled = _flag((tl.load(rows + row + _DECOUPLED) == 0) & (wd != 0))
        # scalars in float64 where torch computes them with Python floats
        decay_factor = (1 - lr64 * wd64).to(tl.float32)
        weight = (1 - beta1).to(tl.float32)
        beta2_f = beta2.to(tl.float32)
        one_minus_beta2 = (1 - beta2).to(tl.float32)
        t = step + 1
        bias_correction1 = 1 - _pow_int(beta1, t)
        bias_correction2 = 1 - _pow_int(beta2, t)
        step_size = (lr64 / bias_correction1).to(tl.float32)
        # float64 sqrt is IEEE (sqrt.rn.f64) compiled too
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
        p_ptr = _address(rec, _T_PARAM, elem_ty, ALIGNED)
        g_ptr = _address(rec, _T_GRAD, elem_ty, ALIGNED)
        m_ptr = _address(rec, _T_STATE1, elem_ty, ALIGNED)
        v_ptr = _address(rec, _T_STATE2, elem_ty, ALIGNED)
        vmax_ptr = _address(rec, _T_STATE3, elem_ty, ALIGNED)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            live = offs < numel
            grad = tl.load(g_ptr + offs, mask=live, other=0).to(tl.float32)
            if HAS_SCALE:
                grad = tl.div_rn(grad, scale)
            param = tl.load(p_ptr + offs, mask=live, other=0).to(tl.float32)
            grad = tl.where(maximize, -grad, grad)
            param = tl.where(decoupled, param * decay_factor, param)
            grad = tl.where(coupled, grad + wd * param, grad)
            exp_avg = tl.load(m_ptr + offs, mask=live, other=0).to(tl.float32)
            exp_avg_sq = tl.load(v_ptr + offs, mask=live, other=0).to(tl.float32)
            # torch's lerp: the formula depends on which end the weight is near
            diff = grad - exp_avg
            exp_avg = tl.where(tl.abs(weight) < 0.5, exp_avg + weight * diff, grad - diff * (1 - weight))
            exp_avg_sq = exp_avg_sq * beta2_f + one_minus_beta2 * grad * grad
            ams_live = live & amsgrad
            second = exp_avg_sq
            old_max = tl.load(vmax_ptr + offs, mask=ams_live, other=0).to(tl.float32)
            second = tl.where(amsgrad, tl.maximum(old_max, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL), second)
            denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
            new_param = param + tl.div_rn(exp_avg * -step_size, denom)
            tl.store(vmax_ptr + offs, second.to(elem_ty), mask=ams_live & ok)
            tl.store(m_ptr + offs, exp_avg.to(elem_ty), mask=live & ok)
            tl.store(v_ptr + offs, exp_avg_sq.to(elem_ty), mask=live & ok)
            tl.store(p_ptr + offs, new_param.to(elem_ty), mask=live & ok)
    _finish(tensors, n_tensors, counter_ptr, done_ptr, increment, ADVANCE_COUNTER)


@triton.jit
def advance_kernel(counter_ptr, inf_ptr, HAS_INF: tl.constexpr):
    """Advance the counter of a device step that has no tensor to update."""
    if HAS_INF:
        increment = (tl.load(inf_ptr).to(tl.float32) == 0).to(tl.int64)
    else:
        increment = 1
    tl.store(counter_ptr, tl.load(counter_ptr) + increment)
