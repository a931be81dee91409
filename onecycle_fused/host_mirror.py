"""The host's view of the device step counter, and the lr / momentum mirror
it drives in ``param_groups`` (what ``get_last_lr()`` returns).

The step counts on the device and never reads its counter back; the host
keeps its own count (``_HostStep``), +1 per eager step, and adopts the
counter's value where it cannot know it (a step GradScaler may have skipped,
compiled steps, CUDA graph replays): from a CPU counter at once, from a CUDA
one through an asynchronous copy. Apart from optim.py because it is its own
concept, with its own state, that the step only notifies
(``_advance_mirror``); ``_HostMirrorMixin`` holds the methods
``_FusedOneCycleOptimizer`` inherits. Not to be confused with
schedule_mirror.py, a torch LR scheduler stand-in for trainers.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch

from .schedule import _Schedule


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised under ``step()`` point
    at the caller's line: the first frame outside onecycle_fused and torch,
    however many wrappers (torch's step hooks, profiler, no_grad) sit between."""
    f, level = sys._getframe(2), 2  # the frame of the function that warns is level 1
    while f is not None and f.f_globals.get("__name__", "").split(".")[0] in ("onecycle_fused", "torch"):
        f, level = f.f_back, level + 1
    return level


class _HostStep:
    """The host's view of the step counter, which drives the lr mirror.

    A separate object because torch.compile silently drops attribute writes
    on an Optimizer instance but keeps those on plain objects.
    """

    def __init__(self):
        self.step = 0
        # (pinned int64, event, base) of an asynchronous copy of the counter,
        # pending after a CUDA step whose found_inf the host could not see;
        # base: ``step`` when the copy was made. Steps taken before it lands
        # keep adding to ``step``, so on landing ``step = value + (step - base)``
        # (a copy may land several steps later: the GPU runs behind)
        self.pending: Optional[tuple[torch.Tensor, Any, int]] = None
        # set when steps ran where host code does not re-run per call (a
        # torch.compile'd step, a captured CUDA graph): the next eager
        # occasion re-reads the counter
        self.stale = False
        # ``step`` is a guess until ``pending`` lands (an eager step after
        # stale ones copied the counter without waiting): get_last_lr waits
        self.unknown = False
        # a step was captured in a CUDA graph: from then on replays advance
        # the counter at any time with no host code, not only until the host
        # next looks (``stale`` is cleared by a look), so get_last_lr re-reads
        # the counter every time and eager steps copy it to the host
        self.replayable = False


class _LrWritten:
    """The ``"lr"`` values ``_update_mirror`` last wrote into the groups, and
    whether a write by someone else was warned about; also the momentum /
    beta1 it last wrote (None where the schedule sets none), which tells a
    stale mirror from a value the user set (``_keep_mirrored_momentum``).
    A plain object for the reason _HostStep is one."""

    def __init__(self):
        self.values: list = []
        self.warned = False
        self.momenta: list = []


