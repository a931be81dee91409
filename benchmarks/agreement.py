"""Does each implementation compute the step it is timed for?

A timing is only comparable if the implementation does the work. Before a
case is timed, every implementation takes a few steps on a small probe set
(sizes that exercise the vectorized and the tail paths) and its parameters
are compared with ``torch.optim``'s single-tensor code run in float64 from
the same start with the same host scheduler (our rows: ``OneCycleLR`` shaped
like our schedule; DeepSpeed rows: DeepSpeed's ``OneCycle``, whose documented
differences, such as Adam's beta2 set to 0.99, are then not counted as
errors).

The probe runs the schedule with a half cycle of ``PROBE_HALF_CYCLE`` steps
(the timed runs use ``impls.HALF_CYCLE``, 100,000, where lr and momentum
hardly move over a few steps): its steps climb from min to max lr and from
max to min momentum, so a scheduler that is not stepped, or steps the wrong
value, is caught like a wrong update.

The measure is the error relative to the update: ||p - p_ref|| / ||p_ref - p0||.
Rounding to the parameter dtype keeps it near the dtype's epsilon over the
update's relative size; an implementation that skips or garbles the update
scores about 1. The bound is per dtype: 0.25 for bf16/fp16, 1e-3 for fp32,
where rounding leaves ~1e-4 and the bound also catches an SGD momentum that
is not scheduled (~0.07 here, within bf16's bound; Adam's beta1 moves the
update more).

Each step gets fresh gradients (with one gradient throughout, Adam's
bias-corrected second moment is g^2 whatever beta2 is). In fp32 the
parameters are of order 1 next to gradients of order 1, so that AdamW's
decoupled weight decay (1e-2, about 1% of its update) and Adam's L2 in its
place are seen too; SGD's weight decay (1e-4 of its update) is below the
probe's resolution (tests/ check it against torch.optim). In bf16/fp16 the
parameters are small (1e-3) next to their gradients, so that even at the
schedule's starting lr of 1e-4 each step moves them by about 10%, well above
bf16's resolution; there only the schedule and the main update terms are
seen.

This is how the suite found that torch 2.13's fused CPU SGD leaves bf16 and
fp16 parameters unchanged (pytorch/pytorch#191763): such a row is marked and
no target uses it as a peer.
"""
from __future__ import annotations

import torch

from . import impls as impls_mod

PROBE_SHAPES = [(1000,), (37,), (3, 65)]
PROBE_STEPS = 3
PROBE_HALF_CYCLE = 2  # lr 1e-4, 5.5e-4, 1e-3 and momentum 0.95, 0.90, 0.85 over the probe's steps
MAX_RELATIVE_ERROR = 0.25  # bf16, fp16
MAX_RELATIVE_ERROR_FP32 = 1e-3  # fp32, fp64
# compile time (torch.compile) or a different step count (graph warm-up): not probed
NOT_PROBED = {"torch-compiled": "compile time", "ours-graph": "CUDA-graph warm-up steps (graph tested in tests/)"}


def probe_params(dtype: torch.dtype, device: torch.device, seed: int = 1) -> list[torch.Tensor]:
    """The probe's parameters, with the first step's gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 1e-3  # (see the module's docstring)
    params = []
    for s in PROBE_SHAPES:
        p = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        p.requires_grad_()
        p.grad = torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        params.append(p)
    return params


def probe_grads(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """Step ``step``'s gradients (``step`` >= 1; step 0's come with ``probe_params``),
    in the parameters' dtype: the reference takes the same values."""
    g = torch.Generator(device="cpu").manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _reference(start: list[torch.Tensor], algo: str, scheduler: str) -> list[torch.Tensor]:
    """torch.optim single-tensor code in float64 with the implementation's schedule."""
    params = []
    for p in start:
        q = p.detach().to(device="cpu", dtype=torch.float64).requires_grad_()
        q.grad = p.grad.detach().to(device="cpu", dtype=torch.float64)
        params.append(q)
    opt = impls_mod._torch_optimizer(params, algo, None, foreach=False)
    sched = (impls_mod.deepspeed_onecycle if scheduler == "DS-OneCycle" else impls_mod.onecyclelr)(opt, PROBE_HALF_CYCLE)
    for k in range(PROBE_STEPS):
        if k:
            for q, grad in zip(params, probe_grads(start, k)):
                q.grad = grad.to(torch.float64)
        opt.step()
        sched.step()
    return [q.detach() for q in params]


def relative_error(got: list[torch.Tensor], ref: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    err = upd = 0.0
    for x, r, s in zip(got, ref, start):
        x64 = x.detach().to(device="cpu", dtype=torch.float64)
        err += float((x64 - r).pow(2).sum())
        upd += float((r - s).pow(2).sum())
    return (err / upd) ** 0.5 if upd > 0 else float("inf")


def check(impl: impls_mod.Impl, algo: str, dtype: torch.dtype, device: torch.device) -> dict:
    """{'agrees': True/False/None, 'agreement_error': float|None, 'agreement_note': str}."""
    why = NOT_PROBED.get(impl.family)
    if why:
        return {"agrees": None, "agreement_error": None, "agreement_note": f"not probed ({why})"}
    params = probe_params(dtype, device)
    start = [p.detach().to(device="cpu", dtype=torch.float64) for p in params]
    ref = _reference(params, algo, impl.scheduler)
    step = impl.build(params, algo, device, half_cycle=PROBE_HALF_CYCLE)
    for k in range(PROBE_STEPS):
        if k:  # in place: an implementation may hold on to the grad tensors
            for p, grad in zip(params, probe_grads(params, k)):
                p.grad.copy_(grad)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    e = relative_error(params, ref, start)
    bound = MAX_RELATIVE_ERROR_FP32 if dtype in (torch.float32, torch.float64) else MAX_RELATIVE_ERROR
    ok = e <= bound
    note = "" if ok else (f"WRONG RESULTS: after {PROBE_STEPS} steps its parameters are off by {e:.2f} of the update "
                          "(float64 torch.optim reference); not used as a peer")
    return {"agrees": ok, "agreement_error": e, "agreement_note": note}
