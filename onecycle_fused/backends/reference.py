"""Reference backend: readable per-tensor PyTorch, the oracle for every other backend.

It follows ``torch.optim``'s single-tensor code paths line for line, with two
changes that the contract demands:

* lr and momentum are float64 tensors computed on the parameters' device
  from the step counter (:func:`schedule_values`, the tensor twin of
  ``schedule.py``), so nothing is read back to the host and the step can be
  captured in a CUDA graph;
* every result is computed out of place and committed with
  ``torch.where(found_inf, old, new)``, so a step skipped by GradScaler
  changes nothing.

Low-precision parameters and states are computed in float32 and rounded once
when written back, like torch's fused optimizers. Where torch multiplies by a
Python float, this file uses the fused op with the same rounding (``addcmul``,
``addcdiv``), so fp32 CPU results equal ``torch.optim``'s bit for bit in the
common cases; tests still allow a few ulps.
"""
from __future__ import annotations

import math

import torch

from ..schedule import ANNEAL_LINEAR, KIND_LRRANGETEST, KIND_ONECYCLE, KIND_TORCH_ONECYCLE, Row
from . import StepBatch, decoupled_weight_decay
from .layout import STATE_LISTS, check_batch_states_apart


def _sq_residual(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x - c*c``, with ``c*c`` taken exactly as ``p + e`` (Veltkamp split, Dekker
    product: no FMA needed)."""
    t = c * 134217729.0  # 2^27 + 1
    hi = t - (t - c)
    lo = c - hi
    p = c * c
    e = ((hi * hi - p) + 2 * hi * lo) + lo * lo
    return (x - p) - e


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded ``sqrt`` of a float64 tensor (``x >= 0``), on its device.

    torch's CPU ``sqrt`` (Sleef's, even for one element) is 1 ulp off for ~1% of
    arguments. Adam's ``sqrt(1 - beta2^t)`` is a host float in ``torch.optim``
    (and ``std::sqrt`` / ``__dsqrt_rn`` in the C++ and CUDA kernels): with
    ``beta2=0.999`` the tensor one moved every float64 parameter by an ulp at
    ~2% of steps. Of the faithful result and its two neighbours, the nearest
    root is the one whose exact square is nearest ``x`` (no float64 ``x`` lies
    between the two midpoints).

    On the CPU only: CUDA's float64 ``sqrt`` is IEEE (0 ulp) already, and on a
    GPU (where this backend runs without the CUDA library and triton) each of
    the ~50 ops below is a kernel launch, per tensor and step. Exact for
    ``x >= 2**-968``: below, ``c*c`` underflows and the residuals are not
    (Adam's ``1 - beta2^t`` is 0 or at least ``2**-53``). Inductor's CPU code
    of it gave ``math.sqrt``'s value on the same 900k inputs as eager.
    """
    r = x.sqrt()
    if x.device.type != "cpu":
        return r
    best, best_err = r, _sq_residual(x, r).abs()
    for c in (torch.nextafter(r, torch.full_like(r, math.inf)), torch.nextafter(r, torch.zeros_like(r))):
        err = _sq_residual(x, c).abs()
        closer = err < best_err
        best, best_err = torch.where(closer, c, best), torch.where(closer, err, best_err)
    return best


def schedule_values(table: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lr and momentum of every group (float64 ``[groups]``) after ``counter`` applied steps.

    Same operations, in the same order, as ``OneCycle.scale`` / ``_eval``,
    ``LRRangeTest._eval`` and ``TorchOneCycle._eval``, so values equal the
    host's bit for bit, except TorchOneCycle's 'cos': ``torch.cos`` is not
    ``math.cos`` (on CPU it is Sleef's, even for one element, and differs by
    1 ulp for ~0.1% of arguments; on a GPU it is CUDA's).
    """
    k = counter.to(torch.float64)

    def col(i):
        return table[:, i]

    kind = col(Row.KIND)
    # ---- OneCycle, cycle phase
    first, second = col(Row.FIRST_STEP_SIZE), col(Row.SECOND_STEP_SIZE)
    total = first + second
    ratio = first / total
    cycle = torch.floor(1 + k / total)
    x = 1.0 + k / total - cycle
    rising = x <= ratio
    scale = torch.where(rising, x / ratio, (x - 1) / (ratio - 1))
    stairs = torch.where(rising, col(Row.FIRST_STAIR_COUNT), col(Row.SECOND_STAIR_COUNT))
    c = torch.remainder(k, total)
    pos = torch.where(c <= first, c * stairs / first, (total - c) * stairs / second)
    scale = torch.where(stairs > 0, torch.floor(pos) / stairs, scale)
    min_lr, max_lr = col(Row.MIN_LR), col(Row.MAX_LR)
    min_mom, max_mom = col(Row.MIN_MOM), col(Row.MAX_MOM)
    cycle_lr = min_lr + (max_lr - min_lr) * scale
    cycle_mom = max_mom - (max_mom - min_mom) * scale
    # ---- OneCycle, decay phase
    decay_step = col(Row.DECAY_STEP_SIZE)
    interval = (k - total) / decay_step
    lr_rate, mom_rate = col(Row.DECAY_LR_RATE), col(Row.DECAY_MOM_RATE)
    decay_lr = torch.where((decay_step != 0) & (lr_rate != 0), min_lr / (1 + lr_rate * interval), min_lr)
    decay_mom = torch.where((decay_step != 0) & (mom_rate != 0), max_mom / (1 + mom_rate * interval), max_mom)
    in_cycle = k <= total
    onecycle_lr = torch.where(in_cycle, cycle_lr, decay_lr)
    onecycle_mom = torch.where(in_cycle, cycle_mom, decay_mom)
    # ---- LRRangeTest: FIRST_STEP_SIZE holds step_size, FIRST_STAIR_COUNT staircase
    rt_interval = k / first
    rt_interval = torch.where(col(Row.FIRST_STAIR_COUNT) != 0, torch.floor(rt_interval), rt_interval)
    range_lr = min_lr * (1 + lr_rate * rt_interval)

    # ---- TorchOneCycle (column meanings: schedule.Row)
    torch_lr, torch_mom = _torch_onecycle_values(table, k)

    lr = torch.where(kind == KIND_LRRANGETEST, range_lr, onecycle_lr)
    lr = torch.where(kind == KIND_TORCH_ONECYCLE, torch_lr, lr)
    mom = torch.where(kind == KIND_TORCH_ONECYCLE, torch_mom, onecycle_mom)
    scheduled_mom = (kind != KIND_LRRANGETEST) & (col(Row.CYCLE_MOMENTUM) != 0)
    mom = torch.where(scheduled_mom, mom, col(Row.MOMENTUM))
    return lr, mom


def _torch_onecycle_values(table: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TorchOneCycle._eval`` on tensors: torch's OneCycleLR.get_lr."""
    end1, end2 = table[:, Row.FIRST_STEP_SIZE], table[:, Row.SECOND_STEP_SIZE]
    last_end = table[:, Row.DECAY_STEP_SIZE]
    three = table[:, Row.SECOND_STAIR_COUNT] != 0
    initial_lr, max_lr, min_lr = table[:, Row.MIN_LR], table[:, Row.MAX_LR], table[:, Row.DECAY_LR_RATE]
    base_mom, max_mom = table[:, Row.MIN_MOM], table[:, Row.MAX_MOM]
    # past the end (torch raises there) the values of k = T - 1 hold
    k = torch.where(k > table[:, Row.DECAY_MOM_RATE], last_end, k)
    # torch's phase search: first phase whose end is >= k, else the last
    in_first = k <= end1
    in_second = ~in_first & three & (k <= end2)
    in_last = ~in_first & ~in_second

    def pick(first, second, last):
        return torch.where(in_first, first, torch.where(in_second, second, last))

    zero = torch.zeros_like(end1)
    start = pick(zero, end1, torch.where(three, end2, end1))
    end = pick(end1, end2, last_end)
    lr_from = pick(initial_lr, max_lr, torch.where(three, initial_lr, max_lr))
    lr_to = pick(max_lr, initial_lr, min_lr)
    mom_from = pick(max_mom, base_mom, torch.where(three, max_mom, base_mom))
    mom_to = pick(base_mom, max_mom, max_mom)
    pct = (k - start) / (end - start)
    linear = table[:, Row.FIRST_STAIR_COUNT] == ANNEAL_LINEAR
    cos_out = torch.cos(math.pi * pct) + 1

    def anneal(a, b):
        return torch.where(linear, (b - a) * pct + a, b + (a - b) / 2.0 * cos_out)

    return anneal(lr_from, lr_to), anneal(mom_from, mom_to)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _commit(dst: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None) -> None:
    """Write ``new`` into ``dst`` unless the step is skipped (device-side choice)."""
    if skip is not None:
        new = torch.where(skip, dst, new.to(dst.dtype))
    dst.copy_(new)


class ReferenceBackend:
    name = "reference"
    checks_before_writing = True  # _check: the optimizer need not check the grads first

    def available(self) -> bool:
        return True

    def supports(self, device, dtype) -> bool:
        return dtype in _DTYPES

    @staticmethod
    def _check(batch: StepBatch) -> None:
        """Every grad and state tensor like its parameter, checked before
        anything is written (as the compiled ops do): a state that no longer
        fits (a checkpoint loaded after the parameters were reordered) raises
        with nothing stepped."""
        for i, p in enumerate(batch.params):
            # (the optimizer picks backends by the dtypes of the groups it was
            # given; a parameter put into a group's list later is seen here
            # first, and would be stepped in float32 and truncated on writing)
            if p.dtype not in _DTYPES:
                raise ValueError(
                    f"the reference backend supports {_DTYPES} parameters; params[{i}] has dtype {p.dtype}"
                )
        for i, (p, step) in enumerate(zip(batch.params, batch.steps)):
            # (as the compiled ops and triton: a float count, set through .data,
            # would be stepped here as a float, elsewhere refused)
            if step.dtype != torch.int64 or step.numel() != 1 or step.device != p.device:
                raise ValueError(
                    f"steps[{i}] must be an int64 tensor with one element on {p.device}, got {step.dtype} "
                    f"{tuple(step.shape)} on {step.device}"
                )
        lists = [("grads", batch.grads)] + list(zip(STATE_LISTS[batch.algo], batch.state_lists()))
        for name, tensors in lists:
            for i, (p, t) in enumerate(zip(batch.params, tensors)):
                if t is not None and (t.shape != p.shape or t.dtype != p.dtype or t.device != p.device):
                    raise ValueError(
                        f"{name}[{i}] must match params[{i}] ({p.dtype} {tuple(p.shape)} on {p.device}), "
                        f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                    )
        if torch.compiler.is_compiling():
            return  # (FakeTensors have no data pointers to compare)
        # a tensor this backend writes that was made under
        # torch.inference_mode() (a state written into optimizer.state by
        # hand; load_state_dict makes such states normal copies): torch
        # refuses its in-place update outside that mode, which raised after
        # the parameters before it were stepped. (The compiled ops and triton
        # write it through its pointer.)
        # (inside inference mode such updates are allowed: nothing to refuse)
        written = [] if torch.is_inference_mode_enabled() else [("params", batch.params), ("steps", batch.steps)] + \
            list(zip(STATE_LISTS[batch.algo], batch.state_lists()))
        for name, tensors in written:
            for i, t in enumerate(tensors):
                if t is not None and t.is_inference():
                    raise ValueError(
                        f"{name}[{i}] is an inference tensor (made under torch.inference_mode()), which torch "
                        "does not let the step update in place: give the optimizer a normal copy, cloned outside "
                        "inference mode (load_state_dict() makes one of each state it loads)"
                    )
        # (a grad that partially overlaps its parameter needs nothing here:
        # this backend reads it whole, into a temporary, before writing)
        check_batch_states_apart(batch.params, batch.grads, batch.algo, batch.state_lists())

    def step(self, batch: StepBatch) -> None:
        self._check(batch)
        lrs, moms = schedule_values(batch.table, batch.counter)
        # GradScaler's tensors are 0-dim; a one-element (1,) one, which the
        # compiled ops and triton take too, is made 0-dim here (before
        # anything is written): it would broadcast the 0-dim step counts
        # and parameters to (1,) and fail after the first were written
        skip = None if batch.found_inf is None else (batch.found_inf != 0).reshape(())
        scale = None if batch.grad_scale is None else batch.grad_scale.reshape(())
        one = torch.ones((), dtype=torch.int64, device=batch.device)
        increment = one if skip is None else (~skip).to(torch.int64)
        update = self._sgd if batch.algo == "sgd" else self._adam
        for i, (p, g, step) in enumerate(zip(batch.params, batch.grads, batch.steps)):
            gid = batch.group_ids[i]
            group = batch.groups[gid]
            # float32 "opmath" for low precision, float64 stays float64
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            grad = g.to(compute)
            if scale is not None:
                grad = grad / scale.to(compute)
            update(batch, i, group, p, grad, lrs[gid], moms[gid], step, compute, skip)
            step.add_(increment)
        batch.counter.add_(increment)

    # -- torch.optim.SGD, _single_tensor_sgd -------------------------------
    @staticmethod
    def _sgd(batch, i, group, p, grad, lr64, mom64, step, compute, skip):
        # torch passes lr and momentum as Python floats that its kernels round
        # to the compute type
        lr, mom = lr64.to(compute), mom64.to(compute)
        param = p.to(compute)
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        buf = batch.momentum_buffers[i]
        if buf is not None:
            old = buf.to(compute)
            # torch's first step: buf = grad (no dampening); afterwards
            # buf = mom * buf + (1 - dampening) * grad. A momentum of 0 leaves
            # the buffer alone and steps with the gradient, as torch does.
            later = (old * mom).add_(grad, alpha=1 - group["dampening"])
            new_buf = torch.where(step == 0, grad, later)
            new_buf = torch.where(mom != 0, new_buf, old)
            if group["nesterov"]:
                direction = torch.addcmul(grad, new_buf, mom)
            else:
                direction = new_buf
            direction = torch.where(mom != 0, direction, grad)
            _commit(buf, new_buf, skip)
            grad = direction
        _commit(p, torch.addcmul(param, grad, lr, value=-1), skip)

    # -- torch.optim.Adam / AdamW, _single_tensor_adam ---------------------
    @staticmethod
    def _adam(batch, i, group, p, grad, lr, beta1, step, compute, skip):
        # lr and beta1 stay float64 where torch computes with Python floats
        param = p.to(compute)
        beta2, eps, wd = group["betas"][1], group["eps"], group["weight_decay"]
        if group["maximize"]:
            grad = -grad
        if wd != 0:
            if decoupled_weight_decay(batch.algo, group):
                param = param * (1 - lr * wd).to(compute)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg = batch.exp_avgs[i].to(compute)
        exp_avg_sq = batch.exp_avg_sqs[i].to(compute)
        exp_avg = exp_avg.lerp(grad, (1 - beta1).to(compute))
        exp_avg_sq = (exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2)
        # bias corrections in float64 from the current beta1, as torch does
        # with Python floats
        t = (step + 1).to(torch.float64)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = (lr / bias_correction1).to(compute)
        bias_correction2_sqrt = _sqrt_rn(bias_correction2).to(compute)
        second = exp_avg_sq
        max_sq = batch.max_exp_avg_sqs[i]
        if max_sq is not None:
            second = torch.maximum(max_sq.to(compute), exp_avg_sq)
            _commit(max_sq, second, skip)
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        _commit(batch.exp_avgs[i], exp_avg, skip)
        _commit(batch.exp_avg_sqs[i], exp_avg_sq, skip)
        _commit(p, torch.addcdiv(param, exp_avg * -step_size, denom), skip)
