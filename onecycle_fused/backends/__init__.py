"""Backends: how one fused optimizer step is carried out on one device.

The optimizer (``optim.py``) owns *what*: state, the step counter, param
groups and the per-group parameter table. A backend owns *how*: it receives a
:class:`StepBatch` holding everything for one device and performs the whole
step, including advancing the step counter and the per-parameter step counts.

Contract for ``Backend.step(batch)``:

* lr / momentum of every group come from ``batch.table`` (float64
  ``[groups, ROW_WIDTH]``, layout in :class:`onecycle_fused.schedule.Row`)
  evaluated at ``k = batch.counter`` (int64, 0-dim). Nothing is read back to
  the host.
* if ``batch.grad_scale`` is given, gradients are divided by it; if
  ``batch.found_inf`` is given and non-zero, nothing changes at all: no
  parameter, no state, no step count, no counter.
* otherwise each ``steps[i]`` (int64, 0-dim) is incremented, the update is
  applied with that new count (Adam bias correction; SGD takes torch's
  first-step buffer ``buf = grad`` when the count was 0), and the counter is
  incremented once.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Optional, Protocol

import torch

from .layout import STATE_LISTS

log = logging.getLogger("onecycle_fused")

ALGOS = ("sgd", "adam", "adamw")


@dataclasses.dataclass
class StepBatch:
    """Everything one backend call needs for one device (all dtypes)."""

    algo: str  # "sgd" | "adam" | "adamw"
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    steps: list[torch.Tensor]  # per-parameter int64 0-dim step counts
    group_ids: list[int]  # row of `table` for each parameter
    table: torch.Tensor  # float64 [groups, ROW_WIDTH], on the device
    counter: torch.Tensor  # int64 0-dim: optimizer steps applied so far
    groups: list[dict]  # the optimizer's param_groups (host values; table is authoritative for kernels)
    # SGD: momentum buffers (None where the group has no momentum at all)
    momentum_buffers: list[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)
    # Adam / AdamW
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    max_exp_avg_sqs: list[Optional[torch.Tensor]] = dataclasses.field(default_factory=list)  # None: no amsgrad
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.counter.device

    def state_lists(self) -> list:
        """The algorithm's state lists, in ``layout.STATE_LISTS`` order."""
        return [getattr(self, name) for name in STATE_LISTS[self.algo]]


def decoupled_weight_decay(algo: str, group: dict):
    """Whether an Adam-type group's weight decay is decoupled (AdamW's): the
    group's own ``decoupled_weight_decay`` where it has one (torch.optim.Adam
    reads the key per group), else the optimizer's rule (``algo``)."""
    return group.get("decoupled_weight_decay", algo == "adamw")


class Backend(Protocol):
    name: str

    def available(self) -> bool:
        """True when this backend can run in this process (library built, triton importable...)."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True when this backend handles parameters of this device and dtype."""

    def step(self, batch: StepBatch) -> None:
        """Apply one optimizer step to every tensor of ``batch`` (see module docstring)."""


# name -> "module:attribute"; imported lazily so a missing optional
# dependency never breaks `import onecycle_fused`.
_REGISTRY = {
    "reference": "onecycle_fused.backends.reference:ReferenceBackend",
    "cpu": "onecycle_fused.backends.compiled:CPUBackend",
    "cuda": "onecycle_fused.backends.compiled:CUDABackend",
    "triton": "onecycle_fused.backends.triton:TritonBackend",
}
_INSTANCES: dict[str, Optional[Backend]] = {}

# `backend="auto"` tries these in order for each device type. On CPU `cpu`
# is measured faster (README "Benchmarks"); on CUDA `cuda` is, on an H100:
# 0.75x triton's step time in geometric mean over the 16 benchmark cases
# (benchmarks/results/h100_2026-11-27_3/; 0.32x before triton's step plans,
# h100_2026-11-27/), target "backend='auto' picks the faster of cuda and
# triton", which each GPU run checks again.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


def backend_names() -> tuple[str, ...]:
    return ("auto",) + tuple(_REGISTRY)


def get_backend(name: str) -> Optional[Backend]:
    """The backend called ``name``, or None when its module cannot be imported."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    if name not in _INSTANCES:
        module, attr = _REGISTRY[name].split(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            # Remembered as None, so that the log says it once per process,
            # not on every available_backends() / auto resolve.
            log.info("onecycle_fused: backend %r unavailable (%s)", name, e)
            _INSTANCES[name] = None
            return None
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def available_backends() -> list[str]:
    """Names of the backends usable in this process."""
    out = []
    for name in _REGISTRY:
        b = get_backend(name)
        if b is not None and b.available():
            out.append(name)
    return out


_WARNED_FALLBACK: set = set()


def _warn_slow_fallback(device: torch.device, dtypes, order) -> None:
    """``auto`` fell back to the per-tensor reference backend although a fused
    one would serve these dtypes if it were built or importable (a GPU
    without ``_C_cuda`` and without triton): say so once per device type,
    since it runs many kernels per parameter."""
    if device.type in _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK.add(device.type)
    from ..ops import library_problems

    problems = "; ".join(f"{m} {why}" for m, why in library_problems().items()) or "see the log"
    why = []
    for candidate in order[:-1]:
        b = get_backend(candidate)
        why.append(f"{candidate!r}: " + ("not importable (is it installed?)" if b is None else
                                         f"not available ({problems})"
                                         if not b.available() else "does not take these parameters"))
    log.warning("onecycle_fused: backend='auto' uses the slow per-tensor 'reference' backend for %s parameters "
                "on %s (%s); onecycle_fused.available_backends() = %s",
                sorted(map(str, dtypes)), device, "; ".join(why), available_backends())


def resolve(name: str, device: torch.device, dtypes) -> Backend:
    """The backend to use for parameters of ``dtypes`` on ``device``.

    One backend serves a whole device so that the step counter advances once.
    Raises ValueError if ``name`` cannot serve them.
    """
    # complex parameters reach the backends as real views (optim.py's _real)
    dtypes = {d.to_real() for d in dtypes}

    def serves(b):
        return b is not None and b.available() and all(b.supports(device, d) for d in dtypes)

    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("reference",))
        for candidate in order:
            b = get_backend(candidate)
            if serves(b):
                if candidate == "reference" and order[0] != "reference":
                    _warn_slow_fallback(device, dtypes, order)
                return b
        raise ValueError(f"no backend supports {sorted(map(str, dtypes))} parameters on {device}")
    b = get_backend(name)
    if b is None or not b.available():
        raise ValueError(f"backend {name!r} is not available in this build (available: {available_backends()})")
    if not serves(b):
        # name the dtypes it lacks, not every dtype on the device (the others it takes)
        lacking = sorted(str(d) for d in dtypes if not b.supports(device, d))
        raise ValueError(f"backend {name!r} does not support {lacking} parameters on {device}")
    return b
