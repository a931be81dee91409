"""Continue a run started with ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` and a
1-Cycle scheduler (DeepSpeed's ``OneCycle`` or torch's ``OneCycleLR``) in a
fused optimizer.

What carries over:

* per-parameter state: momentum buffers, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq`` and Adam's step counts (as int64);
* the update hyper-parameters of each group that torch stores
  (``weight_decay``, ``dampening``, ``nesterov``, ``maximize``, ``eps``,
  ``amsgrad``, ``betas[1]``, and the momentum / ``betas[0]`` where the
  fused schedule does not cycle it), so the continuation computes what the
  original pair would have: e.g. DeepSpeed's ``OneCycle`` had overwritten
  beta2 with 0.99 and that value is kept (pass ``copy_hyperparameters=False``
  to keep the fused optimizer's own values);
* the schedule position: ``k = last_batch_iteration + 1`` for a DeepSpeed
  ``OneCycle`` / ``LRRangeTest`` state, ``k = last_epoch`` for a torch
  ``LRScheduler`` state; both are "steps already taken", the ``k`` of
  ``DESIGN.md`` §2.

The schedule's *shape* is the fused optimizer's own: give it the same
DeepSpeed parameters to continue a DeepSpeed run exactly, or
``schedule=TorchOneCycle(...)`` with ``OneCycleLR``'s arguments to continue a
torch ``OneCycleLR`` run exactly (its ``last_epoch`` is the ``k`` both use).
With another schedule only the position and the optimizer state are taken.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Optional

import torch

from .backends import decoupled_weight_decay
from .schedule import _as_int, _plain

__all__ = ["load_torch_optimizer_state", "schedule_position"]

# group keys of torch.optim that set the update math (lr, and momentum / beta1
# where the schedule cycles it, come from the schedule, so they are not among them)
_SGD_KEYS = ("weight_decay", "dampening", "nesterov", "maximize")
_ADAM_KEYS = ("weight_decay", "eps", "amsgrad", "maximize")


def _integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, by the schedules' rule (any integer,
    numpy's too, or an integral float: a checkpoint written through JSON),
    also from a one-element tensor; otherwise a ValueError naming ``name``."""
    return _as_int(name, _plain(value), minimum)


def _scheduler_state(scheduler: Any) -> Mapping:
    """A scheduler's ``state_dict()``, or the state dict given."""
    state = scheduler.state_dict() if hasattr(scheduler, "state_dict") else scheduler
    if not isinstance(state, Mapping):
        raise ValueError(f"scheduler must be a scheduler or its state_dict, got {type(scheduler).__name__}")
    return state


def schedule_position(scheduler: Any) -> int:
    """Optimizer steps taken so far according to a scheduler (object or its ``state_dict()``).

    DeepSpeed's schedulers store ``last_batch_iteration`` (-1 before the first
    step); torch's store ``last_epoch`` (0 before the first step).
    """
    state = _scheduler_state(scheduler)
    if "last_batch_iteration" in state:
        return _integer("last_batch_iteration", state["last_batch_iteration"], -1) + 1
    if "last_epoch" in state:
        return _integer("last_epoch", state["last_epoch"], 0)
    raise ValueError("scheduler state has neither 'last_batch_iteration' (DeepSpeed) nor 'last_epoch' (torch)")


def _torch_onecycle_differences(optimizer, torch_groups, state: Mapping) -> list[str]:
    """Where a torch ``OneCycleLR`` state (and the values it put into the
    torch groups: ``initial_lr``, ``max_lr``, ``min_lr``, the momenta) and the
    optimizer's ``TorchOneCycle`` of each group describe different curves,
    compared as the schedule's device row holds them (phase end steps, lrs,
    momenta, anneal strategy): a list of "name: torch's vs ours"; empty for
    another kind of scheduler or schedule."""
    from .schedule import ANNEAL_LINEAR, Row, TorchOneCycle

    phases = state.get("_schedule_phases")
    if not isinstance(phases, list) or not all(isinstance(ph, Mapping) for ph in phases):
        return []  # not a OneCycleLR state
    out = []
    for gi, (s, live) in enumerate(zip(torch_groups, optimizer.param_groups)):
        sched = optimizer._schedule_of(live)
        if not isinstance(sched, TorchOneCycle):
            return []  # another schedule: the README says only the position carries over
        row = sched.row()
        ours = {
            "phase end steps": [row[Row.FIRST_STEP_SIZE]] + ([row[Row.SECOND_STEP_SIZE]] if row[Row.SECOND_STAIR_COUNT]
                                                              else []) + [row[Row.DECAY_STEP_SIZE]],
            "anneal_strategy": "linear" if row[Row.FIRST_STAIR_COUNT] == ANNEAL_LINEAR else "cos",
            "initial_lr": row[Row.MIN_LR], "max_lr": row[Row.MAX_LR], "min_lr": row[Row.DECAY_LR_RATE],
        }
        theirs = {
            "phase end steps": [_plain(ph.get("end_step")) for ph in phases],
            "anneal_strategy": state.get("_anneal_func_type", ours["anneal_strategy"]),
            **{k: _plain(s.get(k, ours[k])) for k in ("initial_lr", "max_lr", "min_lr")},
        }
        if state.get("cycle_momentum") and sched.cycles_momentum:
            ours.update(base_momentum=row[Row.MIN_MOM], max_momentum=row[Row.MAX_MOM])
            theirs.update({k: _plain(s.get(k, ours[k])) for k in ("base_momentum", "max_momentum")})
        for key, value in ours.items():
            if theirs[key] != value:
                out.append(f"param_groups[{gi}] {key}: {theirs[key]!r} vs {value!r}")
    return out


