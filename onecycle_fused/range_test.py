"""Learning-rate range test (DeepSpeed's ``LRRangeTest`` schedule) run through
the fused optimizer, and the rule that turns its loss curve into 1-Cycle bounds.

The test trains the user's model for ``num_steps`` steps while the lr grows
linearly from ``min_lr`` to ``max_lr`` (DeepSpeed's range test is linear in
the step: ``lr(k) = min_lr * (1 + rate * k)``). Losses are written into a
preallocated tensor on the model's device, so a step never waits for the host;
the host reads that tensor every ``check_every`` steps to look for divergence,
and once at the end.

Suggested bounds (:func:`suggest_lr_bounds`), following Leslie Smith,
"Cyclical Learning Rates for Training Neural Networks" (2017), section 3.3:
the loss is smoothed with a bias-corrected exponential moving average;
``cycle_max_lr`` is the lr where the smoothed loss stops falling (its
minimum, before any divergence), and ``cycle_min_lr`` is ``cycle_max_lr``
divided by ``min_lr_divisor`` (Smith's rule of thumb: a third or a quarter of
the maximum; default 4). ``max_lr_divisor`` (default 1: Smith's rule) divides
``cycle_max_lr`` first, for a more conservative peak: in this project's
convergence study (README) the loss minimum itself collapsed 1-Cycle and a
tenth of it (``max_lr_divisor=10``, the rule fastai's ``lr_find`` popularised)
trained well.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .schedule import LRRangeTest, OneCycle

__all__ = ["RangeTestResult", "lr_range_test", "suggest_lr_bounds", "smooth_losses", "plot_range_test", "toy_problem"]


@dataclasses.dataclass
class RangeTestResult:
    """Outcome of :func:`lr_range_test`. ``lrs[i]`` is the lr step ``i`` ran with
    and ``losses[i]`` the loss computed just before that step."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    cycle_min_lr: float
    cycle_max_lr: float
    diverged: bool  # True when a divergence check fired (the test stopped there; the last check is at num_steps)
    plot_path: Optional[str] = None

    @property
    def steps_run(self) -> int:
        return len(self.losses)

    def one_cycle(self, **kwargs) -> OneCycle:
        """A :class:`OneCycle` with the suggested bounds (other parameters from ``kwargs``)."""
        given = sorted({"cycle_min_lr", "cycle_max_lr"} & set(kwargs))
        if given:  # a ValueError naming them, not Python's "got multiple values" TypeError
            raise ValueError(f"one_cycle() sets {given} to the suggested bounds; for other bounds build a OneCycle")
        return OneCycle(cycle_min_lr=self.cycle_min_lr, cycle_max_lr=self.cycle_max_lr, **kwargs)


