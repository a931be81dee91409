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


class _CompiledBackend:
    name = ""
    device_type = ""
    dtypes: tuple[torch.dtype, ...] = ()
    # the ops check every tensor of a call before they write any (csrc/ops.cpp
    # Batch, csrc/cuda/tensor_table.cu): the optimizer need not check grads first
    checks_before_writing = True
    # the op walks a parameter's elements in memory order, its states with the
    # parameter's offsets (cuda/tensor_table.cu): a strided parameter, or a
    # state laid out otherwise, is refused. The optimizer lays the states out
    # as their parameters before such a backend's list step, checks the
    # parameters first when several devices step, and its step plans check
    # the layouts every step (csrc/layout.h)
    needs_param_layout = False

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

    def _state_lists(self, batch: StepBatch) -> tuple[list, list, list]:
        """The op's state lists: SGD's momentum buffers, or Adam's exp_avgs,
        exp_avg_sqs and max_exp_avg_sqs, with the placeholder for None."""
        none = self._placeholder(batch.device)
        if batch.algo == "sgd":
            return [none if b is None else b for b in batch.momentum_buffers], [], []
        if batch.algo in ("adam", "adamw"):  # adam vs adamw: the table's DECOUPLED column
            return batch.exp_avgs, batch.exp_avg_sqs, [none if m is None else m for m in batch.max_exp_avg_sqs]
        raise ValueError(f"unknown algorithm {batch.algo!r}")

    def step(self, batch: StepBatch) -> None:
        s0, s1, s2 = self._state_lists(batch)
        if batch.algo == "sgd":
            torch.ops.onecycle_fused.sgd_step_(
                batch.params, batch.grads, s0,
                batch.steps, batch.group_ids, batch.table, batch.counter, batch.grad_scale, batch.found_inf,
            )
        else:
            torch.ops.onecycle_fused.adam_step_(
                batch.params, batch.grads, s0, s1, s2,
                batch.steps, batch.group_ids, batch.table, batch.counter, batch.grad_scale, batch.found_inf,
            )

    def make_plan(self, batch: StepBatch, watched: list[torch.Tensor]):
        """A ``StepPlan`` (csrc/ops.cpp) holding ``batch``'s lists but the
        grads, stepped by its ``step`` method (``step_plan.run_planned``); ``watched``: the
        device's parameters that have no grad now."""
        s0, s1, s2 = self._state_lists(batch)
        return torch.classes.onecycle_fused.StepPlan(
            "sgd" if batch.algo == "sgd" else "adam", batch.params, s0, s1, s2, batch.steps, batch.group_ids, watched,
            self.needs_param_layout,
        )


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
    dtypes = _FLOATS + (torch.float64,)  # float64 computes in float64, as torch.optim does
    needs_param_layout = True

    def available(self) -> bool:
        return ops.cuda_library_loaded() and torch.cuda.is_available()