def load_torch_optimizer_state(
    optimizer,
    torch_state_dict: Mapping[str, Any],
    scheduler: Any = None,
    *,
    step: Optional[int] = None,
    copy_hyperparameters: bool = True,
) -> int:
    """Load a ``torch.optim`` SGD / Adam / AdamW ``state_dict`` into a fused optimizer.

    ``optimizer`` must hold the same parameters in the same groups and order
    as the torch optimizer did. The schedule position comes from ``scheduler``
    (a DeepSpeed or torch scheduler, or its ``state_dict()``) or ``step``; with
    neither, it is the largest Adam step count (SGD: 0). A scheduler position
    below that count warns (a scheduler stepped per epoch counts epochs).
    Returns the position.
    """
    from .optim import FusedOneCycleAdam, FusedOneCycleSGD

    if isinstance(optimizer, FusedOneCycleSGD):
        is_sgd = True
    elif isinstance(optimizer, FusedOneCycleAdam):  # AdamW is a subclass
        is_sgd = False
    else:
        raise ValueError(f"optimizer must be a FusedOneCycle optimizer, got {type(optimizer).__name__}")
    if not isinstance(torch_state_dict, Mapping) or "state" not in torch_state_dict or "param_groups" not in torch_state_dict:
        raise ValueError("torch_state_dict must be a torch.optim state_dict (with 'state' and 'param_groups')")
    if "step_counter" in torch_state_dict:
        raise ValueError("torch_state_dict comes from a FusedOneCycle optimizer: use optimizer.load_state_dict")
    if scheduler is not None and step is not None:
        raise ValueError("give scheduler or step, not both")
    if scheduler is not None:
        scheduler = _scheduler_state(scheduler)  # (read once: the position and the OneCycleLR check)

    src_groups = torch_state_dict["param_groups"]
    dst = optimizer.state_dict()
    if len(src_groups) != len(dst["param_groups"]):
        raise ValueError(
            f"torch_state_dict has {len(src_groups)} parameter groups, the optimizer {len(dst['param_groups'])}"
        )
    for i, (s, d) in enumerate(zip(src_groups, dst["param_groups"])):
        if len(s["params"]) != len(d["params"]):
            raise ValueError(
                f"parameter group {i} has {len(s['params'])} parameters in torch_state_dict, "
                f"{len(d['params'])} in the optimizer"
            )
        src_names, dst_names = s.get("param_names"), d.get("param_names")
        if src_names is not None and dst_names is not None and list(src_names) != list(dst_names) \
                and sorted(src_names) == sorted(dst_names):
            # the same names in another order: other parameters at each position
            # (other names, e.g. DDP's 'module.' prefix, are not compared)
            j = next(j for j, (a, b) in enumerate(zip(src_names, dst_names)) if a != b)
            raise ValueError(
                f"parameter group {i}: parameter {j} is {src_names[j]!r} in torch_state_dict, "
                f"{dst_names[j]!r} in the optimizer: not the same parameters in the same order"
            )
        if is_sgd and "betas" in s:
            raise ValueError(f"torch_state_dict param_groups[{i}] is an Adam-type group; the optimizer is SGD")
        if not is_sgd and "betas" not in s:
            raise ValueError(f"torch_state_dict param_groups[{i}] has no 'betas': not an Adam / AdamW state")
        if not is_sgd and copy_hyperparameters and s.get("weight_decay", 0) != 0 and "decoupled_weight_decay" in s:
            # torch >= 2.5 marks AdamW groups; L2 (Adam) and decoupled (AdamW)
            # weight decay compute different steps with the same value
            decoupled = bool(decoupled_weight_decay(optimizer.algo, d))  # (d: a copy of the live group)
            if bool(s["decoupled_weight_decay"]) != decoupled:
                want = ("FusedOneCycleAdamW (or FusedOneCycleAdam(decoupled_weight_decay=True))"
                        if s["decoupled_weight_decay"] else "FusedOneCycleAdam")
                raise ValueError(
                    f"torch_state_dict param_groups[{i}] has decoupled_weight_decay="
                    f"{bool(s['decoupled_weight_decay'])} (torch.optim.{'AdamW' if s['decoupled_weight_decay'] else 'Adam'}) "
                    f"and weight_decay={s['weight_decay']}: load it into a {want}, not a {type(optimizer).__name__}"
                )

    if step is not None:
        if isinstance(step, bool) or isinstance(step, float):
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        position = _integer("step", step, 0)  # numpy / tensor integers too, as set_step takes
    else:
        steps = [int(_plain(st["step"])) for st in torch_state_dict["state"].values() if "step" in st]
        if scheduler is None:
            position = max(steps, default=0)
        else:
            position = schedule_position(scheduler)
            if position < max(steps, default=0):
                # Adam counts every optimizer step; a scheduler behind it was
                # stepped per epoch, or started late: the schedule would restart
                warnings.warn(
                    f"the scheduler state says {position} optimizer steps were taken, but the Adam state has "
                    f"taken {max(steps)}: if the scheduler was stepped per epoch, pass step= (the number of "
                    "optimizer steps) instead of the scheduler",
                    UserWarning,
                    stacklevel=2,
                )

    if scheduler is not None:
        differing = _torch_onecycle_differences(optimizer, src_groups, scheduler)
        if differing:
            warnings.warn(
                "the torch OneCycleLR state was made with other arguments than the optimizer's TorchOneCycle ("
                + "; ".join(differing) + "): the run goes on with the optimizer's schedule from the position, "
                "not as the torch run would have (the same arguments continue it exactly)",
                UserWarning,
                stacklevel=2,
            )

    new_state = {}
    for gi, (s, d) in enumerate(zip(src_groups, dst["param_groups"])):
        # d's schedule is a copy of the live group's: asked of the live group,
        # a bad one (edited in) names param_groups[gi], not "the group"
        sched = optimizer._schedule_of(optimizer.param_groups[gi])
        cycles_momentum = sched.cycles_momentum
        if copy_hyperparameters:
            for key in _SGD_KEYS if is_sgd else _ADAM_KEYS:
                if key in s:
                    d[key] = _plain(s[key])
            if not is_sgd:
                d["betas"] = (d["betas"][0], _plain(s["betas"][1]))
            if not cycles_momentum:
                # a momentum the schedule does not set is a constant of the update, as beta2
                if is_sgd and "momentum" in s:
                    d["momentum"] = _plain(s["momentum"])
                elif not is_sgd:
                    d["betas"] = (_plain(s["betas"][0]), d["betas"][1])
            try:  # checked here, as the constructor would: not at the next step, after the load
                optimizer._validate_group(d, mirrored=True)
            except ValueError as e:
                raise ValueError(f"torch_state_dict param_groups[{gi}]: {e}") from None
        uses_buffer = is_sgd and optimizer._uses_buffer(d, sched)
        params = optimizer.param_groups[gi]["params"]
        for j, (src_id, dst_id) in enumerate(zip(s["params"], d["params"])):
            st = torch_state_dict["state"].get(src_id)
            if not st:
                continue  # never stepped: the fused optimizer starts it fresh
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                value = st.get(key)
                if isinstance(value, torch.Tensor) and value.shape != params[j].shape:
                    raise ValueError(
                        f"torch_state_dict's {key} of parameter {j} in group {gi} has shape {tuple(value.shape)}, "
                        f"the optimizer's parameter {tuple(params[j].shape)}: not the same parameters in the same order"
                    )
            new_state[dst_id] = _convert(st, is_sgd, uses_buffer, position, gi)
    dst["state"] = new_state
    dst["step_counter"] = torch.tensor(position, dtype=torch.int64)
    optimizer.load_state_dict(dst)
    return position


def _convert(st: Mapping[str, Any], is_sgd: bool, uses_buffer: bool, position: int, group: int) -> dict:
    if is_sgd:
        buf = st.get("momentum_buffer")
        if buf is None:
            return {}  # torch had not made a buffer yet; its first step will
        if not uses_buffer:
            raise ValueError(
                f"torch_state_dict has momentum buffers in group {group}, whose fused schedule has no momentum"
            )
        # the fused SGD takes torch's first-step rule (buf = grad) when the
        # parameter's count is 0, so a parameter with a buffer must not be at 0
        return {"step": torch.tensor(max(position, 1), dtype=torch.int64),
                "momentum_buffer": buf.detach().clone()}
    out = {"step": torch.as_tensor(st["step"]).detach().to(torch.int64).clone()}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in st:
            out[key] = copy.deepcopy(st[key].detach())
    return out