class _Smoother:
    """The bias-corrected exponential moving average, one loss at a time:
    ``smooth_losses`` and the range test's stop rule share its arithmetic."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def add(self, loss: float) -> float:
        """The smoothed value after ``loss``."""
        self.avg = self.beta * self.avg + (1 - self.beta) * float(loss)
        self.count += 1
        return self.avg / (1 - self.beta ** self.count)


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average of ``losses`` (``beta`` in [0, 1))."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    smoother = _Smoother(beta)
    return [smoother.add(loss) for loss in losses]


def _is_real(value) -> bool:
    """A real number (numpy's too), not a bool (``True`` is not a learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_divisor(name: str, value) -> None:
    if not _is_real(value) or not 1 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")


def suggest_lr_bounds(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    beta: float = 0.98,
    min_lr_divisor: float = 4.0,
    max_lr_divisor: float = 1.0,
) -> tuple[float, float, list[float]]:
    """``(cycle_min_lr, cycle_max_lr, smoothed_losses)`` from a range-test curve.

    ``cycle_max_lr`` is the lr at the minimum of the smoothed loss (the point
    where the loss stops decreasing; non-finite losses and anything after them
    are ignored) divided by ``max_lr_divisor``; ``cycle_min_lr = cycle_max_lr /
    min_lr_divisor``.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses must have the same length, got {len(lrs)} and {len(losses)}")
    _check_divisor("min_lr_divisor", min_lr_divisor)
    _check_divisor("max_lr_divisor", max_lr_divisor)
    n = 0
    while n < len(losses) and math.isfinite(float(losses[n])):
        n += 1
    if n == 0:
        raise ValueError("losses has no finite value at its start: nothing to suggest from")
    smoothed = smooth_losses(losses[:n], beta)
    best = min(range(n), key=lambda i: smoothed[i])
    max_lr = float(lrs[best]) / max_lr_divisor
    return max_lr / min_lr_divisor, max_lr, smoothed


def _cycle(data: Iterable):
    """Iterate ``data`` forever, starting it again when exhausted (a DataLoader, a list...)."""
    total = 0
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0 and total == 0:
            raise ValueError("data yielded no batch")
        if count == 0:  # a one-shot iterator (a generator, iter(loader)) cannot be started again
            raise ValueError(f"data ran out after {total} batches and yields nothing when started again "
                             f"(a one-shot iterator?): pass a list or a DataLoader, or num_steps <= {total}")
        total += count


def lr_range_test(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    data: Iterable,
    *,
    min_lr: float = 1e-5,
    max_lr: float = 1.0,
    num_steps: int = 100,
    optimizer: str = "sgd",
    optimizer_kwargs: Optional[dict] = None,
    staircase: bool = False,
    step_size: int = 1,
    check_every: int = 10,
    diverge_factor: float = 4.0,
    beta: float = 0.98,
    min_lr_divisor: float = 4.0,
    max_lr_divisor: float = 1.0,
    backend: str = "auto",
    restore: bool = True,
    plot: Optional[str] = None,
) -> RangeTestResult:
    """Run DeepSpeed's LR range test through a fused optimizer.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch of ``data``
    (an iterable, started again when exhausted; a one-shot iterator that
    runs out before ``num_steps`` is a ValueError). The lr goes linearly from
    ``min_lr`` at step 0 to ``max_lr`` at step ``num_steps - 1``: the
    ``LRRangeTest`` schedule with ``lr_range_test_step_size=step_size`` and
    ``lr_range_test_step_rate=(max_lr / min_lr - 1) / ((num_steps - 1) / step_size)``.
    With ``staircase=True`` the lr is held flat for ``step_size`` steps
    (DeepSpeed's ``lr_range_test_staircase``: the interval is floored, so the
    rate divides by ``(num_steps - 1) // step_size``) and the last stair, the
    one holding step ``num_steps - 1``, is ``max_lr``; with the default
    ``step_size=1`` there are no stairs.

    ``optimizer``: ``"sgd"``, ``"adam"`` or ``"adamw"``; ``optimizer_kwargs``
    go to its constructor (default for SGD: ``momentum=0.9``). Every
    ``check_every`` steps the host reads the losses so far and stops when the
    smoothed loss exceeds ``diverge_factor`` times its minimum (when that
    minimum is positive) or a loss is not finite. With ``restore`` (default) the model's parameters, buffers,
    train/eval mode and grads are put back afterwards (non-persistent buffers too). ``plot``: an image path to draw the curve to.
    ``min_lr_divisor`` / ``max_lr_divisor``: see :func:`suggest_lr_bounds`.
    """
    from .optim import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD

    classes = {"sgd": FusedOneCycleSGD, "adam": FusedOneCycleAdam, "adamw": FusedOneCycleAdamW}
    if not isinstance(optimizer, str) or optimizer not in classes:
        raise ValueError(f"optimizer must be one of {sorted(classes)}, got {optimizer!r}")
    _check_divisor("min_lr_divisor", min_lr_divisor)  # before training, not after
    _check_divisor("max_lr_divisor", max_lr_divisor)
    if not (_is_real(min_lr) and min_lr > 0 and math.isfinite(min_lr)):
        raise ValueError(f"min_lr must be a finite number > 0, got {min_lr!r}")
    if not (_is_real(max_lr) and max_lr > min_lr and math.isfinite(max_lr)):
        raise ValueError(f"max_lr must be a finite number > min_lr ({min_lr}), got {max_lr!r}")
    if not isinstance(staircase, bool):
        raise ValueError(f"staircase must be a bool, got {staircase!r}")
    if not _is_integer(num_steps) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if not _is_integer(step_size) or not 1 <= step_size <= num_steps - 1:
        raise ValueError(f"step_size must be an integer in [1, num_steps - 1 = {num_steps - 1}], got {step_size!r}")
    if not _is_integer(check_every) or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
    if not (_is_real(diverge_factor) and diverge_factor > 1):
        raise ValueError(f"diverge_factor must be a number > 1, got {diverge_factor!r}")
    if not (_is_real(beta) and 0 <= beta < 1):  # checked at the first check, after training, otherwise
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    # numpy scalars too, as plain Python numbers from here on
    num_steps, step_size, check_every = int(num_steps), int(step_size), int(check_every)
    min_lr, max_lr = float(min_lr), float(max_lr)

    schedule = LRRangeTest(
        lr_range_test_min_lr=min_lr,
        lr_range_test_step_size=step_size,
        # the interval at the last step, as the schedule computes it
        lr_range_test_step_rate=(max_lr / min_lr - 1) / (
            (num_steps - 1) // step_size if staircase else (num_steps - 1) / step_size
        ),
        lr_range_test_staircase=staircase,
    )
    cls = classes[optimizer]
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise ValueError(f"optimizer_kwargs must be a dict of {cls.__name__} arguments, got {optimizer_kwargs!r}")
    kwargs = dict(optimizer_kwargs or {})
    reserved = {"schedule", "backend", "lr", "params"} & set(kwargs)
    if reserved:
        raise ValueError(f"optimizer_kwargs must not set {sorted(reserved)}: the range test sets the schedule "
                         "(and with it every lr) and the parameters, and backend is an argument of lr_range_test")
    # before training, and as ValueError (the constructor's TypeError otherwise)
    unknown = set(kwargs) - set(inspect.signature(cls).parameters)
    if unknown:
        raise ValueError(f"optimizer_kwargs: {sorted(unknown, key=str)} are not arguments of {cls.__name__}")
    if optimizer == "sgd":
        kwargs.setdefault("momentum", 0.9)
    if plot is not None:
        from .plotting import image_target

        image_target(plot, "plot")  # a bad path fails now, not after the test
    # the arguments' kinds, named before anything runs (a bare AttributeError
    # or "'int' object is not iterable" from the first step, otherwise)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable loss_fn(model, batch), got {type(loss_fn).__name__}")
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be an iterable of batches (a DataLoader, a list...), got {type(data).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires grad")
    if not isinstance(restore, bool):
        raise ValueError(f"restore must be a bool, got {restore!r}")
    saved = copy.deepcopy(model.state_dict()) if restore else None
    # every buffer, also the non-persistent ones state_dict leaves out, and
    # the tensor each module held (a forward may replace a buffer); also the
    # buffer slots themselves: a forward may fill one registered as None or
    # register a new one, which load_state_dict would refuse as a missing key
    buffers = ([(m, dict(m._buffers), {name: b.detach().clone() for name, b in m._buffers.items() if b is not None})
                for m in model.modules()] if restore else [])
    # what else "as it was" means: each module's train/eval mode and the grads
    modes = [(m, m.training) for m in model.modules()] if restore else []
    grads = [(p, p.grad) for p in params] if restore else []
    opt = cls(params, schedule=schedule, backend=backend, **kwargs)
    device = params[0].device

    # losses stay on the device; the host reads them only at checks
    losses = torch.full((num_steps,), float("nan"), dtype=torch.float32, device=device)
    batches = _cycle(data)
    watch = _DivergenceWatch(beta, diverge_factor)
    diverged = False
    steps = 0
    try:
        model.train()
        for i in range(num_steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, next(batches))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar loss tensor")
            if not loss.requires_grad:
                raise ValueError("loss_fn returned a loss that does not require grad (detached, or computed "
                                 "under torch.no_grad()): the test needs its backward")
            loss.backward()
            losses[i].copy_(loss.detach().reshape(()))
            opt.step()
            steps = i + 1
            if steps % check_every == 0 or steps == num_steps:
                if watch.add(losses[watch.seen:steps].tolist()):
                    diverged = True
                    break
    finally:
        if saved is not None:
            with torch.no_grad():
                for m, held, values in buffers:
                    for name in [n for n in m._buffers if n not in held]:  # registered during the test
                        del m._buffers[name]
                        m._non_persistent_buffers_set.discard(name)
                    for name, b in held.items():
                        m._buffers[name] = b
                        if b is not None:
                            b.copy_(values[name])
            model.load_state_dict(saved)
            for m, training in modes:
                m.training = training
            for p, g in grads:
                p.grad = g

    host_losses = losses[:steps].tolist()
    lrs = [schedule.lr(k) for k in range(steps)]
    cycle_min_lr, cycle_max_lr, smoothed = suggest_lr_bounds(
        lrs, host_losses, beta=beta, min_lr_divisor=min_lr_divisor, max_lr_divisor=max_lr_divisor
    )
    result = RangeTestResult(lrs, host_losses, smoothed, cycle_min_lr, cycle_max_lr, diverged)
    if plot is not None:
        result.plot_path = plot_range_test(result, plot)
    return result


class _DivergenceWatch:
    """The stop rule, fed the losses since its last check: a non-finite loss,
    or the smoothed loss (``smooth_losses``'s ``_Smoother``) above ``factor``
    times its minimum so far. Kept running so that a check costs the new
    steps only; re-smoothing the whole history at every check made a long
    test quadratic."""

    def __init__(self, beta: float, factor: float):
        self.smoother, self.factor = _Smoother(beta), factor
        self.best, self.last = math.inf, math.nan

    @property
    def seen(self) -> int:
        """Losses taken so far (all finite: a non-finite one ends the test)."""
        return self.smoother.count

    def add(self, losses: list[float]) -> bool:
        for loss in losses:
            if not math.isfinite(loss):
                return True
            self.last = self.smoother.add(loss)
            self.best = min(self.best, self.last)
        # a ratio to the minimum means nothing unless the minimum is positive (a
        # loss that can be 0 or negative, such as a negative log-likelihood): then
        # only a non-finite loss stops the test
        return self.best > 0 and self.last > self.factor * self.best


def plot_range_test(result: RangeTestResult, path: str) -> str:
    """Draw loss against lr (log axis) with the suggested bounds, to an image
    at ``path`` (PNG, or the format of its extension)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .plotting import image_target

    path, fmt = image_target(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(result.smoothed)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs[:n], result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(result.cycle_min_lr, color="C2", linestyle="--", label=f"cycle_min_lr = {result.cycle_min_lr:.3g}")
    ax.axvline(result.cycle_max_lr, color="C3", linestyle="--", label=f"cycle_max_lr = {result.cycle_max_lr:.3g}")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # keep a diverging tail from squashing the interesting part
        lo = min(finite + [v for v in result.losses if math.isfinite(v)])
        hi = max(finite[: max(1, n // 10)] + [finite[0]])
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-12), hi + 0.5 * (hi - lo + 1e-12))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    # "by step n", not "stopped": the check also runs after the last step,
    # where firing cut nothing short
    title = "LR range test" + (f" (loss diverged by step {result.steps_run})" if result.diverged else "")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format=fmt)
    plt.close(fig)
    return path


def toy_problem(seed: int = 0, batch_size: int = 64, num_batches: int = 16):
    """A small built-in problem for the command line and the README:
    ``(model, loss_fn, data)``, a 2-layer MLP classifying 3 overlapping
    Gaussian blobs in 16 dimensions (the overlap keeps the loss from reaching
    0, so a curve has a clear minimum). Deterministic for a given ``seed``;
    nothing is downloaded."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=gen)
    labels = torch.randint(0, 3, (batch_size * num_batches,), generator=gen)
    inputs = centers[labels] + 1.5 * torch.randn(len(labels), 16, generator=gen)
    data = list(zip(inputs.split(batch_size), labels.split(batch_size)))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    return model, loss_fn, data
