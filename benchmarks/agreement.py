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
update's relative size (about 0.03 for bf16 here, 1e-6 for fp32); an
implementation that skips or garbles the update scores about 1. The bound is
per dtype: 0.25 for bf16/fp16, 1e-3 for fp32, where rounding leaves ~3e-7 and
the bound also catches an SGD momentum that is not scheduled (~0.07 here,
within bf16's bound; Adam's beta1 moves the update more). The probe's
parameters are small (1e-3) next to their gradients, so even at the
schedule's starting lr of 1e-4 each step moves them by about 10%, well above
bf16's resolution.

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
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in PROBE_SHAPES:
        p = (torch.randn(s, generator=g, dtype=torch.float64) * 1e-3).to(device=device, dtype=dtype)
        p.requires_grad_()
        p.grad = torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _reference(start: list[torch.Tensor], algo: str, scheduler: str) -> list[torch.Tensor]:
    """torch.optim single-tensor code in float64 with the implementation's schedule."""
    params = []
    for p in start:
        q = p.detach().to(device="cpu", dtype=torch.float64).requires_grad_()
        q.grad = p.grad.detach().to(device="cpu", dtype=torch.float64)
        params.append(q)
    opt = impls_mod._torch_optimizer(params, algo, None, foreach=False)
    sched = (impls_mod.deepspeed_onecycle if scheduler == "DS-OneCycle" else impls_mod.onecyclelr)(opt, PROBE_HALF_CYCLE)
    for _ in range(PROBE_STEPS):
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
    for _ in range(PROBE_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    e = relative_error(params, ref, start)
    bound = MAX_RELATIVE_ERROR_FP32 if dtype in (torch.float32, torch.float64) else MAX_RELATIVE_ERROR
    ok = e <= bound
    note = "" if ok else (f"WRONG RESULTS: after {PROBE_STEPS} steps its parameters are off by {e:.2f} of the update "
                          "(float64 torch.optim reference); not used as a peer")
    return {"agrees": ok, "agreement_error": e, "agreement_note": note}
