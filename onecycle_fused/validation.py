"""Checks of what the optimizers are given: hyper-parameter values, a
parameter group's schedule, grads; and the reading of a value they rest on
(a table row's number; a one-element tensor as its number is schedule.py's
``_plain``, which the schedules' own checks use).

Each check raises the error that names the bad value before a constructor,
step or load changes anything. Plain functions of values, with no optimizer
state: kept apart from the optimizers' constructor and step (optim.py) and
load_state_dict (checkpoint.py), which share them with the torch.optim
migration (migrate.py).
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
from typing import Any

import torch

from .schedule import _Schedule


def _check_scalar_schedule(sched: _Schedule) -> _Schedule:
    """A group's schedule: every per-group value a scalar (lists give one value
    per group only at the optimizer level; the device row holds one value)."""
    lists = [n for n in sched._per_group_names if isinstance(getattr(sched, n), list)]
    if lists:
        raise ValueError(
            f"{', '.join(lists)} of a parameter group's schedule must be a single value, not a list "
            "(a list gives one value per group only in the optimizer's arguments)"
        )
    return sched


def _is_number(value) -> bool:
    """An int or float, or a numpy integer / floating scalar (np.float32,
    np.int64), as torch.optim and the schedule keywords take them. Not any
    numbers.Real: torch refuses a Fraction as a Scalar (the reference backend
    computes with the group's values)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    np = sys.modules.get("numpy")  # a numpy scalar means numpy is imported
    return np is not None and isinstance(value, (np.integer, np.floating))


_FLOAT_MAX = sys.float_info.max


def _check_nonneg(name: str, value) -> None:
    # comparisons, not math.isfinite: under torch.compile a value edited
    # between steps is a symbolic float, which comparisons guard on and
    # math.isfinite cannot take (NaN fails both comparisons)
    # (an int such as 10**400 compares below inf, and float() of it, when the
    # table row is made, overflows: bounded by the largest float, an int only,
    # as numpy would cast that bound to a np.float32's type with a warning)
    if (not _is_number(value) or not (-math.inf < value < math.inf) or value < 0
            or (type(value) is int and value > _FLOAT_MAX)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_beta(name: str, value) -> None:
    _check_nonneg(name, value)
    if value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


_STRIDED = torch.strided


_ROW_NUMBER_TYPES = (int, float, torch.SymInt, torch.SymFloat)  # (symbolic: edited between compiled steps)


def _row_number(value) -> float:
    """A table row's number: TypeError for a value that float() would take
    but validation refuses (a bool, a string, a tensor)."""
    if isinstance(value, bool) or not (isinstance(value, _ROW_NUMBER_TYPES) or _is_number(value)):
        raise TypeError(f"not a number: {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int such as 10**400: validation names it
        raise TypeError(f"not a float: {value!r}") from None


def _check_grad(opt, i: int, p: torch.Tensor, grad: torch.Tensor) -> None:
    """Refuse a grad the update cannot use, before the step changes anything
    (``i``: the parameter's position over all groups, as the ops count)."""
    if grad.layout != _STRIDED:
        raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients (got layout {grad.layout})")
    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
        raise ValueError(
            f"{type(opt).__name__}: grads[{i}] must match params[{i}] ({p.dtype} {tuple(p.shape)} on {p.device}), "
            f"got {grad.dtype} {tuple(grad.shape)} on {grad.device}"
        )


# torch.optim keywords the fused optimizers do not take, and what to give
# instead: a user swapping torch.optim.SGD(params, lr=0.1, ...) for ours gets
# the way over, not a bare "unexpected keyword argument"
_TORCH_ONLY_KWARGS = {
    "lr": "the learning rate comes from the schedule: give cycle_min_lr and cycle_max_lr (DeepSpeed's "
          "OneCycle), or schedule=TorchOneCycle(max_lr=..., total_steps=...) for torch's OneCycleLR",
    "foreach": "each step is one fused launch per (device, dtype) already; choose the kernels with backend=",
    "fused": "each step is one fused launch per (device, dtype) already; choose the kernels with backend=",
    "capturable": "every step is CUDA-graph capturable already (the schedule is read on the device)",
    "differentiable": "the fused step is not differentiable",
}


def _explain_torch_only_kwargs(init):
    """Wrap an optimizer's ``__init__`` so that a torch.optim keyword it lacks
    (``lr=``, ``foreach=``...) is a TypeError saying what to give instead. The
    signature seen by ``inspect`` stays ``init``'s."""
    accepted = inspect.signature(init).parameters

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        for name in kwargs:
            if name in _TORCH_ONLY_KWARGS and name not in accepted:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}: "
                                f"{_TORCH_ONLY_KWARGS[name]}")
        init(self, *args, **kwargs)

    return wrapper
