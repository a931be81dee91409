"""FusedOneCycleSGD / FusedOneCycleAdam / FusedOneCycleAdamW.

``torch.optim.Optimizer`` subclasses whose step applies the update *and* the
1-Cycle schedule in one pass: lr and momentum are computed on the device from
a step-counter tensor, so ``step()`` never synchronises with the host and can
be captured in a CUDA graph.

What lives where:

* ``param_groups[i]['schedule']``: the group's schedule as a DeepSpeed-style
  config dict (scalars only); a group may override any schedule parameter by
  key, e.g. ``{'params': head, 'cycle_max_lr': 0.1}``.
* ``param_groups[i]['lr']`` (and ``'momentum'`` / ``'betas'``): a host mirror
  of the values the *next* step will use, for LR monitors. Writing them has
  no effect on the math; the schedule decides.
* one int64 step counter per device (``step_counter()``), saved in
  ``state_dict()['step_counter']``;
* per parameter: ``step`` (int64, 0-dim) and the usual torch state. A
  ``step`` that code other than ours put into ``state`` (DeepSpeed's universal
  checkpoint loader restores per-parameter state but not the counter) is
  taken over at the next step or counter read: made an int64 0-dim tensor of
  the parameter's device and, when it is ahead of the counter, the counter
  moves up to it (``_adopt_foreign_steps``).
* per device: a float64 table with one row per group (layout:
  ``schedule.Row``), rebuilt only when a group's hyper-parameters change.
"""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
import numbers
import os
import sys
from typing import Any, Callable, Iterable, Optional

import torch

from . import backends as _backends
from . import step_plan as _step_plan
from .backends import layout as _layout
from .checkpoint import _CheckpointMixin, _called_by_dcp_init, _own_step
from .host_mirror import _HostMirrorMixin, _HostStep, _LrWritten
from .schedule import (
    DECAY_STEP_SIZE_DEFAULT, KIND_LRRANGETEST, MAX_START_STEP, ROW_WIDTH, OneCycle, Row, TorchOneCycle,
    _SCHEDULE_KEYS, _Schedule, _keys_not_restating, _plain, schedule_from_config,
)
from .validation import (
    _STRIDED, _check_beta, _check_bool, _check_grad, _check_nonneg, _check_scalar_schedule,
    _explain_torch_only_kwargs, _row_number,
)

__all__ = ["FusedOneCycleSGD", "FusedOneCycleAdam", "FusedOneCycleAdamW"]

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # older torch, or torch built without distributed
    _DTensor = ()  # isinstance(x, ()) is always False

# the schedules' namespace in a group dict (DeepSpeed's names); torch's
# own schedulers write none of these (OneCycleLR: initial_lr, max_lr, min_lr...)
_SCHEDULE_PREFIXES = ("cycle_", "decay_", "lr_range_test_", "post_cycle_")

_BATCH_TENSOR_LISTS = ("params", "grads", "steps", "momentum_buffers", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (FSDP2's ``fully_shard``, tensor
    parallel), else ``t``. The update is element-wise and its hyper-parameters
    come from the table, so each rank steps its own shard; the shard shares the
    DTensor's storage, so in-place writes land in it."""
    return t.to_local() if isinstance(t, _DTensor) else t


# (not dtype.to_real(): dynamo cannot trace it)
_REAL_OF = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A complex tensor as its real view ``[..., 2]`` (real and imaginary
    parts), else ``t``. torch.optim steps complex parameters this way: every
    hyper-parameter is real, so the update acts on each part alone. Built as
    a dtype view of a unit last dim, which is ``view_as_real`` for any
    strides: inductor fails on ``view_as_real`` of a mutated custom-op input
    (torch 2.13: "auto_functionalized_v2 was not removed")."""
    if t is None or not t.is_complex():
        return t
    return t.unsqueeze(-1).view(_REAL_OF[t.dtype])


def _hooked(step: Callable) -> Callable:
    """``step`` with torch.optim's step hooks and profiler range, as
    ``Optimizer.profile_hook_step`` (which ``Optimizer.__init__`` would wrap
    it in) gives them, but without its costs when nothing uses them: its
    ``record_function`` range costs ~6 us a step even with no profiler on
    (its exit is a TorchBind op whose ScriptObject argument torch searches
    for ``__torch_function__`` through a C++ exception), about a tenth of
    a planned step's host time. With a hook registered (the optimizer's or
    the global ones), a profiler on, or while torch.compile traces, it is
    torch's own wrapper that runs. (A standalone ExecutionTraceObserver,
    without torch.profiler, records no range then: a step hook, any, brings
    torch's wrapper back.) Called from a subclass's own ``step`` (which
    ``Optimizer.__init__`` wrapped, hooks and range included), only the
    step itself runs: hooks once, as torch.optim's own subclasses get them."""
    wrapped = torch.optim.Optimizer.profile_hook_step(step)
    from torch.optim import optimizer as torch_optimizer

    # ``step`` is decorated with torch.no_grad(), whose context object and
    # decorator cost ~2.5 us a call: here grad mode is switched by hand
    # around the function it decorates
    undecorated = step.__wrapped__
    set_grad_enabled = torch._C._set_grad_enabled

    @functools.wraps(step)
    def hooked_step(self, *args, **kwargs):
        if type(self).step is not hooked_step:  # (super().step() from a subclass's wrapped step)
            return step(self, *args, **kwargs)
        if (torch.compiler.is_compiling() or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
                or torch._C._autograd._profiler_enabled()):
            return wrapped(self, *args, **kwargs)
        enabled = torch.is_grad_enabled()
        set_grad_enabled(False)
        try:
            out = undecorated(self, *args, **kwargs)
        finally:
            set_grad_enabled(enabled)
        self._optimizer_step_code()  # (the profiler's Python tracer hooks this)
        return out

    hooked_step.hooked = True  # (Optimizer._patch_step_function: already wrapped)
    return hooked_step


def _on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """GradScaler's grad_scale / found_inf on ``device``, or None. No sync,
    except from a GPU to the CPU: a CPU kernel reads the value as soon as it
    is called, and a non-blocking device-to-host copy (into pinned memory)
    may not have landed by then, so that copy waits for it (only an
    optimizer with parameters on the CPU and a GradScaler on a GPU)."""
    if t is None:
        return None
    if device.type == "cpu" and t.device.type != "cpu":
        return t.to(device)
    return t.to(device, non_blocking=True)


