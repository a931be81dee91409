"""1-Cycle and LR-range-test schedules: parameters, validation, DeepSpeed
config parsing and host evaluation in float64.

This file is the specification in code (``DESIGN.md`` §2). Every backend
computes the same values on the device from the step counter; the numbers
they need are packed per parameter group into a float64 row whose layout is
given by :class:`Row` below and mirrored in ``csrc/schedule.h`` and the
Triton kernels.

``k`` is always the number of optimizer steps already applied; the step about
to run uses ``lr(k)`` and ``momentum(k)``. This equals DeepSpeed's schedulers
driven as ``optimizer.step(); scheduler.step()``, and torch's ``OneCycleLR``
(:class:`TorchOneCycle`) driven the same way.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
from typing import Any, Mapping, Optional

__all__ = ["OneCycle", "LRRangeTest", "TorchOneCycle", "Row", "ROW_WIDTH", "schedule_from_config"]


class Row:
    """Column indices of the per-group float64 parameter row.

    One row per parameter group lives on the device (``optim.py`` builds the
    table); kernels read the schedule and the update hyper-parameters from it.
    Columns 0..13 describe the schedule, 14.. the update. Keep in sync with
    ``csrc/schedule.h`` / ``csrc/update.h`` and ``backends/triton_kernels.py``.
    """

    KIND = 0  # 0: OneCycle, 1: LRRangeTest, 2: TorchOneCycle
    # OneCycle                        # LRRangeTest reuses:    # TorchOneCycle reuses:
    FIRST_STEP_SIZE = 1               # step_size              # end step of phase 1: float(pct_start * T) - 1
    SECOND_STEP_SIZE = 2              #                        # end step of phase 2: float(2 * pct_start * T) - 2
    FIRST_STAIR_COUNT = 3             # staircase (0 / 1)      # anneal_strategy: 0 cos, 1 linear
    SECOND_STAIR_COUNT = 4            #                        # three_phase (0 / 1)
    DECAY_STEP_SIZE = 5               #                        # end step of the last phase: T - 1
    MIN_LR = 6                        # lr_range_test_min_lr   # initial_lr = max_lr / div_factor
    MAX_LR = 7                        #                        # max_lr
    DECAY_LR_RATE = 8                 # lr_range_test_step_rate  # min_lr = initial_lr / final_div_factor
    MIN_MOM = 9                       #                        # base_momentum
    MAX_MOM = 10                      #                        # max_momentum
    DECAY_MOM_RATE = 11               #                        # last step evaluated as is; later k use T - 1
    CYCLE_MOMENTUM = 12               # 1.0: momentum from the schedule
    MOMENTUM = 13                     # constant momentum / beta1 otherwise
    # update hyper-parameters (filled by the optimizer)
    WEIGHT_DECAY = 14
    DAMPENING = 15
    NESTEROV = 16
    MAXIMIZE = 17
    BETA2 = 18
    EPS = 19
    # AMSGRAD and HAS_MOMENTUM_BUFFER are read by no kernel (whether a tensor
    # has max_exp_avg_sq / a momentum buffer is per tensor): they are in the
    # row so that switching them changes it, which rebuilds the tables and
    # drops step plans (whose state lists must then grow)
    AMSGRAD = 20
    DECOUPLED = 21  # AdamW's decoupled weight decay
    HAS_MOMENTUM_BUFFER = 22  # SGD: 0 when the group never uses momentum


ROW_WIDTH = 24

KIND_ONECYCLE = 0
KIND_LRRANGETEST = 1
KIND_TORCH_ONECYCLE = 2
ANNEAL_COS = 0  # Row.FIRST_STAIR_COUNT of a TorchOneCycle row
ANNEAL_LINEAR = 1


# --------------------------------------------------------------------------
# validation helpers: each raises ValueError naming the parameter


_INT64_MAX = 2**63 - 1
# The largest step count an optimizer can be placed at (set_step,
# load_state_dict). The device counters are int64 and wrap past 2^63 - 1,
# where the host's mirror of the schedule cannot follow: it would raise after
# the kernels had stepped. 2^62 leaves 2^62 steps of headroom.
MAX_START_STEP = 2**62


class _DefaultZero(int):
    """``decay_step_size``'s default: DeepSpeed's 0, and shown so in the
    signatures, yet told apart (by identity) from a 0 the caller gives,
    which clashes with the alias ``post_cycle_decay_step_size``. Pickles
    as a plain 0."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "0"

    def __reduce__(self):
        return int, (0,)


