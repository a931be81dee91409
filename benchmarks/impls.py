"""The implementations measured side by side.

Every implementation turns (params with grads, algorithm) into a ``step()``
callable doing one full optimizer step *including* its 1-Cycle schedule:

* torch.optim foreach / fused + a host scheduler stepped every iteration
  (``torch.optim.lr_scheduler.OneCycleLR`` or DeepSpeed's ``OneCycle``);
* the compiled optimizer: ``torch.compile`` of ``opt.step()`` with tensor lr
  (and tensor beta1 for Adam/AdamW), ``OneCycleLR`` filling them each step, as
  in PyTorch's compiled-optimizer tutorial;
* ours, one entry per onecycle_fused backend available in this process, and
  ours with ``step()`` captured in a CUDA graph and replayed (CUDA only).

All use the same hyper-parameters and the same schedule shape (a linear
1-Cycle: lr 1e-4 -> 1e-3, momentum 0.95 -> 0.85 over ``HALF_CYCLE`` steps), so
they do the same work; the long cycle keeps every timed step inside it.
DeepSpeed's ``OneCycle`` is measured as it behaves: it cycles momentum only
for optimizers with ``betas`` (with SGD momentum stays at 0.95, one group
write less per step) and sets Adam's beta2 to 0.99.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import onecycle_fused
from onecycle_fused import backends as ocf_backends

MIN_LR, MAX_LR = 1e-4, 1e-3
MIN_MOM, MAX_MOM = 0.85, 0.95
HALF_CYCLE = 100_000  # steps per half cycle: no benchmark leaves the cycle
WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0, "adamw": 1e-2}

TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
OURS_CLASSES = {
    "sgd": onecycle_fused.FusedOneCycleSGD,
    "adam": onecycle_fused.FusedOneCycleAdam,
    "adamw": onecycle_fused.FusedOneCycleAdamW,
}


class Skip(Exception):
    """This implementation does not apply here; the message says why."""


@dataclasses.dataclass
class Impl:
    name: str
    family: str  # torch-foreach | torch-fused | torch-compiled | ours | ours-graph
    scheduler: str  # OneCycleLR | DS-OneCycle | on-device
    # build(params, algo, device, half_cycle=HALF_CYCLE) -> step(); the agreement
    # probe passes a short half cycle so its few steps see lr and momentum move
    build: Callable[..., Callable[[], object]]
    backend: Optional[str] = None  # ours: the onecycle_fused backend


def _torch_optimizer(params, algo, mode, lr=MIN_LR, **extra):
    kw = {"lr": lr, "weight_decay": WEIGHT_DECAY[algo], **extra}
    if mode is not None:
        kw[mode] = True
    if algo == "sgd":
        kw["momentum"] = MAX_MOM
    return TORCH_CLASSES[algo](params, **kw)


def onecyclelr(opt, half_cycle: int = HALF_CYCLE):
    """torch's OneCycleLR shaped like DeepSpeed's OneCycle (triangle, min_lr -> max_lr -> min_lr).

    Phase 1 ends at step ``half_cycle`` and phase 2 at ``2 * half_cycle``
    (OneCycleLR ends its phases at ``pct_start * total_steps - 1`` and
    ``total_steps - 1``); linear annealing; momentum max -> min -> max.
    """
    from torch.optim.lr_scheduler import OneCycleLR

    total = 2 * half_cycle + 1
    return OneCycleLR(
        opt, max_lr=MAX_LR, total_steps=total, pct_start=(half_cycle + 1) / total,
        anneal_strategy="linear", cycle_momentum=True, base_momentum=MIN_MOM, max_momentum=MAX_MOM,
        div_factor=MAX_LR / MIN_LR, final_div_factor=1.0, three_phase=False,
    )


def deepspeed_onecycle(opt, half_cycle: int = HALF_CYCLE):
    try:
        from deepspeed.runtime.lr_schedules import OneCycle
    except Exception as e:  # deepspeed missing or failing to import
        raise Skip(f"deepspeed unavailable: {type(e).__name__}: {e}") from None
    return OneCycle(opt, cycle_min_lr=MIN_LR, cycle_max_lr=MAX_LR, cycle_first_step_size=half_cycle,
                    cycle_momentum=True, cycle_min_mom=MIN_MOM, cycle_max_mom=MAX_MOM)


def _torch_with_scheduler(mode: str, make_sched):
    def build(params, algo, device, half_cycle=HALF_CYCLE):
        opt = _torch_optimizer(params, algo, mode)
        sched = make_sched(opt, half_cycle)

        def step():
            opt.step()
            sched.step()

        return step

    return build


def _compiled(params, algo, device, half_cycle=HALF_CYCLE):
    """torch.compile(opt.step) with tensor lr (and beta1), OneCycleLR filling them."""
    # foreach left to torch, as in the tutorial (Adam refuses a tensor lr with
    # foreach=True outside of compile)
    opt = _torch_optimizer(params, algo, None, lr=torch.tensor(MIN_LR))
    beta1 = None
    if algo != "sgd":
        # OneCycleLR writes beta1 as a Python float, which would recompile the
        # step every iteration; keep it a tensor and copy the float into it
        beta2 = torch.tensor(opt.param_groups[0]["betas"][1])
        beta1 = torch.tensor(opt.param_groups[0]["betas"][0])
        for g in opt.param_groups:
            g["betas"] = (beta1, beta2)
    sched = onecyclelr(opt, half_cycle)
    if beta1 is not None:
        for g in opt.param_groups:
            beta1.fill_(g["betas"][0])
            g["betas"] = (beta1, beta2)

    @torch.compile(fullgraph=False)
    def compiled_step():
        opt.step()

    def step():
        compiled_step()
        sched.step()
        if beta1 is not None:
            for g in opt.param_groups:
                beta1.fill_(g["betas"][0])
                g["betas"] = (beta1, beta2)

    return step


def _ours(backend: str):
    def build(params, algo, device, half_cycle=HALF_CYCLE):
        extra = {"weight_decay": WEIGHT_DECAY[algo]}
        opt = OURS_CLASSES[algo](
            params, cycle_min_lr=MIN_LR, cycle_max_lr=MAX_LR, cycle_first_step_size=half_cycle,
            cycle_min_mom=MIN_MOM, cycle_max_mom=MAX_MOM, backend=backend, **extra,
        )
        return opt.step

    return build


def _ours_graph(backend: str, warmup: int = 3):
    def build(params, algo, device, half_cycle=HALF_CYCLE):
        if device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        eager = _ours(backend)(params, algo, device, half_cycle)
        # state is created by eager steps on a side stream before capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()

        def step():
            graph.replay()

        # the graph holds raw pointers into the optimizer's state (buffers,
        # step counts, counter, table): keep the optimizer alive with it
        step.keepalive = (graph, eager)
        return step

    return build


def ours_status(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when our ``backend`` can run here, else why not."""
    b = ocf_backends.get_backend(backend)
    if b is None:
        return f"backend {backend!r} not built/importable in this process"
    if not b.available():
        return f"backend {backend!r} not available in this process"
    if backend == "triton" and device.type != "cuda":
        return "triton runs on CPU tensors only through its interpreter (tested, not benchmarked)"
    if not b.supports(device, dtype):
        return f"backend {backend!r} does not support {dtype} on {device.type}"
    return None


def all_impls(device: torch.device) -> list[Impl]:
    impls = [
        Impl("torch-foreach+OneCycleLR", "torch-foreach", "OneCycleLR", _torch_with_scheduler("foreach", onecyclelr)),
        Impl("torch-foreach+DS-OneCycle", "torch-foreach", "DS-OneCycle", _torch_with_scheduler("foreach", deepspeed_onecycle)),
        Impl("torch-fused+OneCycleLR", "torch-fused", "OneCycleLR", _torch_with_scheduler("fused", onecyclelr)),
        Impl("torch-fused+DS-OneCycle", "torch-fused", "DS-OneCycle", _torch_with_scheduler("fused", deepspeed_onecycle)),
        Impl("torch-compiled+OneCycleLR", "torch-compiled", "OneCycleLR", _compiled),
    ]
    for backend in ("cpu", "cuda", "triton", "reference"):
        impls.append(Impl(f"ours-{backend}", "ours", "on-device", _ours(backend), backend))
    if device.type == "cuda":
        for backend in ("cuda", "triton"):
            impls.append(Impl(f"ours-{backend}+graph", "ours-graph", "on-device", _ours_graph(backend), backend))
    return impls
