"""Saved state: ``state_dict()`` / ``load_state_dict()`` of the fused
optimizers (``_CheckpointMixin``) and the checks and helpers they use.

Apart from optim.py, which keeps the optimizers and their step: a state dict
carries more than torch.optim's (the step counter, at the top level and in
each group; the update rule that saved it), and a load refuses, before
anything changes, what torch's load would fail on half-way or what every
later step would refuse. Also here: ``_own_step`` (a per-parameter ``step``
put into ``state`` by a load, or by a loader other than ours, made what the
backends need) and ``_called_by_dcp_init`` (torch.distributed.checkpoint's
state-only step).

Pickling (``__getstate__`` / ``__setstate__``) stays in optim.py: unpickling
rebuilds what ``__init__`` builds there (host step, backends, caches).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math
import numbers
import sys
from typing import Any

import torch

from .backends import layout as _layout
from .schedule import _SCHEDULE_KEYS, MAX_START_STEP, _keys_not_restating, _plain, schedule_from_config
from .validation import _check_scalar_schedule


def _called_by_dcp_init() -> bool:
    """Whether step() was called by torch.distributed.checkpoint's
    ``_init_optim_state`` (a few frames up: torch's no_grad and step-hook
    wrappers sit between). Asked only while the state is empty."""
    f = sys._getframe(2)
    for _ in range(6):
        if f is None:
            return False
        if f.f_code.co_name == "_init_optim_state" and f.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            return True
        f = f.f_back
    return False


def _checked_step_counter(value) -> int:
    """A state_dict's ``step_counter`` (an int64 0-dim tensor, or an integer) as an int in [0, 2**62]
    (``MAX_START_STEP``: room left for the int64 counter to advance)."""
    k = None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool:
            k = int(value)  # (reads a device tensor once; load_state_dict is not a hot path)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        k = int(value)
    if k is None or not 0 <= k <= MAX_START_STEP:
        raise ValueError(f"state_dict step_counter must be an integer in [0, 2**62] (a 0-dim int64 tensor), "
                         f"got {value!r}")
    return k


def _kept_as_is(key, param_ids) -> bool:
    """A saved state key that is no parameter's: torch's state_dict numbers
    every parameter and keeps other keys of ``optimizer.state`` as they are
    (a state_dict pre hook may put one there, as torch's tests do); its
    load_state_dict keeps them, and so does ours. A key is a parameter's as
    torch's load maps it (``in`` its id map: an np.int64 index too); an
    integer in no group is not kept but refused (``_check_saved_state``)."""
    return key not in param_ids and not isinstance(key, numbers.Integral)


def _check_saved_state(state_dict: dict, groups: list, required: tuple = (), tensors: tuple = ()) -> None:
    """Refuse, before load_state_dict changes anything, per-parameter state
    that the load would fail on half-way (after torch replaced the state and
    groups): an entry that is no dict or belongs to no saved parameter (torch
    keeps such entries; here they would break every later step), or a
    ``step`` that is no count (``_own_step`` makes each an int64 0-dim tensor).
    And state every later step would refuse, the optimizer stuck with it: a
    non-empty entry without the ``required`` keys, or a ``tensors`` entry
    that is no tensor of its parameter's shape (torch casts its dtype and
    device to the parameter's).
    Groups that do not match ``groups`` are left to torch, whose message names that."""
    saved = state_dict["param_groups"]
    if len(saved) != len(groups) or any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
        return
    param_of = {i: p for s, g in zip(saved, groups) for i, p in zip(s["params"], g["params"])}
    counts: dict[torch.device, list] = {}  # tensor steps by device, their values read once per device
    for k, st in state_dict["state"].items():
        if _kept_as_is(k, param_of):
            continue
        if k not in param_of:
            raise ValueError(f"state_dict state[{k!r}] belongs to no parameter of its param_groups")
        if not isinstance(st, dict):
            raise ValueError(f"state_dict state[{k!r}] must be a dict of the parameter's state, got {st!r}")
        if st:
            missing = [key for key in required if key not in st]
            if missing:
                raise ValueError(f"state_dict state[{k!r}] has no {missing}: a step needs them")
        p = param_of[k]
        for key in tensors:
            value = st.get(key)
            if value is None and (key not in required or key not in st):
                # absent (an empty state is one no step has made yet), or None where a
                # step makes the buffer (as torch's SGD does for a None momentum_buffer)
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
                raise ValueError(
                    f"state_dict state[{k!r}][{key!r}] must be a tensor of its parameter's shape "
                    f"{tuple(p.shape)}, got {got}"
                )
        if "step" in st:
            step = st["step"]
            if isinstance(step, torch.Tensor):
                ok = step.numel() == 1 and not step.is_complex() and step.dtype != torch.bool
            else:
                ok = isinstance(step, numbers.Real) and not isinstance(step, bool)
            if ok and not isinstance(step, torch.Tensor):
                ok = 0 <= step < math.inf and float(step).is_integer()
            if not ok:
                raise ValueError(
                    f"state_dict state[{k!r}]['step'] must be a step count (a one-element tensor or a whole "
                    f"number >= 0), got {step!r}"
                )
            if isinstance(step, torch.Tensor):
                counts.setdefault(step.device, []).append((k, step))
    for device, items in counts.items():
        if device.type == "meta":
            continue  # (no values)
        values = torch.stack([s.detach().reshape(()).to(torch.float64) for _, s in items]).tolist()
        for (k, step), v in zip(items, values):
            # (int64 steps past 2^53 round, but stay finite and whole; torch
            # saves float32 steps, whole too: a fraction was cut to an int)
            if not (0 <= v < math.inf and v.is_integer()):
                raise ValueError(f"state_dict state[{k!r}]['step'] must be a whole step count >= 0, got {step!r}")


def _saved_schedule(group: dict):
    """A saved group's schedule, or None when its config is bad (the load
    names that itself, further on)."""
    try:
        return schedule_from_config(group["schedule"])
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _own_step(step, p: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """A per-parameter ``step`` as the backends need it: an int64 0-dim
    tensor on ``p``'s device that no other parameter shares (``taken``: ids
    of the tensors already given out to parameters; the id of the result is
    added). A count
    shared by several parameters would advance once per parameter each step,
    and the backends read it at different times: each gets its own copy."""
    fits = (isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.dim() == 0
            and step.device == p.device and id(step) not in taken and not step.is_inference())
    if not fits:
        with torch.inference_mode(False):  # (an inference tensor: see _load_state_dict)
            step = torch.as_tensor(step).to(device=p.device, dtype=torch.int64, copy=True).reshape(())
    taken.add(id(step))
    return step


_CLASS_OF_ALGO = {"sgd": "FusedOneCycleSGD", "adam": "FusedOneCycleAdam", "adamw": "FusedOneCycleAdamW"}


class _CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of ``_FusedOneCycleOptimizer``,
    which lists this class before torch.optim.Optimizer in its bases (so
    ``super()`` here reaches torch's). They read and set the optimizer's step
    counters, host mirror and caches through its own methods
    (``_counter``, ``_restart_host``, ``_update_mirror``, ``_validate_group``...)
    and attributes: ``algo``, ``_counters``, ``_table_rows`` and ``_plan`` (set in
    optim.py), ``_required_state`` / ``_state_tensors`` (each algorithm's class)."""

    @contextlib.contextmanager
    def _hooks_suspended(self, name: str):
        """torch's state_dict / load_state_dict without the hooks in ``name``,
        which ours run where they see the whole state (step counter included)."""
        hooks = getattr(self, name)
        setattr(self, name, collections.OrderedDict())
        try:
            yield hooks
        finally:
            setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        if self._host_code_runs():
            self._adopt_foreign_steps()
        with self._hooks_suspended("_optimizer_state_dict_post_hooks") as post_hooks:
            sd = super().state_dict()
        # torch copies each group dict shallowly; its other values are scalars
        # and tuples, but the schedule config is a nested dict: shared, an
        # edit of the state dict would reach the live groups (and later edits
        # of the live groups a state dict kept in memory)
        for g in sd["param_groups"]:
            if "schedule" in g:
                g["schedule"] = copy.deepcopy(g["schedule"])
        sd["step_counter"] = self._counter().detach().clone()
        # and in each group (torch copied the dicts): state_dict consumers
        # that keep only "state" and "param_groups", as
        # torch.distributed.checkpoint's get_state_dict (FSDP2), carry it there
        # (a meta counter, parameters not yet materialised, has no value to copy)
        if sd["step_counter"].device.type != "meta":
            counter = int(sd["step_counter"])
            for g in sd["param_groups"]:
                g["step_counter"] = counter
        # which update the state and hyper-parameters belong to: loaded into
        # another fused class, an SGD state would lack exp_avg (a KeyError at
        # the next step), an Adam one would be dropped for fresh momentum, and
        # an Adam weight_decay (L2) would become AdamW's decoupled decay
        sd["algorithm"] = self.algo
        # post hooks see (and may replace) the whole state dict, as with torch.optim
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # pre hooks first, as torch runs them: one may convert what it is given
        # (add 'step_counter', say), so the checks below see their result
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        with self._hooks_suspended("_optimizer_load_state_dict_pre_hooks"):
            with self._hooks_suspended("_optimizer_load_state_dict_post_hooks") as post_hooks:
                self._load_state_dict(state_dict)
        for hook in post_hooks.values():  # after the counter and mirror are loaded too
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the groups' copies of the counter (see state_dict) never reach the
        # live groups; the top-level one wins, the groups' serve where it was
        # dropped (torch.distributed.checkpoint's set_state_dict)
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and any(isinstance(g, dict) and "step_counter" in g for g in groups):
            groups = [dict(g) for g in groups]
            in_groups = [g.pop("step_counter", None) for g in groups]
            state_dict = {**state_dict, "param_groups": groups}
            if "step_counter" not in state_dict:
                if any(c is None or c != in_groups[0] for c in in_groups):
                    raise ValueError(
                        f"state_dict has no 'step_counter' and its param_groups' ones differ: {in_groups}"
                    )
                state_dict["step_counter"] = in_groups[0]
        if ("step_counter" not in state_dict and isinstance(groups, list) and groups
                and all(isinstance(g, dict) and "schedule" in g for g in groups)
                and isinstance(state_dict.get("state"), dict)):
            # our groups, with the counter dropped everywhere: get_state_dict's
            # flatten_optimizer_state_dict=True (torchtitan's default) rebuilds
            # the groups from the live groups' keys. The position is then the
            # largest per-parameter step, as for DeepSpeed's universal
            # checkpoints (_adopt_foreign_steps): exact unless steps ran in
            # which no parameter had a grad, or set_step moved the counter
            # away from the parameters' counts
            # (parameters' entries only, see _kept_as_is)
            ids = {i for g in groups if isinstance(g, dict) and isinstance(g.get("params"), list) for i in g["params"]}
            values = [_plain(st.get("step")) for k, st in state_dict["state"].items()
                      if isinstance(st, dict) and not _kept_as_is(k, ids)]
            # (a bad one, also a non-finite one: _check_saved_state below names it)
            steps = [int(v) for v in values
                     if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)]
            state_dict = {**state_dict, "step_counter": max(max(steps, default=0), 0)}
        if "step_counter" not in state_dict:
            raise ValueError(
                "state_dict has no 'step_counter': it was not saved by a FusedOneCycle optimizer "
                "(for a torch.optim one, use onecycle_fused.load_torch_optimizer_state)"
            )
        saved_algo = state_dict.get("algorithm")  # absent in checkpoints saved before it was added
        if saved_algo is not None and saved_algo != self.algo:
            raise ValueError(
                f"state_dict was saved by a {_CLASS_OF_ALGO.get(saved_algo, repr(saved_algo))} optimizer, "
                f"not a {type(self).__name__} ({_CLASS_OF_ALGO.get(self.algo, self.algo)}): its state and "
                "hyper-parameters belong to another update rule"
            )
        for i, g in enumerate(state_dict["param_groups"]):
            if "schedule" not in g:
                raise ValueError(f"state_dict param_groups[{i}] has no 'schedule'")
            # (every later step would refuse it, as _refresh_tables; one that
            # restates the group's schedule, as ZeroRedundancyOptimizer saves
            # its groups, is dropped there)
            if not _SCHEDULE_KEYS.isdisjoint(g) and (differing := _keys_not_restating(g, _saved_schedule(g),
                                                                                  self._given_schedule_keys)):
                key = differing[0]
                raise ValueError(
                    f"state_dict param_groups[{i}][{key!r}]: a schedule value in the group itself, which "
                    f"no step reads (a group's schedule is its 'schedule' config: set "
                    f"['schedule']['params'][{key!r}] instead)"
                )
            if saved_algo is None and ("betas" in g) == (self.algo == "sgd"):
                # no "algorithm" to compare: an Adam group holds betas, an SGD one
                # none (loaded across, SGD state failed at the next step with
                # KeyError 'exp_avg'; Adam state was dropped for a fresh buffer)
                raise ValueError(
                    f"state_dict param_groups[{i}] is {'an Adam' if 'betas' in g else 'an SGD'} group, "
                    f"not a {type(self).__name__} one: its state belongs to another update rule"
                )
            try:
                _check_scalar_schedule(schedule_from_config(g["schedule"]))  # a bad one raises before anything changes
                # the update hyper-parameters too, as the constructor checks them
                # (loaded unchecked, a bad one failed only at the next step)
                self._validate_group({**self.defaults, **g}, mirrored=True)
            except ValueError as e:
                raise ValueError(f"state_dict param_groups[{i}]: {e}") from None
        counter = _checked_step_counter(state_dict["step_counter"])
        _check_saved_state(state_dict, self.param_groups, self._required_state, self._state_tensors)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        # each parameter its own int64 step and its own state tensors: torch's
        # load keeps a tensor that several parameters (or keys) share shared,
        # so each step would update it once per parameter, and the compiled
        # CPU kernels, which split a step's elements between threads, would
        # write a shared state from two threads at once (a data race: results
        # then depend on the timing)
        taken: set[int] = set()
        for p, state in self.state.items():
            if not isinstance(p, torch.Tensor):  # (other keys: see _check_saved_state)
                continue
            if "step" in state:
                state["step"] = _own_step(state["step"], p, taken)
            for k in self._state_tensors:
                t = state.get(k)
                if isinstance(t, torch.Tensor):
                    if id(t) in taken or t.is_inference():
                        # shared: a copy of its own; an inference tensor (a
                        # checkpoint read under torch.inference_mode()), which
                        # torch refuses to update in place outside that mode
                        # (reference raised mid-step, the compiled backends wrote
                        # it through pointers): a normal copy, made outside the mode
                        with torch.inference_mode(False):
                            copy = _layout.in_param_layout(t, p)
                            state[k] = t = copy if copy is not t else t.clone()
                    else:
                        # saved from a model in another memory format: laid
                        # out as the parameter (the cuda op needs it so)
                        state[k] = t = _layout.in_param_layout(t, p)
                    taken.add(id(t))
        for c in self._counters.values():
            c.fill_(counter)
        self._restart_host(counter)
        self._table_rows.rows = []
        self._plan.drop()  # new state tensors, maybe new groups
        self._update_mirror()
        self._acknowledge_steps()