DECAY_STEP_SIZE_DEFAULT = _DefaultZero()


def _plain(value: Any) -> Any:
    """A one-element real tensor, or a numpy real scalar, as its Python
    number (torch.optim takes a Tensor lr and tensor betas, e.g. for
    capturable or compiled steps; here they are constants of the schedule
    and the update, and a numpy scalar kept in a group would make the
    ``state_dict`` unloadable by ``torch.load(weights_only=True)``); anything
    else as is (numpy's bool is no real number: the flag checks refuse it).
    torch is looked up, not imported: this file does not need it, and a
    value can only be a tensor once torch is imported."""
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1
            and not value.dtype.is_complex):
        return value.item()
    if type(value).__module__ == "numpy" and isinstance(value, numbers.Real):
        return value.item()
    return value


def _as_int(name: str, value: Any, minimum: int) -> int:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(value, numbers.Integral):  # an integral float, numpy's (np.float32(1000.0)) too
        as_float = float(value)
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        value = as_float
    value = int(value)
    if not minimum <= value <= _INT64_MAX:  # (the device counts steps in int64)
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}"
                         + (" (beyond int64)" if value > _INT64_MAX else ""))
    return value


def _as_float(name: str, value: Any) -> float:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int such as 10**400
        raise ValueError(f"{name} must be finite, got {value!r}") from None
    # comparisons, not math.isfinite: under torch.compile a schedule value
    # edited between steps is a symbolic float (NaN fails both comparisons)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _nonneg(name: str, value: Any) -> float:
    value = _as_float(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _momentum(name: str, value: Any) -> float:
    value = _as_float(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _fresh_start(name: str, value: Any) -> None:
    """DeepSpeed's ``last_batch_iteration`` / torch's ``last_epoch`` (a
    config's too): the resume position is not part of the schedule's shape.
    A fresh start (-1, their default) is accepted; a position comes from the
    optimizer's state_dict, ``set_step`` or ``load_torch_optimizer_state``."""
    if isinstance(value, bool) or value != -1:
        raise ValueError(
            f"{name}={value!r} is not supported: a run resumes from the optimizer's state_dict "
            "(or set_step / load_torch_optimizer_state)"
        )


def _per_group(name: str, value: Any, check) -> float | list[float]:
    """A scalar, or a list/tuple with one value per parameter group."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} must not be an empty list")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return check(name, value)


def _at(value: float | list[float], group: int) -> float:
    return value[group] if isinstance(value, list) else value


def _copied(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each per-group list copied: what ``params()`` /
    ``config()`` return must not alias the schedule's own (validated) lists."""
    return {k: list(v) if isinstance(v, list) else v for k, v in params.items()}


class _Schedule:
    """Shared machinery: per-group lists, host evaluation, device rows."""

    _per_group_names: tuple[str, ...] = ()
    type_name = ""

    # -- per-group lists -------------------------------------------------
    @property
    def num_groups(self) -> int | None:
        """Number of groups the lists describe, or None if all values are scalars."""
        lengths = {len(getattr(self, n)) for n in self._per_group_names if isinstance(getattr(self, n), list)}
        return lengths.pop() if lengths else None

    def _check_list_lengths(self) -> None:
        lengths = {}
        for n in self._per_group_names:
            v = getattr(self, n)
            if isinstance(v, list):
                lengths[n] = len(v)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"per-group lists have different lengths: {lengths}")

    def check_num_groups(self, n: int) -> None:
        """Raise ValueError if a per-group list does not have ``n`` entries."""
        for name in self._per_group_names:
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != n:
                raise ValueError(f"expected {n} values for {name} (one per parameter group), got {len(v)}")

    def for_group(self, group: int) -> "_Schedule":
        """The same schedule with every per-group list reduced to group ``group``."""
        params = self.params()
        for name in self._per_group_names:
            params[name] = _at(params[name], group)
        return type(self)(**params)

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """DeepSpeed-style ``{"type": ..., "params": ...}`` (JSON- and weights_only-safe)."""
        return {"type": self.type_name, "params": self.params()}

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.params() == other.params()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # -- host evaluation ---------------------------------------------------
    def _eval(self, step: int, group: int) -> tuple[float, float | None]:
        raise NotImplementedError

    def _check_group(self, group: int) -> int:
        n = self.num_groups
        if isinstance(group, bool) or not isinstance(group, numbers.Integral) or group < 0 or (
            n is not None and group >= n
        ):
            have = "any group >= 0" if n is None else f"0 .. {n - 1}"
            raise ValueError(f"group must be a parameter group index ({have}), got {group!r}")
        return int(group)

    def _evaluate(self, step: int, group: int | None, index: int):
        step = _as_int("step", step, 0)
        if group is not None:
            return self._eval(step, self._check_group(group))[index]
        n = self.num_groups
        if n is None:
            return self._eval(step, 0)[index]
        return [self._eval(step, g)[index] for g in range(n)]

    def lr(self, step: int, group: int | None = None):
        """Learning rate of the step that runs after ``step`` applied steps.

        A float, or a list (one per group) when per-group lists were given and
        ``group`` is None.
        """
        return self._evaluate(step, group, 0)

    def momentum(self, step: int, group: int | None = None):
        """Momentum (SGD) / beta1 (Adam) after ``step`` applied steps, or None
        when this schedule does not set momentum."""
        if not self.cycles_momentum:
            _as_int("step", step, 0)
            if group is not None:
                self._check_group(group)
            return None
        return self._evaluate(step, group, 1)

    def _values(self, step: int) -> tuple[float, float | None]:
        """``(lr(step), momentum(step))`` in one evaluation and without their
        checks: for a schedule whose values are all scalars and a ``step``
        known to be an int >= 0. The optimizer's host mirror calls it every
        step: ~1 us, where the two checked calls cost ~5."""
        return self._eval(step, 0)

    # -- device row --------------------------------------------------------
    def row(self, group: int = 0) -> list[float]:
        """The schedule columns (``Row.KIND`` .. ``Row.MOMENTUM``) for one group."""
        raise NotImplementedError

    @property
    def cycles_momentum(self) -> bool:
        return False


class OneCycle(_Schedule):
    """DeepSpeed's 1-Cycle schedule (``deepspeed.runtime.lr_schedules.OneCycle``).

    Same parameter names and defaults. ``cycle_min_lr``, ``cycle_max_lr``,
    ``cycle_min_mom``, ``cycle_max_mom``, ``decay_lr_rate`` and
    ``decay_mom_rate`` take a list with one value per parameter group.
    ``post_cycle_decay_step_size`` (the tutorial's name) is an alias of
    ``decay_step_size``.

    Deliberate differences from DeepSpeed (see README): momentum at step 0 is
    ``cycle_max_mom``; ``decay_mom_rate`` divides momentum like lr instead of
    multiplying it; beta2 is never touched.
    """

    type_name = "OneCycle"
    _per_group_names = ("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_min_mom", "cycle_max_mom", "decay_mom_rate")

    def __init__(
        self,
        cycle_min_lr,
        cycle_max_lr,
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
        *,
        post_cycle_decay_step_size=None,
        last_batch_iteration=-1,
    ):
        _fresh_start("last_batch_iteration", last_batch_iteration)
        # decay_step_size defaults to DeepSpeed's 0, a marked one, so that
        # giving it together with its alias is an error (None, the default
        # before, still means "not given")
        if post_cycle_decay_step_size is not None:
            if decay_step_size is not None and decay_step_size is not DECAY_STEP_SIZE_DEFAULT:
                raise ValueError("give decay_step_size or its alias post_cycle_decay_step_size, not both")
            decay_step_size = _as_int("post_cycle_decay_step_size", post_cycle_decay_step_size, 0)
        self.cycle_first_step_size = _as_int("cycle_first_step_size", cycle_first_step_size, 1)
        self.cycle_second_step_size = (
            None if cycle_second_step_size is None else _as_int("cycle_second_step_size", cycle_second_step_size, 0)
        )
        self.cycle_first_stair_count = _as_int("cycle_first_stair_count", cycle_first_stair_count, 0)
        self.cycle_second_stair_count = (
            None if cycle_second_stair_count is None else _as_int("cycle_second_stair_count", cycle_second_stair_count, 0)
        )
        self.decay_step_size = 0 if decay_step_size is None else _as_int("decay_step_size", decay_step_size, 0)
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"cycle_momentum must be a bool, got {cycle_momentum!r}")
        self.cycle_momentum = cycle_momentum

        self.cycle_min_lr = _per_group("cycle_min_lr", cycle_min_lr, _nonneg)
        self.cycle_max_lr = _per_group("cycle_max_lr", cycle_max_lr, _nonneg)
        self.decay_lr_rate = _per_group("decay_lr_rate", decay_lr_rate, _nonneg)
        self.cycle_min_mom = _per_group("cycle_min_mom", cycle_min_mom, _momentum)
        self.cycle_max_mom = _per_group("cycle_max_mom", cycle_max_mom, _momentum)
        self.decay_mom_rate = _per_group("decay_mom_rate", decay_mom_rate, _nonneg)
        self._check_list_lengths()
        n = self.num_groups or 1
        for g in range(n):
            lo, hi = _at(self.cycle_min_lr, g), _at(self.cycle_max_lr, g)
            if lo > hi:
                raise ValueError(f"cycle_min_lr ({lo}) must be <= cycle_max_lr ({hi})")
            lo, hi = _at(self.cycle_min_mom, g), _at(self.cycle_max_mom, g)
            if lo > hi:
                raise ValueError(f"cycle_min_mom ({lo}) must be <= cycle_max_mom ({hi})")

    # -- derived shape -----------------------------------------------------
    @property
    def second_step_size(self) -> int:
        s = self.cycle_second_step_size
        return self.cycle_first_step_size if s is None else s

    @property
    def second_stair_count(self) -> int:
        s = self.cycle_second_stair_count
        return self.cycle_first_stair_count if s is None else s

    @property
    def total_size(self) -> int:
        """Length of the cycle phase; steps after it are in the decay phase."""
        return self.cycle_first_step_size + self.second_step_size

    @property
    def cycles_momentum(self) -> bool:
        return self.cycle_momentum

    def params(self) -> dict[str, Any]:
        return _copied({
            "cycle_min_lr": self.cycle_min_lr,
            "cycle_max_lr": self.cycle_max_lr,
            "decay_lr_rate": self.decay_lr_rate,
            "cycle_first_step_size": self.cycle_first_step_size,
            "cycle_second_step_size": self.cycle_second_step_size,
            "cycle_first_stair_count": self.cycle_first_stair_count,
            "cycle_second_stair_count": self.cycle_second_stair_count,
            "decay_step_size": self.decay_step_size,
            "cycle_momentum": self.cycle_momentum,
            "cycle_min_mom": self.cycle_min_mom,
            "cycle_max_mom": self.cycle_max_mom,
            "decay_mom_rate": self.decay_mom_rate,
        })

    def scale(self, step: int) -> float:
        """Position in the cycle, 0 at cycle_min_lr and 1 at cycle_max_lr (k <= T).

        The operations and their order follow DeepSpeed's ``_get_scale_factor``
        so that host values match it bit for bit.
        """
        first = float(self.cycle_first_step_size)
        total = float(self.total_size)
        ratio = first / total
        cycle = math.floor(1 + step / total)
        x = 1.0 + step / total - cycle
        if x <= ratio:
            scale = x / ratio
            stairs = self.cycle_first_stair_count
        else:
            scale = (x - 1) / (ratio - 1)
            stairs = self.second_stair_count
        if stairs > 0:
            # quantise from the integer offset, not from `scale`: at a half
            # boundary the float scale can sit 1 ulp under an exact stair
            c = step % total
            if c <= first:
                pos = c * stairs / first
            else:
                pos = (total - c) * stairs / float(self.second_step_size)
            scale = math.floor(pos) / stairs
        return scale

    def _eval(self, step, group):
        min_lr, max_lr = _at(self.cycle_min_lr, group), _at(self.cycle_max_lr, group)
        min_mom, max_mom = _at(self.cycle_min_mom, group), _at(self.cycle_max_mom, group)
        if step <= self.total_size:
            s = self.scale(step)
            lr = min_lr + (max_lr - min_lr) * s
            mom = max_mom - (max_mom - min_mom) * s
        else:
            d = step - self.total_size
            lr_rate, mom_rate = _at(self.decay_lr_rate, group), _at(self.decay_mom_rate, group)
            lr, mom = min_lr, max_mom
            if self.decay_step_size != 0:
                interval = d / self.decay_step_size
                if lr_rate != 0:
                    lr = min_lr / (1 + lr_rate * interval)
                if mom_rate != 0:
                    mom = max_mom / (1 + mom_rate * interval)
        return lr, (mom if self.cycle_momentum else None)

    def row(self, group: int = 0) -> list[float]:
        r = [0.0] * (Row.MOMENTUM + 1)
        r[Row.KIND] = KIND_ONECYCLE
        r[Row.FIRST_STEP_SIZE] = self.cycle_first_step_size
        r[Row.SECOND_STEP_SIZE] = self.second_step_size
        r[Row.FIRST_STAIR_COUNT] = self.cycle_first_stair_count
        r[Row.SECOND_STAIR_COUNT] = self.second_stair_count
        r[Row.DECAY_STEP_SIZE] = self.decay_step_size
        r[Row.MIN_LR] = _at(self.cycle_min_lr, group)
        r[Row.MAX_LR] = _at(self.cycle_max_lr, group)
        r[Row.DECAY_LR_RATE] = _at(self.decay_lr_rate, group)
        r[Row.MIN_MOM] = _at(self.cycle_min_mom, group)
        r[Row.MAX_MOM] = _at(self.cycle_max_mom, group)
        r[Row.DECAY_MOM_RATE] = _at(self.decay_mom_rate, group)
        r[Row.CYCLE_MOMENTUM] = 1.0 if self.cycle_momentum else 0.0
        return [float(v) for v in r]