def _freeze(value):
    """A hashable snapshot of a (nested) config value. A bool is told from
    the number it equals (``True == 1``, ``hash(True) == hash(1)``): one is
    valid where the other is not (``cycle_momentum``, a step size)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, bool):
        return (bool, value)
    return value


# the table columns that hold a flag: the user's (a bool), or one the
# optimizer derives (a truth value: np.bool_ from a numpy momentum != 0, a
# SymBool when compiled); the others hold a number
_FLAG_COLUMNS = frozenset((Row.NESTEROV, Row.MAXIMIZE, Row.AMSGRAD, Row.DECOUPLED))
_DERIVED_FLAG_COLUMNS = frozenset((Row.HAS_MOMENTUM_BUFFER,))


def _undo_added(added: list) -> None:
    """Remove the state entries a step's ``_fill_batch`` made, ``(p, state,
    key, step before or None, held None before)`` each, and restore the step
    counts it reset. An entry that held None before (a buffer saved as None,
    torch SGD's form of "none yet") holds None again."""
    for _, state, key, old_step, was_none in added:
        if was_none:
            state[key] = None
        else:
            state.pop(key, None)
        if old_step is not None:
            state["step"].copy_(old_step)


class _TableRows:
    """The rows the group tables were last built from (``_refresh_tables``).

    A holder of its own for the reason _HostStep is one: the write happens
    inside a compiled step too, where torch 2.13's dynamo drops attribute
    writes on an Optimizer and torch 2.11's raises on them.
    """

    def __init__(self):
        self.rows: list = []


def _given_schedule_keys(arguments: dict) -> dict:
    """The schedule keywords among a constructor's ``locals()``."""
    return {k: v for k, v in arguments.items() if k in _SCHEDULE_KEYS}


class _KnownSteps:
    """The per-parameter ``step`` tensors this optimizer made, loaded or was
    told about (``set_step``), by id, held strongly so that no other tensor
    can take one's id; and the ``step_plan.snapshot`` of the groups and state
    when they were last looked through. A plain object for the reason
    _HostStep is one."""

    def __init__(self):
        self.steps: dict[int, torch.Tensor] = {}
        self.snapshot = None


# Packages whose reading of _step_supports_amp_scaling gets False (the property below)
_TOLD_NO_AMP_SCALING = frozenset({"lightning", "pytorch_lightning", "lightning_fabric"})


class _FusedOneCycleOptimizer(_CheckpointMixin, _HostMirrorMixin, torch.optim.Optimizer):
    """Shared machinery; subclasses define the algorithm's hyper-parameters.
    state_dict / load_state_dict come from ``_CheckpointMixin`` (checkpoint.py),
    the host step count and lr mirror from ``_HostMirrorMixin`` (host_mirror.py)."""

    algo: str = ""

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch's GradScaler.step reads this; True makes it hand step()
        # grad_scale / found_inf (unscaled and skipped on the device, no host
        # sync), as for torch's fused optimizers. Lightning reads it too, and
        # for True refuses gradient_clip_val under bf16-mixed / 16-mixed (as
        # for torch's fused Adam) and skips its own unscale_. Our step also
        # takes grads unscaled beforehand (GradScaler then passes
        # grad_scale=None), so Lightning alone is told False and unscales and
        # clips as for any optimizer; everyone else reads True.
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return caller.split(".")[0] not in _TOLD_NO_AMP_SCALING

    def __init__(self, params, schedule: _Schedule, defaults: dict[str, Any], backend: str,
                 given_schedule_keys: Optional[dict] = None):
        if backend not in _backends.backend_names():
            raise ValueError(f"backend must be one of {_backends.backend_names()}, got {backend!r}")
        if not isinstance(schedule, _Schedule):
            raise ValueError(
                f"schedule must be a OneCycle, LRRangeTest or TorchOneCycle (or a config dict or JSON file path), "
                f"got {type(schedule).__name__}"
            )
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts")
        params = list(params)
        n_groups = len(params) if params and isinstance(params[0], dict) else 1
        schedule.check_num_groups(n_groups)
        self.schedule = schedule
        self.backend = backend
        # the schedule keywords as the constructor was given them (None for
        # a default too): ZeroRedundancyOptimizer copies them into our groups
        # before every step, after a schedule edit too (_keys_not_restating)
        self._given_schedule_keys = dict(given_schedule_keys or {})
        self._host = _HostStep()
        self._has_dtensors = False  # FSDP2 / tensor-parallel parameters
        self._has_complex = False  # complex parameters: the backends get real views (_real)
        self._counters: dict[torch.device, torch.Tensor] = {}
        self._backend_for: dict[torch.device, Any] = {}
        self._parameterless = False  # no parameter in any group: see _count_without_parameters
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """What is derived from the groups and rebuilt on use (also after unpickling)."""
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._retired_tables: list[torch.Tensor] = []  # see _refresh_tables
        self._table_rows = _TableRows()
        self._schedule_cache: dict[tuple, _Schedule] = {}
        self._schedule_seen: dict[int, tuple] = {}  # id(config) -> (config, its deep copy, schedule, value types)
        # the lists of the last list-path step, kept as C++ StepPlans (step_plan.py)
        self._plan = _step_plan.PlanCache()
        self._step_plan_enabled = _step_plan.ENABLED_BY_DEFAULT  # False: always the list path (tests)
        self._known_steps = _KnownSteps()
        self._lr_written = _LrWritten()

    # ------------------------------------------------------------------
    # param groups

    def _group_schedule(self, group: dict, index: int) -> dict:
        """The group's schedule config: the constructor's, reduced to this
        group, with any schedule keys the group dict sets on top."""
        overrides = {k: group.pop(k) for k in list(group) if k in _SCHEDULE_KEYS}
        for k in group:
            # torch.optim keeps unknown keys, and so do we, but not in the
            # schedule's own namespace: a misspelt schedule key would be kept
            # and never read, the group silently on the constructor's schedule
            if isinstance(k, str) and k.startswith(_SCHEDULE_PREFIXES):
                close = " or ".join(map(repr, difflib.get_close_matches(k, sorted(_SCHEDULE_KEYS), n=2)))
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(f"param group {index}: {k!r} is not a schedule parameter{hint}")
        if "schedule" in group:
            given = group["schedule"]
            if isinstance(given, _Schedule):
                base = given
            elif isinstance(given, dict):
                base = schedule_from_config(given)
            else:
                raise ValueError(
                    f"a group's schedule must be a OneCycle, LRRangeTest, TorchOneCycle or config dict, got {given!r}"
                )
        else:
            base = self.schedule
        n = base.num_groups
        if n is not None and index >= n:
            # a group added after construction while the schedule has per-group
            # lists: the group itself must give every list-valued parameter
            missing = [k for k in base._per_group_names if isinstance(getattr(base, k), list) and k not in overrides]
            if missing:
                raise ValueError(f"{missing} were given per group; the new parameter group must set them")
            per_group = base.for_group(0)
        else:
            per_group = base.for_group(index) if n is not None else base
        if overrides:
            params = per_group.params()
            if "post_cycle_decay_step_size" in overrides:
                if "decay_step_size" in overrides:
                    raise ValueError("give decay_step_size or its alias post_cycle_decay_step_size, not both")
                overrides["decay_step_size"] = overrides.pop("post_cycle_decay_step_size")
            unknown = set(overrides) - set(params)
            if unknown:
                raise ValueError(f"{sorted(unknown)} are not parameters of {type(per_group).__name__}")
            params.update(overrides)
            per_group = type(per_group)(**params)
        return _check_scalar_schedule(per_group).config()

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, set):  # torch's check, which list() below would hide
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list instead."
            )
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named):  # model.named_parameters(), as torch.optim takes it
            if not all(named):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        for p in params:  # torch's check, which p.device below would turn into an AttributeError
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
        if len(set(map(id, params))) != len(params):
            # torch only warns ("in future, this will cause an error"); a fused
            # step would update the tensor twice, differently per backend
            raise ValueError("a parameter group holds the same parameter more than once")
        group["params"] = params
        if "lr" in group and "schedule" not in group:
            # (a group copied from param_groups carries its schedule and the
            # lr mirror: that one is taken as it is)
            raise ValueError(
                f"param group {len(self.param_groups)}: 'lr' is set by the 1-Cycle schedule at every step and "
                "would be ignored; give the group its own schedule values instead, e.g. 'cycle_min_lr' and "
                "'cycle_max_lr' ('max_lr' with TorchOneCycle)"
            )
        # everything is validated before anything is added
        group["schedule"] = self._group_schedule(group, len(self.param_groups))
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self._validate_group(group)
        devices = dict.fromkeys(p.device for p in params)  # in order: the first one's counter is step_counter()'s default
        backends = {}
        for device in devices:
            dtypes = {p.dtype for p in params if p.device == device}
            dtypes |= {p.dtype for g in self.param_groups for p in g["params"] if p.device == device}
            backends[device] = _backends.resolve(self.backend, device, dtypes)
        super().add_param_group(group)
        self._has_dtensors = self._has_dtensors or any(isinstance(p, _DTensor) for p in params)
        self._has_complex = self._has_complex or any(p.is_complex() for p in params)
        for device, b in backends.items():
            self._backend_for[device] = b
            if device not in self._counters:
                if self._counters:  # join the others at the current step, on the device
                    self._counters[device] = next(iter(self._counters.values())).to(device, copy=True)
                else:
                    self._counters[device] = torch.zeros((), dtype=torch.int64, device=device)
        self._count_without_parameters()
        self._table_rows.rows = []  # tables are rebuilt at the next step
        self._plan.drop()  # (the snapshot would see the new group too)
        if self._host_code_runs() and (self._host.stale or self._host.replayable or self._host.pending):
            # after compiled steps or graph replays the host count is behind:
            # the new group's mirror (and the others') from the counter, as
            # get_last_lr does (one read; adding a group is rare)
            self._adopt_foreign_steps()
            self._resolve_pending()
        self._update_mirror()

    def _count_without_parameters(self) -> None:
        """Groups without parameters (torch.optim takes them: a frozen model,
        groups filled later) still count steps, so that the schedule
        advances: with no parameter in any group the count is kept on the
        CPU, and steps advance it through the reference backend, which has
        nothing else to step. Once parameters come (add_param_group, or put
        into a group's list by hand: _step), their devices' counters start
        from it and it goes: a device with no parameter would be stepped
        alone and be ``step_counter()``'s default."""
        if not self._counters:
            cpu = torch.device("cpu")
            self._counters[cpu] = torch.zeros((), dtype=torch.int64)
            self._backend_for[cpu] = _backends.get_backend("reference")
            self._parameterless = True
        elif self._parameterless and _step_plan.all_params(self.param_groups):
            self._parameterless = False
            self._follow_param_devices()  # (their devices' counters and backends; the CPU's goes)

    def _validate_group(self, group: dict, mirrored: bool = False) -> None:
        """Raise ValueError naming the first invalid hyper-parameter of ``group``.
        ``mirrored``: the group has been stepped, so its momentum / beta1 holds
        the schedule's mirror value where the schedule cycles it."""
        raise NotImplementedError

    def _constant_momentum(self, group: dict) -> float:
        raise NotImplementedError

    def _update_columns(self, group: dict, sched: _Schedule) -> dict[int, float]:
        """The update hyper-parameters' row columns (``sched``: the group's schedule)."""
        raise NotImplementedError

    def _group_name(self, group: dict) -> str:
        """``param_groups[i]`` for error messages (a group being added has no index yet)."""
        return next((f"param_groups[{i}]" for i, g in enumerate(self.param_groups) if g is group), "the group")

    def _schedule_of(self, group: dict) -> _Schedule:
        """The group's schedule object (parsed once per distinct config)."""
        config = group["schedule"]
        if torch.compiler.is_compiling():
            # traced: the parse costs trace time only. No cache: a value
            # edited between compiled steps is a symbolic float or int,
            # which _freeze cannot sort nor a dict key hash
            return _check_scalar_schedule(schedule_from_config(config))
        # _freeze sorts and rebuilds the config: ~5 us, three times a step
        # per group (table rows, lr mirror), a third of a planned step's
        # host time for ResNet-50. The same dict object, still equal to a
        # deep copy of what it held and its values of the same types, is the
        # same schedule: == alone takes a value edited to one of another type
        # that compares equal to it as unchanged (True == 1, a tensor == 0.5),
        # where one is valid and the other is not.
        seen = self._schedule_seen.get(id(config))
        if (seen is not None and seen[0] is config and seen[1] == config
                and (seen[3] is None or seen[3] == [*map(type, config["params"].values())])):
            return seen[2]
        if isinstance(config, _Schedule):
            # (add_param_group takes a schedule object, but the group then
            # holds its config; assigned later, _freeze below would fail
            # with "unhashable type")
            where = self._group_name(group)
            raise ValueError(
                f"{where}['schedule'] must be a schedule config dict, got a {type(config).__name__} object: "
                f"assign its .config() instead (or edit {where}['schedule']['params'])"
            )
        key = _freeze(config)
        sched = self._schedule_cache.get(key)
        # both maps kept small: configs replaced by new dicts, or a schedule
        # edited to new values again and again (a sweep, a value set every
        # epoch), made one entry each for the optimizer's lifetime (~1.3 KB)
        bound = 4 * len(self.param_groups) + 4
        if sched is None:
            try:
                sched = _check_scalar_schedule(schedule_from_config(config))
            except ValueError as e:  # an edit of one group's schedule among several: say which
                raise ValueError(f"{self._group_name(group)}['schedule']: {e}") from None
            if len(self._schedule_cache) > bound:
                self._schedule_cache.clear()
            self._schedule_cache[key] = sched
        if len(self._schedule_seen) > bound:
            self._schedule_seen.clear()
        params = config.get("params")
        types = [*map(type, params.values())] if isinstance(params, dict) else None
        self._schedule_seen[id(config)] = (config, copy.deepcopy(config), sched, types)
        return sched

    def _row(self, group: dict, sched: Optional[_Schedule] = None) -> list[float]:
        """The group's table row. A value of a type validation refuses raises
        TypeError (``_refresh_tables`` then validates, naming it): the rows
        decide whether the groups are validated again, and such a value can
        give the row of a valid one (``nesterov=0`` that of ``False``,
        ``weight_decay="0.1"`` that of ``0.1``). ``sched``: the group's schedule, if known."""
        if sched is None:
            sched = self._schedule_of(group)
        row = sched.row() + [0.0] * (ROW_WIDTH - Row.MOMENTUM - 1)
        # the constant momentum only matters when the schedule does not set it;
        # otherwise the mirrored value would change the row every step
        if not sched.cycles_momentum:
            row[Row.MOMENTUM] = _row_number(self._constant_momentum(group))
        for col, value in self._update_columns(group, sched).items():
            if col in _FLAG_COLUMNS or col in _DERIVED_FLAG_COLUMNS:
                # a flag as 1.0 / 0.0 through a branch: under torch.compile a
                # hyper-parameter edited between steps becomes a symbolic float,
                # and float() of a comparison of it (momentum != 0) is a
                # ToFloat(bool) that torch's symbolic shapes cannot evaluate
                if col in _FLAG_COLUMNS and not isinstance(value, (bool, torch.SymBool)):
                    raise TypeError(f"not a bool: {value!r}")
                row[col] = 1.0 if value else 0.0
            else:
                row[col] = value if type(value) is float else _row_number(value)
        return row

    def _drop_restated_schedule_keys(self, i: int, g: dict) -> None:
        """Schedule keys in a group dict after it was added: read only when a
        group is added, a value written later would be silently ignored, so
        it is refused. One that restates the group's schedule goes quietly
        (``_keys_not_restating``: ZeroRedundancyOptimizer's copies)."""
        keys = sorted(k for k in g if k in _SCHEDULE_KEYS)
        if "initial_lr" in g:  # torch's OneCycleLR writes max_lr, base_momentum... and this
            raise ValueError(
                f"param_groups[{i}][{keys[0]!r}]: a torch LR scheduler was attached to this optimizer; "
                "the 1-Cycle schedule is computed inside step(): drop the scheduler"
            )
        try:
            sched = self._schedule_of(g)
        except (TypeError, ValueError, KeyError):
            sched = None  # (a bad schedule: refused, and the step names it)
        differing = _keys_not_restating(g, sched, self._given_schedule_keys)
        if differing:
            raise ValueError(
                f"param_groups[{i}][{differing[0]!r}]: schedule values in a group are read when it is added; "
                f"to change one now, set param_groups[{i}]['schedule']['params'][{differing[0]!r}]"
            )
        for key in keys:
            del g[key]

    def _refresh_tables(self) -> Optional[list[_Schedule]]:
        """Rebuild the per-device group tables when any group's values changed.

        Changed values are validated first, as the constructor does: a
        hyper-parameter edited in ``param_groups`` to something invalid raises
        ValueError naming it, before the step changes anything. Returns the
        groups' schedules when nothing changed (the step's lr mirror reuses
        them: a schedule looked up costs a comparison of its config), else None."""
        compiling = torch.compiler.is_compiling()
        for i, g in enumerate(self.param_groups):
            # (traced too, with a loop dynamo can trace: compiled, such a key
            # was silently ignored where eager refuses it)
            if any(k in _SCHEDULE_KEYS for k in g) if compiling else not _SCHEDULE_KEYS.isdisjoint(g):
                self._drop_restated_schedule_keys(i, g)
        if not compiling:
            self._warn_if_lr_written()  # (after the errors above: they name the scheduler more precisely)
        try:
            schedules = [self._schedule_of(g) for g in self.param_groups]
            rows = [self._row(g, sched) for g, sched in zip(self.param_groups, schedules)]
        except (TypeError, ValueError, IndexError):
            rows = None  # e.g. maximize="yes", betas=(0.9,): validation below names it
        if rows is not None and rows == self._table_rows.rows:
            return schedules
        if rows is not None:
            rows = self._keep_mirrored_momentum(rows)
        for i, group in enumerate(self.param_groups):
            self._schedule_of(group)  # (a bad schedule names its group itself)
            try:
                # on a copy: validation also makes tensor betas numbers, which
                # must not reach an earlier group when a later one is refused
                self._validate_group(dict(group), mirrored=True)
            except ValueError as e:  # an edit of one group among several: say which
                raise ValueError(f"param_groups[{i}]: {e}") from None
        for group in self.param_groups:
            self._validate_group(group, mirrored=True)  # (all passed: now in place)
        if rows is None:
            rows = [self._row(g) for g in self.param_groups]
        self._check_not_capturing("upload the parameter groups' table (new, or a hyper-parameter changed)")
        host = torch.tensor(rows, dtype=torch.float64)
        pinned = None
        for device in self._counters:
            src = host
            if device.type == "cuda" and not torch.compiler.is_compiling():
                # a pageable host-to-device copy synchronises with the host;
                # from pinned memory it does not (the caching host allocator
                # keeps the block until the copy is done)
                if pinned is None:
                    pinned = host.pin_memory()
                src = pinned
            table = self._tables.get(device)
            if table is not None and table.shape == host.shape:
                table.copy_(src, non_blocking=True)  # keep the storage: CUDA graphs see the new values
            else:
                if table is not None and device.type == "cuda":
                    # a graph captured before the groups changed still reads
                    # the old table: kept alive (a few hundred bytes), its
                    # replay reads stale values, never freed memory
                    self._retired_tables.append(table)
                self._tables[device] = src.to(device, non_blocking=True)
        self._table_rows.rows = rows

    def _keep_mirrored_momentum(self, rows: list) -> list:
        """``rows`` once a group whose momentum stops being scheduled now
        (``cycle_momentum`` switched off, a schedule that sets none) keeps
        the momentum / beta1 its group holds: the mirror of the value the
        next step would have used. After steps the host did not count (a
        compiled step) that mirror is stale, and was used as it was: it is
        recomputed first (``_remirror_momentum``). A value the user set with
        the switch (not the one the mirror last wrote) is kept, as eager does."""
        old = self._table_rows.rows
        if not (self._host.stale or self._host.replayable) or len(old) != len(rows):  # (eager steps keep it current)
            return rows

        def scheduled(row):
            return row[Row.KIND] != KIND_LRRANGETEST and row[Row.CYCLE_MOMENTUM] != 0

        switching = [i for i, (new, was) in enumerate(zip(rows, old)) if scheduled(was) and not scheduled(new)]
        # a momentum / beta1 the user set with the switch (no longer the value
        # the mirror last wrote) is the user's constant, as in eager: kept
        written = self._lr_written.momenta
        switching = [i for i in switching if i >= len(written) or written[i] is None
                     or self._constant_momentum(self.param_groups[i]) == written[i]]
        return self._remirror_momentum(switching) if switching else rows

    # Reads the counter on the host: dynamo-disabled, so a compiled step
    # breaks its graph here (an error under fullgraph=True: call
    # get_last_lr() before such a compiled step) and everything this calls
    # runs eagerly, torch.compiler.is_compiling() False throughout.
    @torch.compiler.disable
    def _remirror_momentum(self, switching: list[int]) -> list:
        """The momentum mirror of the ``switching`` groups recomputed from
        their previous table rows at the counter (one read), and the rows
        made again with it."""
        if not self._host_code_runs():
            return [self._row(g) for g in self.param_groups]  # (captured: _check_not_capturing refuses the upload)
        from .backends.reference import schedule_values

        old = self._table_rows.rows
        self._resolve_pending()  # (stale: reads the counter once)
        _, moms = schedule_values(torch.tensor([old[i] for i in switching], dtype=torch.float64),
                                  torch.tensor(self._host.step))
        for i, mom in zip(switching, moms.tolist()):
            self._set_momentum_mirror(self.param_groups[i], mom)
            if i < len(self._lr_written.momenta):  # (every path that adds a group writes the mirror)
                self._lr_written.momenta[i] = mom
        return [self._row(g) for g in self.param_groups]


    # ------------------------------------------------------------------
    # step

    def step_counter(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The int64 0-dim tensor counting applied steps (on ``device``, default: the first)."""
        if self._host_code_runs():
            self._adopt_foreign_steps()
        return self._counter(device)

    def _counter(self, device: torch.device | str | None = None) -> torch.Tensor:
        if device is None:
            return next(iter(self._counters.values()))
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda": the current device, as torch reads it
            device = torch.device("cuda", torch.cuda.current_device())
        counter = self._counters.get(device)
        if counter is None:
            raise ValueError(
                f"no step counter on {device}: the optimizer counts steps on {[str(d) for d in self._counters]} "
                "(one per device its parameters are on)"
            )
        return counter

    def _host_code_runs(self) -> bool:
        """False while a step is traced by torch.compile or captured in a CUDA
        graph: host code then does not re-run with each call / replay."""
        return not (torch.compiler.is_compiling() or (
            any(c.is_cuda for c in self._counters.values()) and torch.cuda.is_current_stream_capturing()
        ))

    def _check_not_capturing(self, what: str) -> None:
        """Refuse, before anything changes, what a CUDA graph cannot replay.
        State made during capture would be made again (zeroed) at every
        replay, and the group table's host-to-device copy cannot be captured."""
        if not torch.compiler.is_compiling() and not self._host_code_runs():
            raise RuntimeError(
                f"{type(self).__name__}.step() during CUDA graph capture would {what}: run one step eagerly "
                "(outside the capture) first, with the same parameters having grads and the same hyper-parameters"
            )

    def _acknowledge_steps(self) -> None:
        """Take the per-parameter ``step`` tensors in ``state`` now as known."""
        known = self._known_steps
        known.steps = {id(s): s for st in self.state.values()
                       if isinstance(st, dict) and (s := st.get("step")) is not None}
        known.snapshot = _step_plan.snapshot(self.param_groups, self.state)

    def _adopt_foreign_steps(self) -> None:
        """Per-parameter ``step`` entries that someone else put into ``state``.

        Loaders that restore the per-parameter state without calling our
        ``load_state_dict`` (DeepSpeed's universal checkpoints: ZeRO 1-3 and
        bf16 write ``optimizer.state[p]['step']`` and the other entries
        directly) leave the step counter, and with it the schedule, where it
        was: at 0 in a freshly built optimizer. A parameter's ``step`` never
        exceeds the counter here (it counts the steps that parameter took),
        so one that does is the position of the run it was saved from: the
        counter moves up to the largest such ``step``. The entries are made
        int64 0-dim tensors on their parameter's device, each its own copy
        (a loader may share one tensor between parameters). Steps we made
        are known by identity (``_KnownSteps``); the groups' and state's
        ``step_plan.snapshot`` (a C-level pass) skips the look when nothing
        was replaced since the last one. ``set_step`` acknowledges whatever
        ``state`` holds: a position set by hand is never overridden.
        """
        known = self._known_steps
        snap = _step_plan.snapshot(self.param_groups, self.state)
        if snap is not None and snap == known.snapshot:
            return
        for g in self.param_groups:
            # state_dict's copy of the counter in each saved group, which such
            # a loader copies into the live groups with the other saved keys
            g.pop("step_counter", None)
        # also foreign: a step of ours now shared by a second parameter
        # (opt.state[q]["step"] = opt.state[p]["step"]): it would advance
        # once per parameter, or once per block of them (triton): split
        foreign, ours = [], set()
        for p, st in self.state.items():
            if isinstance(p, torch.Tensor) and isinstance(st, dict) and "step" in st:
                step = st["step"]
                if known.steps.get(id(step)) is not step or id(step) in ours:
                    foreign.append((p, st))
                else:
                    ours.add(id(step))
        if foreign:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            seen: set[int] = ours  # (taken: a foreign step that is one of these gets a copy)
            for p, st in foreign:
                # one that fits is kept (a compiled step made it, say)
                st["step"] = step = _own_step(st["step"], p, seen)
                by_device.setdefault(step.device, []).append(step)
            ahead = max(int(torch.stack(steps).max()) for steps in by_device.values())  # one read a device
            if ahead > int(self._counter()):
                self.set_step(ahead)  # (acknowledges)
                return
        self._acknowledge_steps()

    def set_step(self, step: int) -> None:
        """Place the schedule at ``step`` applied steps (counters and lr mirror).

        For migrating a run from another optimizer/scheduler pair; per-parameter
        step counts are left alone. Reads nothing back from the device.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step <= MAX_START_STEP:
            raise ValueError(f"step must be an integer in [0, 2**62], got {step!r}")
        step = int(step)  # a numpy integer too
        for c in self._counters.values():
            c.fill_(step)
        self._restart_host(step)
        self._update_mirror()
        self._acknowledge_steps()  # the position is the caller's, whatever the state's steps say


    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _fill_batch(self, batch, p, state, group, added: list) -> None:
        """Append the parameter's state tensors to ``batch``; a state entry
        made here for existing state is recorded in ``added`` as
        ``(p, state, key, step before or None, whether key held None)``, so
        that a step that fails afterwards can undo it."""
        raise NotImplementedError

    @_hooked
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling() and not self.state and _called_by_dcp_init():
            self._make_state_only()
            return loss
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            # GradScaler.step sums its per-device flags: with no grad on any
            # device that sum is the int 0 (nothing found), not a tensor
            found_inf = None if found_inf == 0 else torch.ones(())
        self._step(getattr(self, "grad_scale", None), found_inf)
        return loss

    def _make_state_only(self) -> None:
        """The state a first step makes, and nothing else: for
        torch.distributed.checkpoint's ``get_state_dict`` / ``set_state_dict``
        (``_init_optim_state``), which give a fresh optimizer zero grads, set
        every ``"lr"`` to 0 and call ``step()`` to make the state it loads
        into. Here ``"lr"`` is only a mirror, so that step would apply the
        lr of step 0 (weight decay moved the weights just loaded) and count
        (the schedule one step ahead). Stepped as one GradScaler skips
        (found_inf set): state made, parameters and counter unchanged."""
        lrs = [g.get("lr") for g in self.param_groups]
        for g, value in zip(self.param_groups, self._lr_written.values):
            g["lr"] = value  # (its 0 is no edit of ours to warn about)
        try:
            # known skipped, so the host's count and the lr mirror stay as they
            # are (mirror=False): _advance_mirror would count it optimistically
            # on a CUDA counter (the mirror one step ahead until a copy lands,
            # and the next step warning that DCP's restored 'lr' was written)
            # and copy a meta or other non-CPU counter the CUDA way, which fails
            self._step(None, torch.ones(()), mirror=False)  # (0-dim, as GradScaler passes it)
        finally:
            for g, value in zip(self.param_groups, lrs):
                g["lr"] = value

    def _step(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
              mirror: bool = True) -> None:
        if self._parameterless:  # (parameters may have been put into a group by hand)
            self._count_without_parameters()
        schedules = self._refresh_tables()  # (configs cannot change before _advance_mirror below)

        devices = self._counters.keys()
        if torch.compiler.is_compiling():
            self._check_no_duplicate_params()
        else:  # (first: dynamo never traces the plan code)
            devices = self._planned_step(grad_scale, found_inf)
            if not devices:
                if mirror:
                    self._advance_mirror(found_inf, schedules)
                return
            if self._host_code_runs():  # (a valid plan: no state entry was replaced since it was built)
                self._adopt_foreign_steps()
            # (a valid plan was built from lists that passed this check)
            self._check_no_duplicate_params()

        batches = {}
        for device in devices:
            counter = self._counters[device]
            batches[device] = _backends.StepBatch(
                algo=self.algo, params=[], grads=[], steps=[], group_ids=[],
                table=self._tables[device], counter=counter, groups=self.param_groups,
                grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device),
            )
        without_grad = []  # what a plan must watch for a first grad
        # Every grad is checked before anything changes: a bad one in the last
        # group must not leave the first ones stepped. The compiled ops and the
        # reference backend check all their tensors before writing any, so
        # with one such device the backend's own check does it; the triton
        # backend is checked here (~0.6 us a parameter).
        check = len(batches) > 1 or not all(
            getattr(self._backend_for[d], "checks_before_writing", False) for d in batches
        )
        counters = self._counters
        moved = False  # a parameter on a device that has no counter
        has_complex = self._has_complex  # (a flag: is_complex() per parameter costs ~0.3 ms a step for 5,000)
        created = []  # params whose state this step created: dropped again if it fails
        # state entries _fill_batch added to existing state (a momentum buffer,
        # max_exp_avg_sq switched on later): (param, state, key, step before)
        added = []
        compiling = torch.compiler.is_compiling()
        strict = [d for d in batches if getattr(self._backend_for[d], "needs_param_layout", False)]
        if strict and not compiling:
            # states laid out unlike their parameters (model.to(memory_format=
            # ...) after they were made), which the cuda op refuses: laid out
            # as the parameters first. The list path only: a step plan finds
            # such a state itself and sends the step here
            self._states_to_param_layout(strict)
        stepped = set()
        try:
            i = -1  # the parameter's position over all groups, as the ops count
            for gid, group in enumerate(self.param_groups):
                for p in group["params"]:
                    i += 1
                    grad = p.grad
                    batch = batches.get(p.device)
                    if batch is None:  # its device already stepped through its plan, or it moved
                        moved = moved or p.device not in counters
                    if grad is None:
                        without_grad.append(p)
                        continue
                    if batch is None:
                        continue
                    # sparse grads are named here for every backend (an op would
                    # name its dispatch key, not the problem)
                    if check or has_complex or grad.layout != _STRIDED:
                        _check_grad(self, i, p, grad)
                    state = self.state[p]
                    if len(state) == 0:
                        self._check_not_capturing("create optimizer state (it would be zeroed at every replay)")
                        created.append(p)
                        state.update(self._init_state(p, group))
                        if not compiling:
                            self._known_steps.steps[id(state["step"])] = state["step"]
                    else:
                        self._check_state_entries(i, p, state)
                    batch.params.append(p)
                    batch.grads.append(grad)
                    batch.steps.append(state["step"])
                    batch.group_ids.append(gid)
                    self._fill_batch(batch, p, state, group, added)
            if moved and len(batches) == len(counters):  # (nothing was stepped through a plan)
                for p in created:
                    self.state.pop(p, None)
                created = []
                _undo_added(added)
                added = []
                self._follow_param_devices()
                self._step(grad_scale, found_inf, mirror)  # again, on the devices the parameters are on now
                return
            if not compiling and not self._has_dtensors:
                several = len(batches) > 1
                for device, batch in batches.items():
                    where = f"on {device}: " if several else ""
                    _layout.check_states_unshared(batch.params, batch.algo, batch.state_lists(), where=where)
                    if several:
                        # a backend refuses overlapping states (and cuda a strided
                        # parameter) before it writes, but only on its device: the
                        # others would be stepped already
                        _layout.check_batch_states_apart(batch.params, batch.grads, batch.algo,
                                                         batch.state_lists(), where=where)
                        if device in strict:
                            _layout.check_dense(batch.params, where=where)
            # every device's counter advances, even where no parameter has a grad
            for device, batch in batches.items():
                if self._has_dtensors or has_complex:
                    # backends see plain real tensors: DTensors are stepped shard
                    # by shard, complex tensors as their real views
                    for name in _BATCH_TENSOR_LISTS:
                        setattr(batch, name, [_real(_local(t)) for t in getattr(batch, name)])
                self._backend_for[device].step(batch)
                stepped.add(device)
        except BaseException as e:
            for p in created:
                if p.device not in stepped:
                    self.state.pop(p, None)
            _undo_added([a for a in added if a[0].device not in stepped])
            if not (isinstance(e, ValueError) and not stepped and not compiling
                    and len(batches) == len(counters) and self._parameters_changed_kind()):
                raise
            retry = True
        else:
            retry = False
        if retry:
            # a parameter put into a group's list by hand needs what
            # add_param_group would have set up: once that is done, the step
            # again (outside the handler: its errors are its own)
            self._follow_param_devices()
            self._step(grad_scale, found_inf, mirror)
            return
        if not torch.compiler.is_compiling() and len(batches) == len(self._counters):
            self._build_plans(batches, without_grad)
        if mirror:
            self._advance_mirror(found_inf, schedules)

    def _check_state_entries(self, i: int, p: torch.Tensor, state: dict) -> None:
        """Refuse a parameter's state that lacks an entry the update reads
        (set to None or deleted by hand) before anything is written: the
        reference backend stepped the parameters before it and then failed on
        None, triton stepped it without the entry, cpu named a schema type."""
        for key in self._required_state:
            if not isinstance(state.get(key), torch.Tensor):
                what = "has no" if key not in state else f"holds {type(state[key]).__name__} as its"
                raise RuntimeError(
                    f"{type(self).__name__}: the state of params[{i}] ({tuple(p.shape)}) {what} {key!r}, which "
                    f"the update reads: give it a tensor (as state_dict() saved it), or pop the parameter's state "
                    f"(optimizer.state.pop(p)) to start it afresh"
                )

    def _check_no_duplicate_params(self) -> None:
        """A parameter put into ``param_groups[i]['params']`` twice after the
        groups were added (torch.optim and add_param_group refuse it there):
        a fused op would update it twice reading its step count once (cpu,
        cuda) or twice (reference), so the backends would disagree. Refused
        before anything changes; one C-level pass over the ids. Traced too
        (dynamo cannot trace that pass: a Python one, at trace time; the
        parameters' identities are guarded): compiled, a duplicate was
        stepped without a word, the step counter advancing twice a step."""
        if torch.compiler.is_compiling():
            params = [p for group in self.param_groups for p in group["params"]]
        else:
            params = _step_plan.all_params(self.param_groups)
        if len(set(map(id, params))) == len(params):
            return
        seen: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) in seen:
                    g0, j0 = seen[id(p)]
                    raise ValueError(
                        f"param_groups[{gi}]['params'][{j}] is param_groups[{g0}]['params'][{j0}]: a parameter "
                        "may appear only once (in one parameter group, as torch.optim requires)"
                    )
                seen[id(p)] = (gi, j)

    def _parameter_setup(self) -> tuple[dict, bool, bool]:
        """What the parameters now in the groups need: a backend per device
        (ValueError where none takes their dtypes there), and whether any is
        a DTensor (stepped shard by shard) or complex (stepped as real views)."""
        dtypes: dict[torch.device, set] = {}
        has_dtensors = has_complex = False
        for group in self.param_groups:
            for p in group["params"]:
                dtypes.setdefault(p.device, set()).add(p.dtype)
                has_dtensors = has_dtensors or isinstance(p, _DTensor)
                has_complex = has_complex or p.is_complex()
        backends = {device: _backends.resolve(self.backend, device, d) for device, d in dtypes.items()}
        return backends, has_dtensors, has_complex

    def _parameters_changed_kind(self) -> bool:
        """After a step refused its tensors: does a parameter put into a
        group's list by hand (torch.optim takes it; ``add_param_group`` sets
        these up) need what the optimizer has not set up: real views for a
        complex one, shard-wise steps for a DTensor, or another backend for
        its dtype on its device? Checked only then: ``is_complex()`` on every
        parameter costs ~0.3 ms a step over 5,000."""
        try:
            backends, has_dtensors, has_complex = self._parameter_setup()
        except ValueError:
            return False  # (the step's own error says it better)
        return (has_dtensors != self._has_dtensors or has_complex != self._has_complex
                or any(type(b) is not type(self._backend_for.get(d)) for d, b in backends.items()))

    def _states_to_param_layout(self, devices) -> None:
        """The states of parameters on ``devices`` that are laid out unlike
        their parameters, copied into the parameter's layout
        (``layout.in_param_layout``). ``model.to(memory_format=
        torch.channels_last)`` after the state was made gives such states
        (load_state_dict lays out what it loads). The ``cuda`` op refuses
        them; torch.optim's default path takes them. Never while capturing."""
        if not self._host_code_runs():
            return
        for p, state in self.state.items():
            if not isinstance(p, torch.Tensor) or not isinstance(state, dict) or p.device not in devices:
                continue
            for k in self._state_tensors:
                t = state.get(k)
                if isinstance(t, torch.Tensor):
                    laid_out = _layout.in_param_layout(t, p)
                    if laid_out is not t:
                        state[k] = laid_out

    def _follow_param_devices(self) -> None:
        """Counters, backends and tables for the devices the parameters are on now.

        Parameters can change device after the optimizer was built: DeepSpeed's
        fp16 / ZeRO wrappers put their flat fp32 master partitions (on the
        GPU) into ``param_groups`` in place of the CPU parameters the client
        optimizer was given, and code may do the same by hand. Without this,
        their device has no counter and the step skips them without a word.
        A new device gets a counter at the current step and a backend; a
        device that holds no parameter any more is dropped (its counter would
        go on advancing alone, and ``step_counter()`` would report it). The
        dicts are changed in place (compiled steps drop or refuse attribute
        writes on an Optimizer)."""
        # every backend is resolved (or raises) before anything changes
        backends, has_dtensors, has_complex = self._parameter_setup()
        if not backends:  # (no parameter at all)
            return
        source = next(iter(self._counters.values()))
        counters = {
            device: self._counters[device] if device in self._counters else source.to(device, copy=True)
            for device in backends
        }
        self._counters.clear()
        self._counters.update(counters)
        self._backend_for.clear()
        self._backend_for.update(backends)
        for device in [d for d in self._tables if d not in counters]:
            del self._tables[device]
        self._table_rows.rows = []  # tables for the new devices at the next step
        self._plan.drop()
        if has_dtensors != self._has_dtensors:
            self._has_dtensors = has_dtensors
        if has_complex != self._has_complex:
            self._has_complex = has_complex

    # ------------------------------------------------------------------
    # step plans (step_plan.py): the lists of a list-path step, reused

    def _plans_allowed(self) -> bool:
        return (
            self._step_plan_enabled
            and not self._has_dtensors
            and not self._has_complex  # a plan's C++ side reads p.grad of what it holds: not of real views
            # the compiled cpu / cuda backends and triton; reference (and test doubles) keep the lists
            and all(callable(getattr(b, "make_plan", None)) for b in self._backend_for.values())
        )

    def _build_plans(self, batches: dict, without_grad: list[torch.Tensor]) -> None:
        """Keep this step's lists as one StepPlan per device."""
        cache = self._plan
        if not self._plans_allowed() or not cache.may_build() or not _step_plan.plain_tensors(self.param_groups):
            return
        plans = []
        for device, batch in batches.items():
            watched = [p for p in without_grad if p.device == device]
            plan = self._backend_for[device].make_plan(batch, watched)
            if plan is None:  # (the backend has no plan to offer now: triton without _C)
                return
            plans.append((device, plan))
        cache.build(plans, self.param_groups, self.state, self._table_rows.rows)

    def _planned_step(self, grad_scale, found_inf):
        """Steps devices through their plans. Returns the devices left for the
        list path: none when the plans did it all, all of them when no plan
        fits (then nothing was stepped)."""
        cache = self._plan
        if cache.plans is None:
            return self._counters.keys()
        if not self._step_plan_enabled:
            cache.drop()
            return self._counters.keys()
        if not cache.valid_for(self.param_groups, self.state, self._table_rows.rows):  # (dropped them)
            return self._counters.keys()
        plans = cache.plans
        if len(plans) > 1 and not all(
            _step_plan.plan_ready(plan, self._tables[device], self._counters[device]) for device, plan in plans
        ):
            cache.drop()  # several devices step all through plans or none
            return self._counters.keys()
        left = []
        for device, plan in plans:
            if left or not _step_plan.run_planned(
                plan, self._tables[device], self._counters[device], _on(grad_scale, device), _on(found_inf, device)
            ):
                left.append(device)
        if left:
            cache.drop()
            return left
        cache.used()
        return left


    # ------------------------------------------------------------------
    # copy.deepcopy and pickle (state_dict / load_state_dict: checkpoint.py)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups; the
        # schedule, the backend choice and the step counters are ours to keep
        self._resolve_pending(wait=True)
        state = super().__getstate__()
        state["_onecycle_fused"] = {
            "schedule": self.schedule,
            "backend": self.backend,
            "counters": self._counters,
            "host_step": self._host.step,
            "has_dtensors": self._has_dtensors,
            "given_schedule_keys": self._given_schedule_keys,
            "algo": self.algo,  # (an instance's own: FusedOneCycleAdam(decoupled_weight_decay=True))
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict calls this too, with state and param_groups only:
        # then everything of ours stays as it is
        ours = state.pop("_onecycle_fused", None)
        defaults = state.get("defaults", getattr(self, "defaults", None))
        had_differentiable = defaults is not None and "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:
            # torch's __setstate__ adds defaults["differentiable"] (its own
            # optimizers' step reads it); ours has no such option, and the
            # key would reach every group: load_state_dict fills the groups
            # from the defaults, add_param_group after unpickling too
            self.defaults.pop("differentiable", None)
        if ours is None:
            return
        self.schedule = ours["schedule"]
        self.backend = ours["backend"]
        self._given_schedule_keys = ours.get("given_schedule_keys", {})  # (absent: pickled before it existed)
        if ours.get("algo", self.algo) != self.algo:  # (absent: pickled before it existed, the class's)
            self.algo = ours["algo"]
        # keyed by where each counter is now: torch.load(map_location=...)
        # moves the tensors, not the dict's keys
        self._counters = {c.device: c for c in ours["counters"].values()}
        self._has_dtensors = ours["has_dtensors"]
        self._has_complex = any(p.is_complex() for g in self.param_groups for p in g["params"])
        self._host = _HostStep()
        self._host.step = ours["host_step"]
        self._parameterless = not _step_plan.all_params(self.param_groups)
        self._backend_for = {
            device: _backends.get_backend("reference") if self._parameterless else _backends.resolve(
                self.backend, device, {p.dtype for g in self.param_groups for p in g["params"] if p.device == device})
            for device in self._counters
        }
        self._reset_caches()
        self._acknowledge_steps()


_SCHEDULE_DOC = """
    Schedule (DeepSpeed ``OneCycle`` names and defaults; lists give one value
    per parameter group): ``cycle_min_lr``, ``cycle_max_lr`` (required unless
    ``schedule=`` is given), ``decay_lr_rate``, ``cycle_first_step_size``,
    ``cycle_second_step_size``, ``cycle_first_stair_count``,
    ``cycle_second_stair_count``, ``decay_step_size`` (alias
    ``post_cycle_decay_step_size``), ``cycle_momentum``, ``cycle_min_mom``,
    ``cycle_max_mom``, ``decay_mom_rate``.

    ``schedule``: a :class:`OneCycle`, :class:`LRRangeTest` or
    :class:`TorchOneCycle` (torch's ``OneCycleLR``), a config dict or a
    DeepSpeed JSON config file's path, used instead of the keywords: a
    schedule keyword set to anything but its default next to it is a
    ``ValueError`` (it would be ignored). ``backend``: ``"auto"`` (the first
    built of ``cpu`` / ``cuda``, ``triton`` for the device),
    ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
"""


# OneCycle's keyword defaults, which the optimizers' signatures repeat
_ONECYCLE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(OneCycle.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def _is_default(name: str, value) -> bool:
    default = _ONECYCLE_DEFAULTS[name]
    if value is default or (value is None and default is DECAY_STEP_SIZE_DEFAULT):  # (None: its old spelling)
        return True
    if default is None or isinstance(value, bool) != isinstance(default, bool):
        return False  # e.g. decay_step_size=0, cycle_momentum=1: something the user wrote
    # numbers compare by value (0 is decay_lr_rate's 0.0); a list is never a default
    return isinstance(value, numbers.Real) and value == default


def _build_schedule(schedule, cycle_min_lr, cycle_max_lr, **kw) -> _Schedule:
    if schedule is not None:
        if cycle_min_lr is not None or cycle_max_lr is not None:
            given = [n for n, v in (("cycle_min_lr", cycle_min_lr), ("cycle_max_lr", cycle_max_lr)) if v is not None]
            raise ValueError(
                f"{', '.join(given)} given together with schedule=: give either schedule= or the "
                "OneCycle keyword arguments, not both"
            )
        # the other OneCycle keywords cannot apply either: one set to anything
        # but its default would be silently dropped (e.g. cycle_momentum=False
        # next to schedule=TorchOneCycle(...) would keep cycling momentum)
        given = [name for name, value in kw.items() if not _is_default(name, value)]
        if given:
            raise ValueError(
                f"{', '.join(given)} given together with schedule=: set them in the schedule "
                "(they only build a OneCycle when schedule= is not given)"
            )
        if isinstance(schedule, (dict, str, os.PathLike)):
            # a config dict or a DeepSpeed JSON config file, as plot_schedule
            # and schedule_from_config take
            return schedule_from_config(schedule)
        return schedule
    if cycle_min_lr is None or cycle_max_lr is None:
        raise ValueError("cycle_min_lr and cycle_max_lr are required (or pass schedule=)")
    return OneCycle(cycle_min_lr, cycle_max_lr, **kw)


def _numbers_in_place(group: dict, keys: tuple[str, ...]) -> None:
    """The group's one-element tensor values of ``keys`` (torch.optim.SGD
    takes ``momentum=torch.tensor(0.9)``) made their numbers, in the group:
    constants of the update, read into the table row. Other values are left
    as they are, for the checks to name."""
    for key in keys:
        value = group.get(key)
        plain = _plain(value)
        if plain is not value:
            group[key] = plain


def _lowest_cycled_momentum(sched: _Schedule) -> tuple[str, float]:
    """(parameter name, value) of the smallest momentum a (one-group) schedule
    that cycles momentum reaches."""
    if isinstance(sched, TorchOneCycle):
        return min(("base_momentum", sched.base_momentum), ("max_momentum", sched.max_momentum), key=lambda t: t[1])
    if isinstance(sched, OneCycle):
        return "cycle_min_mom", sched.cycle_min_mom  # the decay phase only divides cycle_max_mom
    return "momentum", 1.0  # schedules that do not cycle momentum never get here


class FusedOneCycleSGD(_FusedOneCycleOptimizer):
    __doc__ = (
        """SGD with (Nesterov) momentum, ``torch.optim.SGD``'s math, with the
    1-Cycle schedule computed inside the fused step.

    With ``cycle_momentum=True`` (the default) the momentum follows the
    schedule; ``momentum`` is used when it does not (``cycle_momentum=False``
    or an :class:`LRRangeTest` schedule). From ``torch.optim.SGD(params,
    momentum=0.9)`` with ``OneCycleLR(opt, max_lr=0.1, total_steps=1000)``:
    ``FusedOneCycleSGD(params, schedule=TorchOneCycle(max_lr=0.1,
    total_steps=1000), momentum=0.9)``.
    """
        + _SCHEDULE_DOC
    )
    algo = "sgd"
    _required_state = ("step",)  # (momentum_buffer: made by the step where missing)
    _state_tensors = ("momentum_buffer",)

    @_explain_torch_only_kwargs
    def __init__(
        self,
        params: Iterable,
        cycle_min_lr=None,
        cycle_max_lr=None,
        decay_lr_rate=0.0,
        cycle_first_step_size=2000,
        cycle_second_step_size=None,
        cycle_first_stair_count=0,
        cycle_second_stair_count=None,
        decay_step_size=DECAY_STEP_SIZE_DEFAULT,
        cycle_momentum=True,
        cycle_min_mom=0.8,
        cycle_max_mom=0.9,
        decay_mom_rate=0.0,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        *,
        maximize=False,
        schedule=None,
        backend="auto",
        post_cycle_decay_step_size=None,
    ):
        sched = _build_schedule(
            schedule, cycle_min_lr, cycle_max_lr, decay_lr_rate=decay_lr_rate,
            cycle_first_step_size=cycle_first_step_size, cycle_second_step_size=cycle_second_step_size,
            cycle_first_stair_count=cycle_first_stair_count, cycle_second_stair_count=cycle_second_stair_count,
            decay_step_size=decay_step_size, cycle_momentum=cycle_momentum, cycle_min_mom=cycle_min_mom,
            cycle_max_mom=cycle_max_mom, decay_mom_rate=decay_mom_rate,
            post_cycle_decay_step_size=post_cycle_decay_step_size,
        )
        defaults = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, sched, defaults, backend, _given_schedule_keys(locals()))

    def _validate_group(self, group, mirrored=False):
        _numbers_in_place(group, ("momentum", "dampening", "weight_decay"))
        if not (mirrored and self._schedule_of(group).cycles_momentum):
            _check_nonneg("momentum", group["momentum"])
        _check_nonneg("dampening", group["dampening"])
        _check_nonneg("weight_decay", group["weight_decay"])
        _check_bool("nesterov", group["nesterov"])
        _check_bool("maximize", group["maximize"])
        if group["nesterov"]:
            sched = self._schedule_of(group)
            if group["dampening"] != 0 or (not sched.cycles_momentum and group["momentum"] <= 0):
                raise ValueError("nesterov momentum requires a momentum and zero dampening")
            if sched.cycles_momentum:
                # torch refuses nesterov with momentum 0; a cycled momentum
                # that reaches 0 is refused alike, naming the bound that is 0
                name, low = _lowest_cycled_momentum(sched)
                if low <= 0:
                    raise ValueError(
                        f"nesterov momentum requires a momentum: the cycled momentum reaches {name} = {low!r}"
                    )

    def _constant_momentum(self, group):
        return group["momentum"]

    def _uses_buffer(self, group, sched: Optional[_Schedule] = None) -> bool:
        """Whether the group's update reads a momentum buffer (``sched``: its schedule, if known)."""
        sched = self._schedule_of(group) if sched is None else sched
        return sched.cycles_momentum or group["momentum"] != 0

    def _update_columns(self, group, sched):
        return {
            Row.WEIGHT_DECAY: group["weight_decay"],
            Row.DAMPENING: group["dampening"],
            Row.NESTEROV: group["nesterov"],
            Row.MAXIMIZE: group["maximize"],
            Row.HAS_MOMENTUM_BUFFER: self._uses_buffer(group, sched),
        }

    def _set_momentum_mirror(self, group, mom):
        group["momentum"] = mom

    def _init_state(self, p, group):
        state = {"step": torch.zeros((), dtype=torch.int64, device=p.device)}
        if self._uses_buffer(group):
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _fill_batch(self, batch, p, state, group, added):
        if state.get("momentum_buffer") is None and self._uses_buffer(group):  # (None: saved so, as torch's SGD)
            # momentum switched on after the state was made (a constant
            # momentum edited from 0, or cycle_momentum set in the schedule):
            # torch makes the buffer at its first step with a momentum
            # (buf = grad). The kernels take that rule when the count is 0,
            # and for SGD the count serves only that rule (as
            # load_torch_optimizer_state treats it: no buffer, count 0). This
            # happens on the host, so also on a step GradScaler then skips
            # (as a first step's state is made): the count stays 0 and the
            # next applied step takes the rule, as torch's would.
            self._check_not_capturing("create a momentum buffer (it would be zeroed at every replay)")
            added.append((p, state, "momentum_buffer", state["step"].clone(), "momentum_buffer" in state))
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"].zero_()
        batch.momentum_buffers.append(state.get("momentum_buffer"))


class FusedOneCycleAdam(_FusedOneCycleOptimizer):
    __doc__ = (
        """Adam, ``torch.optim.Adam``'s math, with the 1-Cycle schedule computed
    inside the fused step. beta1 follows the schedule's momentum (bias
    correction uses the current beta1, as torch does with ``OneCycleLR``);
    ``betas[0]`` is used when momentum is not cycled; ``betas[1]`` is never
    changed.

    ``decoupled_weight_decay=True`` makes it AdamW, as with
    ``torch.optim.Adam`` (the same as :class:`FusedOneCycleAdamW`, whose own
    ``weight_decay`` default is 1e-2 where this one's stays 0); a group's own
    ``decoupled_weight_decay`` key decides for that group.
    """
        + _SCHEDULE_DOC
    )
    algo = "adam"
    _required_state = ("step", "exp_avg", "exp_avg_sq")  # (max_exp_avg_sq: made by the step where missing)
    _state_tensors = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    @_explain_torch_only_kwargs
    def __init__(
        self,
        params: Iterable,
        cycle_min_lr=None,
        cycle_max_lr=None,
        decay_lr_rate=0.0,
        cycle_first_step_size=2000,
        cycle_second_step_size=None,
        cycle_first_stair_count=0,
        cycle_second_stair_count=None,
        decay_step_size=DECAY_STEP_SIZE_DEFAULT,
        cycle_momentum=True,
        cycle_min_mom=0.8,
        cycle_max_mom=0.9,
        decay_mom_rate=0.0,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=None,
        amsgrad=False,
        *,
        maximize=False,
        schedule=None,
        backend="auto",
        post_cycle_decay_step_size=None,
        decoupled_weight_decay=None,
    ):
        # None: the class's rule (torch.optim.Adam's default False, AdamW's True)
        if decoupled_weight_decay is not None:
            _check_bool("decoupled_weight_decay", decoupled_weight_decay)
            if self.algo == "adamw" and not decoupled_weight_decay:
                raise ValueError("FusedOneCycleAdamW always decouples weight decay (decoupled_weight_decay=False "
                                 "is FusedOneCycleAdam, weight_decay as L2)")
        sched = _build_schedule(
            schedule, cycle_min_lr, cycle_max_lr, decay_lr_rate=decay_lr_rate,
            cycle_first_step_size=cycle_first_step_size, cycle_second_step_size=cycle_second_step_size,
            cycle_first_stair_count=cycle_first_stair_count, cycle_second_stair_count=cycle_second_stair_count,
            decay_step_size=decay_step_size, cycle_momentum=cycle_momentum, cycle_min_mom=cycle_min_mom,
            cycle_max_mom=cycle_max_mom, decay_mom_rate=decay_mom_rate,
            post_cycle_decay_step_size=post_cycle_decay_step_size,
        )
        if weight_decay is None:  # (the class's default: torch's Adam keeps 0 with decoupled_weight_decay=True)
            weight_decay = 1e-2 if self.algo == "adamw" else 0.0
        if decoupled_weight_decay:
            # torch.optim.Adam(decoupled_weight_decay=True) is AdamW: this
            # instance's update rule (the table's DECOUPLED column, the
            # state_dict's "algorithm"), kept by pickling (__getstate__)
            self.algo = "adamw"
        defaults = dict(betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, sched, defaults, backend, _given_schedule_keys(locals()))

    def _validate_group(self, group, mirrored=False):
        betas = group["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        # torch.optim.Adam takes one-element tensor betas; they are constants
        # of the update here, so they become Python numbers (as
        # load_torch_optimizer_state does with a torch state's tensor betas).
        # Written back only then: a list of numbers is left as it was set (a
        # step that validates and then fails on a grad changes no group)
        plain = tuple(map(_plain, betas))
        if any(x is not y for x, y in zip(plain, betas)):
            group["betas"] = plain
        betas = plain
        _numbers_in_place(group, ("eps", "weight_decay"))
        if not (mirrored and self._schedule_of(group).cycles_momentum):
            _check_beta("betas[0]", betas[0])
        _check_beta("betas[1]", betas[1])
        _check_nonneg("eps", group["eps"])
        _check_nonneg("weight_decay", group["weight_decay"])
        _check_bool("amsgrad", group["amsgrad"])
        _check_bool("maximize", group["maximize"])
        if "decoupled_weight_decay" in group:  # (a group's own, as torch.optim.Adam reads it)
            _check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _constant_momentum(self, group):
        return group["betas"][0]

    def _update_columns(self, group, sched):
        betas = group["betas"]
        if len(betas) != 2:  # (a triple's betas[1] gives a valid row)
            raise TypeError(f"betas not a pair: {betas!r}")
        return {
            Row.WEIGHT_DECAY: group["weight_decay"],
            Row.MAXIMIZE: group["maximize"],
            Row.BETA2: betas[1],
            Row.EPS: group["eps"],
            Row.AMSGRAD: group["amsgrad"],
            Row.DECOUPLED: _backends.decoupled_weight_decay(self.algo, group),
        }

    def _set_momentum_mirror(self, group, mom):
        betas = group["betas"]
        if isinstance(betas, (list, tuple)) and len(betas) == 2:
            group["betas"] = (mom, betas[1])
        # (not a pair, edited so: left for the next step's check to name)

    def _init_state(self, p, group):
        state = {
            "step": torch.zeros((), dtype=torch.int64, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _fill_batch(self, batch, p, state, group, added):
        batch.exp_avgs.append(state["exp_avg"])
        batch.exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"] and state.get("max_exp_avg_sq") is None:  # amsgrad switched on later
            self._check_not_capturing("create max_exp_avg_sq (it would be zeroed at every replay)")
            added.append((p, state, "max_exp_avg_sq", None, "max_exp_avg_sq" in state))
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        batch.max_exp_avg_sqs.append(state["max_exp_avg_sq"] if group["amsgrad"] else None)


class FusedOneCycleAdamW(FusedOneCycleAdam):
    __doc__ = (
        """AdamW (decoupled weight decay, default 1e-2), ``torch.optim.AdamW``'s
    math, with the 1-Cycle schedule computed inside the fused step.
    """
        + _SCHEDULE_DOC
    )
    algo = "adamw"