class _HostMirrorMixin:
    """The host count and the lr / momentum mirror of ``_FusedOneCycleOptimizer``
    (listed in its bases before torch.optim.Optimizer). It reads the
    optimizer's counters and groups through the optimizer's own methods
    (``_counter``, ``_host_code_runs``, ``_schedule_of``, ``_constant_momentum``,
    ``_validate_group``...); each algorithm
    says where its momentum mirror goes (``_set_momentum_mirror``). Its state,
    ``_host`` (a ``_HostStep``) and ``_lr_written`` (a ``_LrWritten``), is made
    by the optimizer (``__init__``, ``_reset_caches``, ``__setstate__``) and
    replaced here by ``_restart_host``."""

    def _resolve_pending(self, wait: Optional[bool] = None) -> None:
        """Adopt the device counter's value once its asynchronous copy landed.
        ``wait``: True waits for the copy, False never does (inside a step),
        None (get_last_lr) waits only when the host has no other value."""
        host = self._host
        if host.stale or (host.replayable and wait is not False):
            host.pending = None
            host.step = int(self._mirror_counter())  # one read, outside any step
            host.stale = host.unknown = False
            return
        if host.pending is None:
            return
        value, event, base = host.pending
        if wait or (wait is None and host.unknown):
            event.synchronize()
        elif not event.query():
            return
        host.step = int(value) + (host.step - base)
        host.pending = None
        host.unknown = False

    def _copy_counter_async(self, counter: torch.Tensor) -> None:
        """Start a copy of a CUDA ``counter`` to the host; ``_resolve_pending``
        adopts it once it landed (no sync here)."""
        value = torch.empty((), dtype=torch.int64, pin_memory=True)
        value.copy_(counter, non_blocking=True)  # on the counter's device's current stream
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(counter.device))  # that stream, not the current device's
        self._host.pending = (value, event, self._host.step)

    def _mirror_counter(self) -> torch.Tensor:
        """The counter the host mirror reads: a CPU one when there is one (its
        read costs no sync), else the first."""
        for c in self._counters.values():
            if c.device.type == "cpu":
                return c
        return self._counter()

    def _update_mirror(self, schedules: Optional[list[_Schedule]] = None) -> None:
        """Write the lr / momentum the next step uses into the groups
        (``schedules``: the groups' schedules, if known)."""
        k = self._host.step
        momenta = []
        groups = self.param_groups
        for group, sched in zip(groups, schedules or map(self._schedule_of, groups)):
            group["lr"], mom = sched._values(k)  # (a group's schedule is scalar, _check_scalar_schedule)
            if mom is not None:
                self._set_momentum_mirror(group, mom)
            momenta.append(mom)
        self._lr_written.values = [group["lr"] for group in self.param_groups]
        self._lr_written.momenta = momenta

    def _warn_if_lr_written(self) -> None:
        """Warn once when a group's ``"lr"`` is not what the mirror wrote: a
        torch LR scheduler left attached (StepLR, LambdaLR, ReduceLROnPlateau...)
        writes it and has no effect, which would otherwise go unnoticed. The
        same for a cycled momentum / beta1 written by hand."""
        written = self._lr_written
        if written.warned or not self._mirror_written_from_outside():
            return
        for i, (group, value) in enumerate(zip(self.param_groups, written.values)):
            if group.get("lr") != value:
                written.warned = True
                warnings.warn(
                    f"{type(self).__name__}: param_groups[{i}]['lr'] was set to {group.get('lr')!r} from outside "
                    f"(the schedule gives {value!r}); is a torch LR scheduler attached? It has no effect: the "
                    "1-Cycle schedule is computed inside step() and 'lr' is only its mirror. Drop the scheduler "
                    "(for a trainer that needs one, use onecycle_fused.ScheduleMirror)",
                    UserWarning, stacklevel=_user_stacklevel(),
                )
                return
        # the momentum / beta1 mirror of a group whose schedule still cycles
        # it: a write there has no effect either (with cycling switched off in
        # the same edit, the value written is the group's constant: no warning)
        for i, (group, value) in enumerate(zip(self.param_groups, written.momenta)):
            if value is None:
                continue
            try:
                now = self._constant_momentum(group)
                if now == value or self._schedule_of(group).momentum(0) is None:
                    continue
                self._validate_group({**self.defaults, **group}, mirrored=True)
            except (KeyError, IndexError, TypeError, ValueError):
                continue  # (malformed: the step's validation names it, no warning on top)
            written.warned = True
            where = f"param_groups[{i}]" + ("['betas'][0]" if "betas" in group else "['momentum']")
            warnings.warn(
                f"{type(self).__name__}: {where} was set to {now!r} from outside (the "
                f"schedule gives {value!r}); it has no effect while the schedule cycles momentum: the "
                "1-Cycle schedule computes it inside step() and the group holds only its mirror. To hold "
                "it constant, set param_groups[i]['schedule']['params']['cycle_momentum'] = False with it",
                UserWarning, stacklevel=_user_stacklevel(),
            )
            return

    def _mirror_written_from_outside(self) -> bool:
        """Whether a group's lr or cycled momentum / beta1 differs from what
        the mirror last wrote, once per-parameter steps that a loader put
        into ``state`` are taken over. Loaders that bypass our
        ``load_state_dict`` (ZeroRedundancyOptimizer's, DeepSpeed's
        universal checkpoints) copy the saved groups' lr and momentum, the
        mirror at the saved step, along with those steps: adopting the steps
        moves the counter there and re-mirrors the groups, and the values
        the loader wrote are then the mirror's own. Only on a difference
        (rare), so a step costs two list comparisons."""
        written = self._lr_written
        groups = self.param_groups
        lrs = [group.get("lr") for group in groups]
        moms = []
        for group in groups:
            try:
                moms.append(self._constant_momentum(group))
            except (KeyError, IndexError, TypeError):
                moms.append(None)  # (malformed: the step's validation names it)

        def differs() -> bool:  # what the groups held against what the mirror wrote
            return lrs != written.values or any(w is not None and m != w for m, w in zip(moms, written.momenta))

        if not differs():
            return False
        if not self._host_code_runs():
            return True
        self._adopt_foreign_steps()  # (re-mirrors the groups when it moves the counter)
        if not differs():
            return False
        # a write of someone's own: put back what adopting may have
        # overwritten with the mirror, for the warning to name
        for group, lr, mom in zip(groups, lrs, moms):
            group["lr"] = lr
            if mom is not None and mom != self._constant_momentum(group):
                self._set_momentum_mirror(group, mom)
        return True

    def _set_momentum_mirror(self, group: dict, mom: float) -> None:
        raise NotImplementedError

    # A host read: traced into a compiled function it would return the values
    # of the trace, constants baked into the graph (the mirror is not updated
    # by compiled steps), stale at every later call. Disabled for dynamo: a
    # graph break that runs it eagerly, an error under fullgraph=True.
    @torch.compiler.disable
    def get_last_lr(self) -> list[float]:
        """The lr of each group for the next step, as a torch scheduler's ``get_last_lr()``.

        After steps run by a compiled function or a CUDA graph replay this reads
        the device counter once to bring the ``param_groups`` mirror up to date.
        Inside a ``torch.compile``'d function it is a graph break (an error
        under ``fullgraph=True``): call it outside.
        """
        if self._host_code_runs():  # (not while capturing: no event query, no read)
            self._adopt_foreign_steps()
            self._resolve_pending()
            self._update_mirror()
        return [group["lr"] for group in self.param_groups]

    def _restart_host(self, step: int) -> None:
        """A fresh host count at ``step``, after the counters were filled in
        place with it (set_step, load_state_dict). A captured graph still
        replays and advances those counters: ``replayable`` carries over."""
        replayable = self._host.replayable
        self._host = _HostStep()
        self._host.step = step
        self._host.replayable = replayable

    def _advance_mirror(self, found_inf: Optional[torch.Tensor], schedules: Optional[list] = None) -> None:
        if not self._host_code_runs():
            # host code does not re-run with each call / replay: tracking the
            # step on the host here would bake one value into the graph
            self._host.stale = True
            if not torch.compiler.is_compiling():  # (traced, this is never True)
                self._host.replayable = True  # captured: replays to come, unseen
            return
        host = self._host
        counter = self._mirror_counter()
        if host.stale:
            # steps ran that the host did not count: the counter, which
            # already counts this step, is the truth (no +1 on top of it)
            host.stale = False
            host.pending = None
            if counter.device.type == "cpu":
                host.step = int(counter)
            else:
                host.unknown = True  # a guess until the copy lands
                self._copy_counter_async(counter)
            self._update_mirror(schedules)
            return
        self._resolve_pending(wait=False)
        # a device counter after a capture: graph replays may have run since
        # the last copy; the asynchronous copy below brings them in, as it
        # does a step GradScaler may have skipped
        replays_unseen = host.replayable and counter.device.type != "cpu"
        if found_inf is None and not replays_unseen:
            host.step += 1
        elif counter.device.type == "cpu":
            # a CPU read costs no sync: found_inf itself if it is on the CPU,
            # else the CPU counter, stepped with a (blocking) copy of it (_on)
            if found_inf.device.type == "cpu":
                host.step += int(found_inf.item() == 0)
            else:
                host.step = int(counter)
                host.pending = None
                host.unknown = False
        else:
            # optimistic: assume the step ran, then adopt the counter's true
            # value when an asynchronous copy of it lands (no host sync here)
            host.step += 1
            self._copy_counter_async(counter)
        self._update_mirror(schedules)