class LRRangeTest(_Schedule):
    """DeepSpeed's learning-rate range test (``lr_schedules.LRRangeTest``).

    ``lr(k) = lr_range_test_min_lr * (1 + lr_range_test_step_rate * i)`` with
    ``i = k / lr_range_test_step_size`` (floored when ``lr_range_test_staircase``).
    Momentum is not scheduled: the optimizer's own momentum / beta1 is used.
    """

    type_name = "LRRangeTest"
    _per_group_names = ("lr_range_test_min_lr",)

    def __init__(
        self,
        lr_range_test_min_lr=1e-3,
        lr_range_test_step_size=2000,
        lr_range_test_step_rate=1.0,
        lr_range_test_staircase=False,
        *,
        last_batch_iteration=-1,
    ):
        _fresh_start("last_batch_iteration", last_batch_iteration)
        self.lr_range_test_min_lr = _per_group("lr_range_test_min_lr", lr_range_test_min_lr, _nonneg)
        self.lr_range_test_step_size = _as_int("lr_range_test_step_size", lr_range_test_step_size, 1)
        self.lr_range_test_step_rate = _nonneg("lr_range_test_step_rate", lr_range_test_step_rate)
        if not isinstance(lr_range_test_staircase, bool):
            raise ValueError(f"lr_range_test_staircase must be a bool, got {lr_range_test_staircase!r}")
        self.lr_range_test_staircase = lr_range_test_staircase

    def params(self) -> dict[str, Any]:
        return _copied({
            "lr_range_test_min_lr": self.lr_range_test_min_lr,
            "lr_range_test_step_size": self.lr_range_test_step_size,
            "lr_range_test_step_rate": self.lr_range_test_step_rate,
            "lr_range_test_staircase": self.lr_range_test_staircase,
        })

    def _eval(self, step, group):
        interval = float(step) / self.lr_range_test_step_size
        if self.lr_range_test_staircase:
            interval = math.floor(interval)
        return _at(self.lr_range_test_min_lr, group) * (1 + self.lr_range_test_step_rate * interval), None

    def row(self, group: int = 0) -> list[float]:
        r = [0.0] * (Row.MOMENTUM + 1)
        r[Row.KIND] = KIND_LRRANGETEST
        r[Row.FIRST_STEP_SIZE] = self.lr_range_test_step_size
        r[Row.FIRST_STAIR_COUNT] = 1.0 if self.lr_range_test_staircase else 0.0
        r[Row.MIN_LR] = _at(self.lr_range_test_min_lr, group)
        r[Row.DECAY_LR_RATE] = self.lr_range_test_step_rate
        return [float(v) for v in r]


