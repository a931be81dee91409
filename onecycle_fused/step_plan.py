"""Step plans: the host side of ``optimizer.step()``, built once and reused.

Building the backend's lists costs about 1 us of Python per parameter (p.grad,
a ``state[p]`` lookup that hashes the tensor in Python, a dozen appends), and
handing them to the op another ~0.6 us (pybind converts every tensor). On a
GPU that host time *is* the step time when there are many tensors. So after a
list-path step the optimizer keeps, per device, a ``StepPlan`` (a C++ object,
``csrc/ops.cpp``) holding those lists but the grads, and later steps call
its ``step(table, counter, grad_scale, found_inf)`` (what the op
``onecycle_fused::step_planned_`` calls), which reads the grads in C++ and
calls the same ``sgd_step_`` / ``adam_step_``.

A plan is reused only while nothing it was built from changed. Checked here
per step, in C-level passes (no Python call per parameter), by ``snapshot``:
the same ``param_groups`` list and group dicts, each group's same ``params``
list with the same tensors in the same order, the same ``optimizer.state``
with the same keys in the same order and the same values in each per-param
state dict (ids: iterating keys does not hash tensors); plus, by identity,
the table rows ``_refresh_tables`` last built (hyper-parameter changes) and
the ``state`` / ``param_groups`` objects (``load_state_dict`` replaces both).
Checked in C++ per step: every planned param has a grad of its dtype, shape
and layout, no other param has one, and every state tensor the plan was
built from is still alive (the plan holds them weakly, so an id compared here
can only be reused by a new tensor once the old one died, which C++ sees; the
params and the 0-dim step counts it holds strongly cannot die).
Anything else falls back to the list path, which raises the usual errors or
builds a new plan.

The triton backend keeps a plan of its own in Python
(``backends/triton.py``, ``TritonPlan``), validated here the same way. It
reads the grads in Python and steps through the backend's launch tables:
a cached one is hit only by tensors at its addresses in its layouts, dtypes
and devices (``_C.launch_key``), and a new one's build checks every grad
against its parameter; a table that cannot be built sends the step to the
list path (which raises, or copies tensors the kernels cannot walk). With
several devices every plan is asked first (``plan_ready``, tables built),
so that all devices step through plans or none does.

Never used under ``torch.compile`` (the list path is what compiles), for
DTensor or complex parameters, for the reference backend, or for triton
when ``_C`` did not load. ``ONECYCLE_FUSED_STEP_PLAN=0`` turns plans off (the list path on every
step); so does ``optimizer._step_plan_enabled = False``.
"""
from __future__ import annotations

import os
from itertools import chain
from operator import itemgetter
from typing import Any, Optional

import torch

ENABLED_BY_DEFAULT = os.environ.get("ONECYCLE_FUSED_STEP_PLAN", "1") != "0"

_params_of = itemgetter("params")
_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))

# A plan built and then invalidated before its first use is a wasted build
# (about as costly as a list-path step). After this many in a row, plans are
# not built for COOLDOWN_STEPS steps: a training loop that changes what the
# plan depends on every step (say, grads present on alternate steps) pays
# about 1/COOLDOWN_STEPS of a build per step, not one build per step.
MAX_WASTED_BUILDS = 3
COOLDOWN_STEPS = 64


def _snapshot_py(groups: list[dict], state: dict):
    """``snapshot`` in Python (when ``_C`` has no plan_fingerprint): ids and
    lengths, in C-level passes."""
    params_lists = list(map(_params_of, groups))
    per_param = list(state.values())
    values = chain.from_iterable(map(dict.items, per_param))
    try:
        ids = list(map(id, chain(groups, params_lists, chain.from_iterable(params_lists), state,
                                 chain.from_iterable(values))))
    except TypeError:  # dict.items of something not a dict
        return None
    return ids, list(map(len, chain(params_lists, per_param)))


def _fingerprint_function():
    from .ops import c_function

    return c_function("plan_fingerprint") or _snapshot_py


def snapshot(groups: list[dict], state: dict):
    """Everything the lists of a step are made from (see the module
    docstring), comparable with ``==``; None when ``state`` holds something
    other than dicts. csrc/ops.cpp's plan_fingerprint: ~10x faster than ids
    taken in Python."""
    global snapshot
    snapshot = _fingerprint_function()
    return snapshot(groups, state)


def all_params(groups: list[dict]) -> list:
    """Every group's parameters in order, in one list (C-level passes)."""
    return list(chain.from_iterable(map(_params_of, groups)))


def plain_tensors(groups: list[dict]) -> bool:
    """True when every parameter is a plain tensor or nn.Parameter: what a
    subclass's ``.grad`` returns in Python need not be what C++ reads."""
    return set(map(type, all_params(groups))) <= _PLAIN_TENSOR_TYPES


class PlanCache:
    """The optimizer's plans and what they were built from. A plain object,
    not optimizer attributes: torch.compile drops attribute writes on an
    Optimizer instance but keeps those on plain objects."""

    def __init__(self):
        self.plans: Optional[list[tuple[torch.device, Any]]] = None  # (device, StepPlan)
        self.groups = None
        self.state = None
        self.row_keys = None
        self.snapshot = None
        self.fresh = False  # built and not used yet
        self.wasted = 0  # builds in a row that were never used
        self.cooldown = 0  # list-path steps left before the next build
        self.planned_steps = 0  # steps that ran through plans (tests check plans are used)

    def drop(self) -> None:
        if self.plans is not None and self.fresh:
            self.wasted += 1
            if self.wasted >= MAX_WASTED_BUILDS:
                self.wasted = 0
                self.cooldown = COOLDOWN_STEPS
        self.plans = self.groups = self.state = self.row_keys = self.snapshot = None
        self.fresh = False

    def valid_for(self, groups: list[dict], state: dict, row_keys: list) -> bool:
        """True when the plans still describe this optimizer (else drops them)."""
        if (
            self.plans is not None
            and groups is self.groups
            and state is self.state
            and row_keys is self.row_keys
            and snapshot(groups, state) == self.snapshot
        ):
            return True
        self.drop()
        return False

    def used(self) -> None:
        self.fresh = False
        self.wasted = 0
        self.planned_steps += 1

    def may_build(self) -> bool:
        if self.cooldown > 0:
            self.cooldown -= 1
            return False
        return True

    def build(self, plans, groups: list[dict], state: dict, row_keys: list) -> None:
        snap = snapshot(groups, state)
        if snap is None:
            return
        self.plans, self.groups, self.state, self.row_keys, self.snapshot = plans, groups, state, row_keys, snap
        self.fresh = True


def plan_ready(plan, table, counter) -> bool:
    """Whether ``run_planned`` would step this device (asked of every device
    first when there are several: all step through plans or none does)."""
    if not isinstance(plan, torch.ScriptObject):  # a plan in Python (backends/triton.py's TritonPlan)
        return plan.ready(table, counter)
    return plan.ready()


def run_planned(plan, table, counter, grad_scale, found_inf) -> bool:
    """One device's step through its plan; False: nothing done, take the list path."""
    # A C++ StepPlan's method (what the op step_planned_ calls), a Python
    # TritonPlan's (backends/triton.py). Not the op: torch would look for
    # __torch_function__ on each argument, and on a ScriptObject that lookup
    # fails through a C++ exception, ~7 us a call (csrc/ops.cpp)
    return plan.step(table, counter, grad_scale, found_inf)
