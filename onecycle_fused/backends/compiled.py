"""Backends that call the compiled custom ops (``torch.ops.onecycle_fused``).

``cpu``: the vectorized CPU kernels of ``_C``. ``cuda``: the multi-tensor
CUDA kernels of ``_C_cuda``. Either way one op call performs the whole step
of one device: lr / momentum from the table and the counter, every update,
the per-parameter step counts and the counter, all without reading anything
back to the host.
"""
from __future__ import annotations

import torch

from .. import ops
from . import StepBatch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _local(tensors):
    """The local shards of DTensors (FSDP2 parameters, their grads and states),
    which the element-wise update may work on directly; other tensors as given."""
    out = []
    for t in tensors:
        if t is not None and hasattr(t, "_local_tensor") and hasattr(t, "device_mesh"):
            t = t._local_tensor  # shares storage: in-place updates reach the DTensor
        out.append(t)
    return out


class _CompiledBackend:
    name = ""
    device_type = ""
    dtypes: tuple[torch.dtype, ...] = ()

    def __init__(self):
        # one shared empty tensor per device stands for "no buffer"
        self._none: dict[torch.device, torch.Tensor] = {}

    def available(self) -> bool:
        raise NotImplementedError

    def supports(self, device, dtype) -> bool:
        return torch.device(device).type == self.device_type and dtype in self.dtypes

    def _placeholder(self, device: torch.device) -> torch.Tensor:
        t = self._none.get(device)
        if t is None:
            t = self._none[device] = torch.empty(0, device=device)
        return t

    def step(self, batch: StepBatch) -> None:
        none = self._placeholder(batch.device)
        plain = (torch.Tensor, torch.nn.Parameter)
        if all(type(p) in plain for p in batch.params):
            local = list  # the common case: no per-tensor attribute lookups
        else:
            local = _local
        if batch.algo == "sgd":
            torch.ops.onecycle_fused.sgd_step_(
                local(batch.params), local(batch.grads),
                [none if b is None else b for b in local(batch.momentum_buffers)],
                local(batch.steps), batch.group_ids, batch.table, batch.counter, batch.grad_scale, batch.found_inf,
            )
        elif batch.algo in ("adam", "adamw"):  # adam vs adamw: the table's DECOUPLED column
            torch.ops.onecycle_fused.adam_step_(
                local(batch.params), local(batch.grads), local(batch.exp_avgs), local(batch.exp_avg_sqs),
                [none if m is None else m for m in local(batch.max_exp_avg_sqs)],
                local(batch.steps), batch.group_ids, batch.table, batch.counter, batch.grad_scale, batch.found_inf,
            )
        else:
            raise ValueError(f"unknown algorithm {batch.algo!r}")


class CPUBackend(_CompiledBackend):
    """Vectorized, multi-threaded CPU kernels (``at::parallel_for``, ``at::vec``)."""

    name = "cpu"
    device_type = "cpu"
    dtypes = _FLOATS + (torch.float64,)

    def available(self) -> bool:
        return ops.cpu_library_loaded()


class CUDABackend(_CompiledBackend):
    """Multi-tensor CUDA kernels: one launch per step per device."""

    name = "cuda"
    device_type = "cuda"
    dtypes = _FLOATS

    def available(self) -> bool:
        return ops.cuda_library_loaded() and torch.cuda.is_available()