def _positive(name: str, value: Any) -> float:
    value = _as_float(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


class TorchOneCycle(_Schedule):
    """torch's 1-Cycle schedule (``torch.optim.lr_scheduler.OneCycleLR``).

    Same parameter names and defaults; ``max_lr``, ``base_momentum`` and
    ``max_momentum`` take a list with one value per parameter group. ``lr(k)``
    and ``momentum(k)`` equal, bit for bit, what ``OneCycleLR`` has put in
    ``param_groups`` after ``k`` calls of ``scheduler.step()`` (its
    ``last_epoch == k``), for every ``k`` in ``0 .. T`` (``T = total_steps``,
    or ``epochs * steps_per_epoch``). So::

        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = OneCycleLR(opt, max_lr=0.1, total_steps=1000)   # + sched.step() per step

    becomes ``FusedOneCycleSGD(params, schedule=TorchOneCycle(max_lr=0.1,
    total_steps=1000), momentum=0.9)``. With ``cycle_momentum=True`` the
    momentum (SGD) / beta1 (Adam) follows the schedule, otherwise the
    optimizer's own ``momentum`` / ``betas[0]`` is used.

    Differences from torch, where torch raises:

    * after ``T`` steps torch raises ``ValueError`` at the next
      ``scheduler.step()``. A device cannot raise, so for ``k > T`` lr and
      momentum hold the values of ``k = T - 1``, the end of the schedule
      (also at ``k = T`` when the last phase has zero length, e.g.
      ``pct_start=1.0``, where torch divides by zero);
    * a first phase of zero length (``pct_start * T == 1``), where torch
      raises ``ZeroDivisionError`` at construction, is a ``ValueError``
      naming ``pct_start``;
    * ``pct_start`` may be an int (0 or 1): it is used as a float.
    """

    type_name = "TorchOneCycle"
    _per_group_names = ("max_lr", "base_momentum", "max_momentum")

    def __init__(
        self,
        max_lr,
        total_steps=None,
        epochs=None,
        steps_per_epoch=None,
        pct_start=0.3,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=0.85,
        max_momentum=0.95,
        div_factor=25.0,
        final_div_factor=1e4,
        three_phase=False,
        *,
        last_epoch=-1,
    ):
        _fresh_start("last_epoch", last_epoch)
        # torch: total_steps wins; epochs and steps_per_epoch are only read
        # (and checked) without it. The values are kept as given for params().
        if total_steps is not None:
            self.total_steps = _as_int("total_steps", total_steps, 1)
            self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
            self.length = self.total_steps
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = None
            self.epochs = _as_int("epochs", epochs, 1)
            self.steps_per_epoch = _as_int("steps_per_epoch", steps_per_epoch, 1)
            self.length = self.epochs * self.steps_per_epoch
        else:
            raise ValueError("give total_steps, or epochs and steps_per_epoch")
        pct = _as_float("pct_start", pct_start)
        if not 0.0 <= pct <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start!r}")
        self.pct_start = pct
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        for name, flag in (("cycle_momentum", cycle_momentum), ("three_phase", three_phase)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.cycle_momentum = cycle_momentum
        self.three_phase = three_phase
        self.max_lr = _per_group("max_lr", max_lr, _nonneg)
        self.base_momentum = _per_group("base_momentum", base_momentum, _momentum)
        self.max_momentum = _per_group("max_momentum", max_momentum, _momentum)
        self.div_factor = _positive("div_factor", div_factor)
        self.final_div_factor = _positive("final_div_factor", final_div_factor)
        self._check_list_lengths()

        # Phase end steps, written as torch writes them (float64, same
        # operation order), so that the device compares and divides by the
        # very same numbers.
        T = self.length
        self.phase1_end = float(pct * T) - 1
        self.phase2_end = float(2 * pct * T) - 2
        self.last_end = float(T - 1)
        if self.phase1_end == 0.0:
            # step 0 selects phase 1 (0 <= end) and divides by end - 0.0
            raise ValueError(
                f"pct_start * total steps must not be 1 (pct_start={pct_start!r}, total steps={T}): "
                "the first phase would have zero length (torch's OneCycleLR divides by zero at step 0)"
            )
        # The last phase is divided by only from k = T on when it has zero
        # length (its start, the previous end, is then T - 1): hold from T.
        previous_end = self.phase2_end if three_phase else self.phase1_end
        self.last_exact_step = T if self.last_end - previous_end != 0 else T - 1

    @property
    def cycles_momentum(self) -> bool:
        return self.cycle_momentum

    def params(self) -> dict[str, Any]:
        return _copied({
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "pct_start": self.pct_start,
            "anneal_strategy": self.anneal_strategy,
            "cycle_momentum": self.cycle_momentum,
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "three_phase": self.three_phase,
        })

    def group_lrs(self, group: int = 0) -> tuple[float, float, float]:
        """(initial_lr, max_lr, min_lr) of a group, computed as torch does."""
        max_lr = _at(self.max_lr, group)
        initial_lr = max_lr / self.div_factor
        return initial_lr, max_lr, initial_lr / self.final_div_factor

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _eval(self, step, group):
        initial_lr, max_lr, min_lr = self.group_lrs(group)
        base_mom, max_mom = _at(self.base_momentum, group), _at(self.max_momentum, group)
        if step > self.last_exact_step:
            step = self.length - 1
        # (end step, lr from, lr to, momentum from, momentum to) per phase
        if self.three_phase:
            phases = [
                (self.phase1_end, initial_lr, max_lr, max_mom, base_mom),
                (self.phase2_end, max_lr, initial_lr, base_mom, max_mom),
                (self.last_end, initial_lr, min_lr, max_mom, max_mom),
            ]
        else:
            phases = [
                (self.phase1_end, initial_lr, max_lr, max_mom, base_mom),
                (self.last_end, max_lr, min_lr, base_mom, max_mom),
            ]
        # torch's phase search: the first phase whose end is >= step, else the
        # last; a phase starts where the previous one ends (first: 0.0)
        start = 0.0
        for i, (end, lr_from, lr_to, mom_from, mom_to) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                pct = (step - start) / (end - start)
                lr = self._anneal(lr_from, lr_to, pct)
                mom = self._anneal(mom_from, mom_to, pct)
                break
            start = end
        return lr, (mom if self.cycle_momentum else None)

    def row(self, group: int = 0) -> list[float]:
        initial_lr, max_lr, min_lr = self.group_lrs(group)
        r = [0.0] * (Row.MOMENTUM + 1)
        r[Row.KIND] = KIND_TORCH_ONECYCLE
        r[Row.FIRST_STEP_SIZE] = self.phase1_end
        r[Row.SECOND_STEP_SIZE] = self.phase2_end
        r[Row.FIRST_STAIR_COUNT] = ANNEAL_COS if self.anneal_strategy == "cos" else ANNEAL_LINEAR
        r[Row.SECOND_STAIR_COUNT] = 1.0 if self.three_phase else 0.0
        r[Row.DECAY_STEP_SIZE] = self.last_end
        r[Row.MIN_LR] = initial_lr
        r[Row.MAX_LR] = max_lr
        r[Row.DECAY_LR_RATE] = min_lr
        r[Row.MIN_MOM] = _at(self.base_momentum, group)
        r[Row.MAX_MOM] = _at(self.max_momentum, group)
        r[Row.DECAY_MOM_RATE] = self.last_exact_step
        r[Row.CYCLE_MOMENTUM] = 1.0 if self.cycle_momentum else 0.0
        return [float(v) for v in r]


_TYPES = {cls.type_name: cls for cls in (OneCycle, LRRangeTest, TorchOneCycle)}
# DeepSpeed's engine falls back to torch.optim.lr_scheduler for a type it
# does not have, so a DeepSpeed config may name torch's class
_TORCH_NAMES = {"OneCycleLR": TorchOneCycle.type_name}

# every schedule's parameter names (and OneCycle's alias): the keys a
# parameter group may set when it is added, and must not hold afterwards
_ONECYCLE_KEYS = tuple(OneCycle(0.0, 0.0).params())
_RANGETEST_KEYS = tuple(LRRangeTest().params())
_TORCH_ONECYCLE_KEYS = tuple(TorchOneCycle(0.0, total_steps=1).params())
_SCHEDULE_KEYS = set(_ONECYCLE_KEYS) | set(_RANGETEST_KEYS) | set(_TORCH_ONECYCLE_KEYS) | {"post_cycle_decay_step_size"}


def _keys_not_restating(group: Mapping[str, Any], schedule: Optional[_Schedule],
                        given: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The schedule keys a group dict holds (sorted) whose values restate
    neither the group's ``schedule`` (none when it is None) nor ``given``,
    the optimizer's constructor keywords as given (``decay_step_size=None``
    is 0 in the schedule). Such keys only restate: torch's
    ZeroRedundancyOptimizer copies its groups' keys, the constructor's
    schedule keywords among them, into ours before every step (also after a
    documented edit of the group's schedule) and into the groups its
    state_dict saves."""
    params = {} if schedule is None else schedule.params()
    if "decay_step_size" in params:
        params["post_cycle_decay_step_size"] = params["decay_step_size"]
    given = given or {}
    out = []
    for key in sorted(k for k in group if k in _SCHEDULE_KEYS):
        same = False
        for source in (params, given):
            try:
                same = same or (key in source and bool(group[key] == source[key]))
            except (TypeError, ValueError, RuntimeError):  # (a list, a tensor of several elements...)
                pass
        if not same:
            out.append(key)
    return out


def schedule_from_config(config: str | os.PathLike | Mapping[str, Any]) -> OneCycle | LRRangeTest | TorchOneCycle:
    """Build a schedule from a DeepSpeed config.

    ``config`` is a path to a JSON file or a dict holding
    ``{"scheduler": {"type": "OneCycle" | "LRRangeTest", "params": {...}}}``;
    the inner ``{"type": ..., "params": ...}`` alone is accepted too. The type
    ``"TorchOneCycle"`` (not DeepSpeed's; what ``TorchOneCycle.config()``
    writes) is accepted as well, and so is ``"OneCycleLR"`` with torch's
    parameters: DeepSpeed takes a ``torch.optim.lr_scheduler`` name there.
    """
    if isinstance(config, (str, os.PathLike)):
        # bytes: json detects UTF-8 (with or without a BOM, as Windows editors
        # write it), -16 and -32 itself, whatever the locale's encoding
        with open(config, "rb") as f:
            try:
                config = json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{os.fspath(config)} is not a JSON file: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict or a JSON file path, got {type(config).__name__}")
    sched = config.get("scheduler", config)
    if not isinstance(sched, Mapping) or "type" not in sched:
        raise ValueError('config has no "scheduler": {"type": ..., "params": ...} entry')
    kind = sched["type"]
    if not isinstance(kind, str) or (kind not in _TYPES and kind not in _TORCH_NAMES):
        raise ValueError(f"scheduler type must be one of {sorted(_TYPES) + sorted(_TORCH_NAMES)}, got {kind!r}")
    params = sched.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f'scheduler "params" must be a dict of {kind} parameters, got {params!r}')
    params = dict(params)
    try:
        return _TYPES[_TORCH_NAMES.get(kind, kind)](**params)
    except TypeError as e:  # unknown keyword
        raise ValueError(f"bad {kind} params: {e}") from None


def _from_config(cls, config):
    """Build this schedule from a DeepSpeed config (see :func:`schedule_from_config`)."""
    sched = schedule_from_config(config)
    if not isinstance(sched, cls):
        raise ValueError(f"config describes a {type(sched).__name__}, not a {cls.__name__}")
    return sched


OneCycle.from_config = classmethod(_from_config)  # type: ignore[attr-defined]
LRRangeTest.from_config = classmethod(_from_config)  # type: ignore[attr-defined]
TorchOneCycle.from_config = classmethod(_from_config)  # type: ignore[attr-defined]
