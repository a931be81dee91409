"""Convergence study: does 1-Cycle let an 8x larger batch train as
sample-efficiently as a tuned small batch?

The DeepSpeed 1-Cycle tutorial reports, for an internal model at 8x batch:
the small batch's fixed LR needs ~5x more samples, the 8x linearly scaled LR
diverges, and 1-Cycle converges as fast (in samples) as the tuned small
batch. This script repeats that experiment on a task anyone can run on a CPU:

    python benchmarks/convergence.py            # full study: ~85 s of CPU time, 3-4 min on 2 busy cores
    python benchmarks/convergence.py --quick    # seconds: the pipeline only

Task. A synthetic 10-class problem generated in code from a fixed seed: inputs
x ~ N(0, I_32), labels = argmax of a random one-hidden-layer ReLU "teacher"
network (logits centred per class so that no class dominates). It is
realizable but slow to learn: a 32-64-64-10 ReLU student keeps improving for
hundreds of thousands of samples, and the study's own tuning finds batch 256
at its best lr (0.1) about as sample-efficient as batch 32 at its best (0.01):
8x32 is not past the critical batch size (on sklearn-sized data sets it is).

Protocol.
* Small batch B=32, 8B=256, momentum SGD (0.9). Every arm sees the same
  sample budget and is evaluated on the same grid of sample counts.
* The constant LRs (at B and at 8B) are tuned on a half-decade grid by the
  mean test accuracy over the evaluation grid (fast convergence in samples,
  as the tutorial's baseline was tuned), on *tuning seeds* that are not the
  reporting seeds.
* Arms at 8B: Fixed (B's tuned LR), LinearScale (8x it), 1-Cycle through
  FusedOneCycleSGD, and two controls: the best constant LR tuned at 8B, and
  linear warmup from B's LR to 8x it over the first 10% of steps followed by
  cosine decay to 0 (Goyal et al. 2017's recipe, with the now usual cosine).
* 1-Cycle's cycle_max_lr comes from DeepSpeed's LR range test run through the
  fused optimizer (onecycle_fused.range_test) at 8B. Rule: a tenth of the lr
  at the minimum of the smoothed range-test loss (the fast.ai rule of thumb:
  the minimum itself sits at the edge of divergence), cycle_min_lr a quarter
  of cycle_max_lr. This rule was adopted after the first one, the minimum
  itself (the library's suggestion), made 1-Cycle collapse; that arm is still
  run, as "1-Cycle (lr at loss min)", because it is what a user gets by
  default. Momentum cycles 0.95 -> 0.85 -> 0.95 (Smith 2018). The cycle spans
  90% of the budget (45% up, 45% down); the last 10% decays lr to
  cycle_min_lr/10 (DeepSpeed's decay phase, decay_lr_rate=9 over that stretch).
* Samples to target: the first evaluation point whose test accuracy reaches
  the target. Targets are set below the ceiling, from the tuned small-batch
  baseline itself: 97%, 92% and 85% of its median final accuracy.
* 5 paired seeds (a seed fixes the initialisation and the data order, the
  same in every arm), median and range. A non-finite loss, or a training loss
  above 10*ln(10), is a blow-up: that seed misses every target from then on.

The lr (and momentum) each arm *actually used* at every step is measured, not
recomputed: a one-element probe parameter sits in the optimizer's group with
gradient 1 and is zeroed before each step, so after the step
``probe = -lr * momentum_buffer`` (up to one fp32 rounding); ``momentum`` follows from the
buffer's change. tests/test_convergence.py compares these measurements with
the schedules' formulas.

Performance: the seeds of one arm train together as one "stacked" model
(weights ``[seeds, in, out]``, batched matmuls). SGD is element-wise and the
summed loss gives each seed's weights only that seed's gradient, so this is
exactly independent runs at a fraction of the per-step overhead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch

import onecycle_fused
from onecycle_fused import FusedOneCycleSGD, OneCycle
from onecycle_fused.range_test import lr_range_test

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "convergence")


@dataclasses.dataclass
class Config:
    dim: int = 32
    teacher_hidden: int = 32
    hidden: int = 64
    classes: int = 10
    n_train: int = 60_000
    n_test: int = 10_000
    data_seed: int = 1234
    batch: int = 32  # B
    factor: int = 8  # the large batch is factor * B
    budget: int = 409_600  # samples per arm (a multiple of eval_every)
    eval_every: int = 10_240  # samples between evaluations (a multiple of factor * B)
    momentum: float = 0.9
    seeds: tuple = (0, 1, 2, 3, 4)
    tune_seeds: tuple = (100, 101)
    grid_small: tuple = (0.003, 0.01, 0.03, 0.1)  # half-decade grids
    grid_large: tuple = (0.03, 0.1, 0.3, 1.0)
    warmup_fraction: float = 0.1
    # 1-Cycle
    cycle_fraction: float = 0.9
    cycle_min_mom: float = 0.85
    cycle_max_mom: float = 0.95
    final_lr_divisor: float = 10.0
    # range test (at the large batch, one tuning seed)
    range_min_lr: float = 1e-3
    range_max_lr: float = 10.0
    range_steps: int = 300
    range_divisor: float = 10.0  # cycle_max_lr = lr at the smoothed-loss minimum / this
    min_lr_divisor: float = 4.0  # cycle_min_lr = cycle_max_lr / this
    # targets, as fractions of the baseline's median final accuracy
    target_fractions: tuple = (0.97, 0.92, 0.85)
    blowup_loss: float = 10 * math.log(10)
    threads: int = 1
    lr_record_every: int = 4  # steps of the large batch between recorded lr values

    @property
    def large_batch(self) -> int:
        return self.factor * self.batch

    def validate(self) -> None:
        for name in ("dim", "teacher_hidden", "hidden", "classes", "batch", "factor", "budget", "eval_every",
                     "range_steps", "threads", "lr_record_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.eval_every % self.large_batch:
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of factor*batch ({self.large_batch})")
        if self.budget % self.eval_every:
            raise ValueError(f"budget ({self.budget}) must be a multiple of eval_every ({self.eval_every})")
        if self.n_train < self.large_batch:
            raise ValueError(f"n_train ({self.n_train}) must be at least factor*batch ({self.large_batch})")
        if not self.seeds or not self.tune_seeds:
            raise ValueError("seeds and tune_seeds must not be empty")


def quick_config() -> Config:
    """A shrunken study for CI: one seed, a few hundred steps, same code paths."""
    return Config(n_train=4096, n_test=1000, batch=16, budget=8192, eval_every=2048, seeds=(0,),
                  tune_seeds=(100,), grid_small=(0.01, 0.1), grid_large=(0.03, 0.3), range_steps=40, lr_record_every=1)


# ---------------------------------------------------------------------------
# data and model


def make_data(cfg: Config):
    """(x_train, y_train, x_test, y_test): teacher-labelled Gaussian inputs, fixed seed."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    w1 = torch.randn(cfg.dim, cfg.teacher_hidden, generator=g) / math.sqrt(cfg.dim)
    w2 = torch.randn(cfg.teacher_hidden, cfg.classes, generator=g) * (3 / math.sqrt(cfg.teacher_hidden))
    n = cfg.n_train + cfg.n_test
    x = torch.randn(n, cfg.dim, generator=g)
    logits = torch.relu(x @ w1) @ w2
    # centring each class's logit balances the classes (the ReLU teacher
    # otherwise gives one class a third of the data)
    y = (logits - logits.mean(0)).argmax(1)
    return x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train:], y[cfg.n_train:]


class StackedMLP(torch.nn.Module):
    """``len(seeds)`` independent dim-hidden-hidden-classes ReLU MLPs in stacked weights."""

    def __init__(self, cfg: Config, seeds: Sequence[int]):
        super().__init__()
        sizes = [cfg.dim, cfg.hidden, cfg.hidden, cfg.classes]
        weights, biases = [[] for _ in sizes[1:]], [[] for _ in sizes[1:]]
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
                bound = 1 / math.sqrt(fan_in)  # torch.nn.Linear's default init
                weights[i].append((torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound)
                biases[i].append((torch.rand(1, fan_out, generator=g) * 2 - 1) * bound)
        self.weights = torch.nn.ParameterList(torch.stack(w) for w in weights)
        self.biases = torch.nn.ParameterList(torch.stack(b) for b in biases)

    def forward(self, x):  # x: [seeds, n, dim] or [n, dim] (shared)
        if x.dim() == 2:
            x = x.expand(len(self.weights[0]), -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x


def per_seed_loss(logits, y):
    """Mean cross-entropy of each seed's batch: ``[seeds]``."""
    s, n, c = logits.shape
    return torch.nn.functional.cross_entropy(logits.reshape(s * n, c), y.reshape(s * n), reduction="none").view(s, n).mean(1)


class Batches:
    """Each seed's own shuffled pass over the training set, reshuffled every
    epoch; a seed's order is the same at every batch size (paired runs)."""

    def __init__(self, n: int, seeds: Sequence[int], batch: int):
        self.n, self.batch = n, batch
        self.gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
        self._reshuffle()

    def _reshuffle(self):
        self.order = torch.stack([torch.randperm(self.n, generator=g) for g in self.gens])
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:  # drop the ragged end, as drop_last=True
            self._reshuffle()
        idx = self.order[:, self.pos: self.pos + self.batch]
        self.pos += self.batch
        return idx


# ---------------------------------------------------------------------------
# arms


@dataclasses.dataclass
class Arm:
    """One training recipe. ``make_optimizer(params)`` returns ``(optimizer,
    after_step)``; ``after_step`` (or None) advances a torch scheduler.
    ``lr_formula(k)`` / ``mom_formula(k)`` are what the recipe promises for
    step ``k`` (used by the tests and the lr plot's legend)."""

    name: str
    batch: int
    make_optimizer: Callable
    lr_formula: Callable[[int], float]
    mom_formula: Callable[[int], float]
    description: str
    schedule: Optional[OneCycle] = None  # the 1-Cycle arms' schedule


def constant_arm(name, batch, lr, momentum, description) -> Arm:
    def make(params):
        return torch.optim.SGD(params, lr=lr, momentum=momentum), None

    return Arm(name, batch, make, lambda k: lr, lambda k: momentum, description)


def warmup_cosine_lr(k: int, steps: int, base_lr: float, peak_lr: float, warmup: int) -> float:
    """Linear warmup from base_lr (step 0) to peak_lr (step ``warmup``), then
    cosine decay to 0 at step ``steps``."""
    if k < warmup:
        return base_lr + (peak_lr - base_lr) * k / warmup
    return peak_lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))


def warmup_cosine_arm(name, batch, steps, base_lr, peak_lr, warmup, momentum, description) -> Arm:
    def factor(k):
        return warmup_cosine_lr(k, steps, base_lr, peak_lr, warmup) / peak_lr

    def make(params):
        opt = torch.optim.SGD(params, lr=peak_lr, momentum=momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return opt, sched.step

    return Arm(name, batch, make, lambda k: warmup_cosine_lr(k, steps, base_lr, peak_lr, warmup),
               lambda k: momentum, description)


def one_cycle_schedule(cfg: Config, steps: int, max_lr: float) -> OneCycle:
    cycle = int(round(cfg.cycle_fraction * steps))
    first = cycle // 2
    second = cycle - first
    tail = max(1, steps - cycle)
    return OneCycle(
        cycle_min_lr=max_lr / cfg.min_lr_divisor, cycle_max_lr=max_lr,
        cycle_first_step_size=first, cycle_second_step_size=second,
        decay_step_size=tail, decay_lr_rate=cfg.final_lr_divisor - 1,
        cycle_momentum=True, cycle_min_mom=cfg.cycle_min_mom, cycle_max_mom=cfg.cycle_max_mom,
    )


def describe_one_cycle(cfg: Config, s: OneCycle, rule: str) -> str:
    return (f"FusedOneCycleSGD, max lr = {rule}: lr {s.cycle_min_lr:.3g}->{s.cycle_max_lr:.3g}->"
            f"{s.cycle_min_lr:.3g}->{s.cycle_min_lr / cfg.final_lr_divisor:.3g}, "
            f"momentum {cfg.cycle_max_mom}->{cfg.cycle_min_mom}->{cfg.cycle_max_mom}")


def one_cycle_arm(name, batch, schedule: OneCycle, description) -> Arm:
    def make(params):
        return FusedOneCycleSGD(params, schedule=schedule), None  # backend "auto"

    return Arm(name, batch, make, schedule.lr, schedule.momentum, description, schedule)


# ---------------------------------------------------------------------------
# training


@dataclasses.dataclass
class RunResult:
    arm: str
    batch: int
    seeds: list
    samples: list  # evaluation grid
    accuracy: list  # [seed][eval] (None after a blow-up)
    test_loss: list  # [seed][eval]
    blowup_step: list  # per seed: first step whose loss blew up, or None
    lr: list  # per step, measured
    momentum: list  # per step, measured (None at step 0 for torch's first-step buffer)
    seconds: float
    implementation: str  # which optimizer code ran the steps
    record_every: int  # lr[i] / momentum[i] belong to step i * record_every
    lr_max_rel_dev: float  # over every step: |measured - schedule| / schedule
    momentum_max_abs_dev: float  # over every step after the first


def train(cfg: Config, arm: Arm, seeds: Sequence[int], data, *, record_every: int = 1) -> RunResult:
    x_train, y_train, x_test, y_test = data
    model = StackedMLP(cfg, seeds)
    # the probe: gradient 1, zeroed before each step -> after the step it
    # holds -lr * buf (see the module docstring)
    probe = torch.nn.Parameter(torch.zeros(1))
    opt, after_step = arm.make_optimizer(list(model.parameters()) + [probe])
    steps = cfg.budget // arm.batch
    eval_steps = cfg.eval_every // arm.batch
    batches = Batches(len(x_train), seeds, arm.batch)
    n_seeds = len(seeds)

    lr_log = torch.empty(steps, dtype=torch.float64)
    mom_log = torch.full((steps,), float("nan"), dtype=torch.float64)
    worst = torch.zeros(n_seeds)  # running max of each seed's training loss (NaN propagates)
    blowup_step: list = [None] * n_seeds
    accuracy = [[] for _ in seeds]
    test_loss = [[] for _ in seeds]
    samples = []
    prev_buf = None
    t0 = time.perf_counter()
    for k in range(steps):
        idx = batches.next()
        losses = per_seed_loss(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=False)
        losses.sum().backward()
        worst = torch.maximum(worst, losses.detach())
        with torch.no_grad():
            probe.zero_()
            probe.grad = torch.ones_like(probe)
        opt.step()
        if after_step is not None:
            after_step()
        buf = opt.state[probe]["momentum_buffer"].item()
        lr_log[k] = -probe.item() / buf
        if prev_buf is not None:
            mom_log[k] = (buf - 1) / prev_buf
        prev_buf = buf

        if (k + 1) % eval_steps == 0:
            samples.append((k + 1) * arm.batch)
            with torch.no_grad():
                logits = model(x_test)
                acc = (logits.argmax(-1) == y_test).double().mean(1)
                tl = per_seed_loss(logits, y_test.expand(n_seeds, -1))
            for s in range(n_seeds):
                bad = not (math.isfinite(worst[s].item()) and worst[s].item() <= cfg.blowup_loss
                           and math.isfinite(tl[s].item()))
                if bad and blowup_step[s] is None:
                    blowup_step[s] = k  # blew up at or before this step
                dead = blowup_step[s] is not None
                accuracy[s].append(None if dead else acc[s].item())
                test_loss[s].append(None if dead else tl[s].item())
    seconds = time.perf_counter() - t0
    # the measured values against what the recipe promised, at every step
    want_lr = torch.tensor([arm.lr_formula(k) for k in range(steps)], dtype=torch.float64)
    want_mom = torch.tensor([arm.mom_formula(k) for k in range(steps)], dtype=torch.float64)
    lr_dev = ((lr_log - want_lr).abs() / want_lr.clamp_min(1e-300)).max().item()
    mom_dev = (mom_log[1:] - want_mom[1:]).abs().max().item() if steps > 1 else 0.0
    lrs = lr_log[::record_every].tolist()
    moms = [None if math.isnan(m) else m for m in mom_log[::record_every].tolist()]
    return RunResult(arm.name, arm.batch, list(seeds), samples, accuracy, test_loss, blowup_step, lrs, moms, seconds,
                     implementation(opt), record_every, lr_dev, mom_dev)


def implementation(opt) -> str:
    if isinstance(opt, FusedOneCycleSGD):
        names = sorted({b.name for b in opt._backend_for.values()})
        return f"FusedOneCycleSGD, backend {'/'.join(names)}"
    return f"{type(opt).__module__}.{type(opt).__name__}"


def mean_accuracy(run: RunResult) -> float:
    """Tuning score: median over seeds of the mean test accuracy over the
    evaluation grid (a blown-up seed scores 0 from then on)."""
    per_seed = [sum(a if a is not None else 0.0 for a in accs) / len(accs) for accs in run.accuracy]
    return float(torch.tensor(per_seed).median())


def samples_to_target(samples: Sequence[int], accuracy: Sequence[Optional[float]], target: float) -> Optional[int]:
    """Samples at the first evaluation whose accuracy is >= target, or None (a
    miss: never reached, or blew up before; None accuracies are misses)."""
    for n, a in zip(samples, accuracy):
        if a is None or (isinstance(a, float) and math.isnan(a)):
            return None
        if a >= target:
            return n
    return None


def summarize(values: Sequence[Optional[float]]) -> dict:
    """Median and range over seeds; a miss (None) counts as +infinity, so the
    median is a miss when more than half the seeds miss."""
    finite = sorted(v for v in values if v is not None)
    misses = len(values) - len(finite)
    ordered = finite + [math.inf] * misses
    n = len(ordered)
    mid = ordered[(n - 1) // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {
        "median": None if math.isinf(mid) else mid,
        "min": finite[0] if finite else None,
        "max": None if misses else (finite[-1] if finite else None),
        "misses": misses,
        "n": n,
    }


# ---------------------------------------------------------------------------
# the study


def pick_best(runs: dict) -> tuple:
    best = max(runs, key=lambda lr: mean_accuracy(runs[lr]))
    return best, {str(lr): mean_accuracy(r) for lr, r in runs.items()}


def log(msg: str) -> None:
    print(msg, flush=True)


def run_study(cfg: Config, out_dir: str, *, plots: bool = True) -> dict:
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    data = make_data(cfg)
    B, LB = cfg.batch, cfg.large_batch
    steps_large = cfg.budget // LB
    log(f"data: {cfg.n_train} train / {cfg.n_test} test, {cfg.classes} classes, class shares "
        f"{(torch.bincount(data[1], minlength=cfg.classes).double() / cfg.n_train).tolist()}")

    # 1. tune the constant lr at B and at 8B (tuning seeds)
    def tune(batch, grid):
        runs = {}
        for lr in grid:
            runs[lr] = train(cfg, constant_arm(f"const {lr}", batch, lr, cfg.momentum, ""), cfg.tune_seeds, data)
            log(f"  tune batch {batch} lr {lr}: mean acc {mean_accuracy(runs[lr]):.4f} ({runs[lr].seconds:.1f}s)")
        return pick_best(runs)

    log(f"tuning constant lr at B={B} on seeds {cfg.tune_seeds}")
    lr_small, grid_small_scores = tune(B, cfg.grid_small)
    log(f"tuning constant lr at 8B={LB}")
    lr_large, grid_large_scores = tune(LB, cfg.grid_large)

    # 2. LR range test at 8B (the first tuning seed) -> 1-Cycle bounds
    range_model = StackedMLP(cfg, cfg.tune_seeds[:1])
    range_batches = Batches(cfg.n_train, cfg.tune_seeds[:1], LB)

    def range_data():
        while True:
            idx = range_batches.next()
            yield data[0][idx], data[1][idx]

    def range_loss(model, batch):
        x, y = batch
        return per_seed_loss(model(x), y).sum()

    rt = lr_range_test(range_model, range_loss, range_data(), min_lr=cfg.range_min_lr, max_lr=cfg.range_max_lr,
                       num_steps=cfg.range_steps, optimizer="sgd", optimizer_kwargs={"momentum": cfg.momentum},
                       min_lr_divisor=cfg.min_lr_divisor)
    log(f"range test: smoothed loss lowest at lr {rt.cycle_max_lr:.4g}"
        f" ({rt.steps_run} steps{', stopped on divergence' if rt.diverged else ''})")
    schedule = one_cycle_schedule(cfg, steps_large, rt.cycle_max_lr / cfg.range_divisor)
    schedule_at_min = one_cycle_schedule(cfg, steps_large, rt.cycle_max_lr)

    # 3. the arms, on the reporting seeds
    warmup = int(round(cfg.warmup_fraction * steps_large))
    arms = [
        constant_arm(f"Baseline B={B}", B, lr_small, cfg.momentum, f"constant lr {lr_small:g} tuned at B={B}"),
        constant_arm("Fixed", LB, lr_small, cfg.momentum, f"constant lr {lr_small:g} (B's tuned lr)"),
        constant_arm("LinearScale", LB, cfg.factor * lr_small, cfg.momentum,
                     f"constant lr {cfg.factor * lr_small:g} ({cfg.factor}x B's tuned lr)"),
        one_cycle_arm("1-Cycle", LB, schedule, describe_one_cycle(cfg, schedule, "range-test minimum / "
                                                                    f"{cfg.range_divisor:g}")),
        one_cycle_arm("1-Cycle (lr at loss min)", LB, schedule_at_min,
                      describe_one_cycle(cfg, schedule_at_min, "range-test minimum")),
        constant_arm("Best constant 8B", LB, lr_large, cfg.momentum, f"constant lr {lr_large:g} tuned at 8B={LB}"),
        warmup_cosine_arm("Warmup+cosine", LB, steps_large, lr_small, cfg.factor * lr_small, warmup, cfg.momentum,
                          f"lr {lr_small:g}->{cfg.factor * lr_small:g} linearly over {warmup} steps, cosine to 0"),
    ]
    runs = {}
    for arm in arms:
        # the small batch takes 8x the steps: keep every 8th lr so the JSON stays small
        # one lr record per lr_record_every steps of the large batch (the
        # small batch takes factor x as many steps): keeps the JSON small
        every = cfg.lr_record_every * (cfg.factor if arm.batch == B else 1)
        runs[arm.name] = train(cfg, arm, cfg.seeds, data, record_every=every)
        log(f"  {arm.name}: final median acc {final_median(runs[arm.name]):.4f} ({runs[arm.name].seconds:.1f}s, "
            f"{runs[arm.name].implementation})")

    baseline = runs[arms[0].name]
    ceiling = final_median(baseline)
    targets = [round(f * ceiling, 4) for f in cfg.target_fractions]
    table = []
    for arm in arms:
        run = runs[arm.name]
        row = {"arm": arm.name, "batch": arm.batch, "schedule": arm.description,
               "blowups": sum(b is not None for b in run.blowup_step),
               "final_accuracy": summarize([a[-1] for a in run.accuracy]),
               "seconds": round(run.seconds, 2), "implementation": run.implementation,
               "lr_max_rel_dev": run.lr_max_rel_dev, "momentum_max_abs_dev": run.momentum_max_abs_dev}
        for t in targets:
            row[f"samples_to_{t}"] = summarize([samples_to_target(run.samples, a, t) for a in run.accuracy])
        table.append(row)

    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "environment": {"torch": torch.__version__, "onecycle_fused": onecycle_fused.__version__,
                        "python": sys.version.split()[0], "threads": cfg.threads,
                        "backends": onecycle_fused.available_backends()},
        "tuning": {"small_batch": {"grid": grid_small_scores, "best_lr": lr_small},
                   "large_batch": {"grid": grid_large_scores, "best_lr": lr_large},
                   "score": "median over tuning seeds of the mean test accuracy over the evaluation grid"},
        "range_test": {"lr_at_loss_min": rt.cycle_max_lr, "diverged": rt.diverged, "steps": rt.steps_run,
                       "cycle_max_lr": schedule.cycle_max_lr, "cycle_min_lr": schedule.cycle_min_lr,
                       "rule": f"cycle_max_lr = (lr at the minimum of the smoothed loss) / {cfg.range_divisor:g}; "
                       f"cycle_min_lr = cycle_max_lr / {cfg.min_lr_divisor:g}"},
        "one_cycle": schedule.config(),
        "ceiling": ceiling,
        "targets": targets,
        "table": table,
        "runs": {name: dataclasses.asdict(r) for name, r in runs.items()},
        "seconds_total": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        plot_range(rt, schedule, os.path.join(out_dir, "range_test.png"))
        plot_accuracy(result, os.path.join(out_dir, "accuracy_vs_samples.png"))
        plot_lr(result, arms, os.path.join(out_dir, "lr_vs_steps.png"))
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, separators=(",", ":"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(result))
    log(markdown_table(result))
    log(f"total {result['seconds_total']}s; outputs in {out_dir}")
    result["arms"] = arms  # for callers in-process (tests); not serialised
    return result


def final_median(run: RunResult) -> float:
    finals = [a[-1] if a[-1] is not None else 0.0 for a in run.accuracy]
    return float(torch.tensor(finals, dtype=torch.float64).median())


def _fmt_samples(s: dict, base: Optional[dict] = None) -> str:
    """``median [min, max]`` in thousands, and the median's ratio to ``base``'s."""
    if s["median"] is None:
        return f"miss ({s['misses']}/{s['n']} missed)"
    lo = f"{s['min'] / 1000:.0f}k"
    hi = "miss" if s["max"] is None else f"{s['max'] / 1000:.0f}k"
    ratio = f" ({s['median'] / base['median']:.2g}x)" if base is not None and base["median"] else ""
    return f"{s['median'] / 1000:.0f}k [{lo}, {hi}]{ratio}"


def _fmt_acc(s: dict) -> str:
    if s["median"] is None:
        return "blow-up"
    hi = "blow-up" if s["max"] is None else f"{s['max']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}, {hi}]"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    t = result["targets"]
    lines = [
        f"Batch {cfg['batch']} vs {cfg['factor']}x, {cfg['budget']:,} samples per arm, "
        f"{len(cfg['seeds'])} seeds (median [min, max]; a miss counts as infinite). "
        f"Targets: {', '.join(f'{v:.4f}' for v in t)} test accuracy "
        f"({', '.join(f'{100 * f:g}%' for f in cfg['target_fractions'])} of the baseline's median final "
        f"accuracy {result['ceiling']:.4f}); (N x): median samples relative to the baseline's.",
        "",
        "| arm | batch | " + " | ".join(f"samples to {v:.3f}" for v in t)
        + " | final accuracy | blow-ups | schedule |",
        "|---|---:|" + "---:|" * len(t) + "---:|---:|---|",
    ]
    base = result["table"][0]
    for row in result["table"]:
        lines.append(
            f"| {row['arm']} | {row['batch']} | "
            + " | ".join(_fmt_samples(row[f"samples_to_{v}"], None if row is base else base[f"samples_to_{v}"])
                         for v in t)
            + f" | {_fmt_acc(row['final_accuracy'])} | {row['blowups']}/{row['final_accuracy']['n']} | "
            f"{row['schedule']} |"
        )
    tu = result["tuning"]
    fmt = lambda g: ", ".join(f"{lr}: {v:.4f}" for lr, v in g.items())  # noqa: E731
    lines += [
        "",
        f"Tuning (mean test accuracy over the evaluation grid, median of seeds {cfg['tune_seeds']}): "
        f"B={cfg['batch']}: {fmt(tu['small_batch']['grid'])} -> {tu['small_batch']['best_lr']}; "
        f"8B: {fmt(tu['large_batch']['grid'])} -> {tu['large_batch']['best_lr']}.",
        f"LR range test at 8B ({result['range_test']['steps']} steps, lr {cfg['range_min_lr']:g} to "
        f"{cfg['range_max_lr']:g}): smoothed loss lowest at lr {result['range_test']['lr_at_loss_min']:.4g}; "
        f"{result['range_test']['rule']}: cycle_max_lr {result['range_test']['cycle_max_lr']:.4g}, "
        f"cycle_min_lr {result['range_test']['cycle_min_lr']:.4g}.",
        "The lr and momentum each arm used were measured at every step (a probe parameter, see the script) and "
        "matched its schedule to within "
        f"{max(r['lr_max_rel_dev'] for r in result['table']):.1e} (lr, relative) and "
        f"{max(r['momentum_max_abs_dev'] for r in result['table']):.1e} (momentum).",
        f"Environment: torch {result['environment']['torch']}, backends {result['environment']['backends']} "
        f"(1-Cycle ran on {next(r['implementation'] for r in result['table'] if r['arm'] == '1-Cycle')}; "
        "the other arms on torch.optim.SGD), "
        f"{result['environment']['threads']} thread(s); study time {result['seconds_total']}s.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(result: dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, run) in enumerate(result["runs"].items()):
        xs = run["samples"]
        cols = list(zip(*run["accuracy"]))  # per eval point, over seeds
        med, lo, hi = [], [], []
        for c in cols:
            vals = sorted(v for v in c if v is not None)
            if len(vals) * 2 <= len(c):  # most seeds blew up
                med.append(float("nan")); lo.append(float("nan")); hi.append(float("nan"))  # noqa: E702
                continue
            filled = vals + [0.0] * (len(c) - len(vals))
            med.append(float(torch.tensor(filled).median()))
            lo.append(min(filled)); hi.append(max(filled))  # noqa: E702
        style = "--" if run["batch"] == result["config"]["batch"] else "-"
        ax.plot(xs, med, style, color=f"C{i}", label=name, linewidth=2 if name == "1-Cycle" else 1.3)
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15, linewidth=0)
    for t in result["targets"]:
        ax.axhline(t, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training samples")
    ax.set_ylabel("test accuracy")
    # low enough to show a collapsed arm, high enough to separate the rest
    ax.set_ylim(0.5, 1.0)
    cfg = result["config"]
    ax.set_title(f"Test accuracy vs samples: batch {cfg['batch']} (dashed) and {cfg['batch'] * cfg['factor']} "
                 f"(median, band = range of {len(cfg['seeds'])} seeds)", fontsize=10)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_range(rt, schedule: OneCycle, path: str) -> None:
    """The range test's curve with the smoothed-loss minimum and the 1-Cycle
    bounds taken from it (the library's own plot marks only its suggestion)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(rt.smoothed)
    ax.plot(rt.lrs, rt.losses, color="0.75", linewidth=1, label="training loss")
    ax.plot(rt.lrs[:n], rt.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(rt.cycle_max_lr, color="C4", linestyle="--", label=f"smoothed-loss minimum, lr {rt.cycle_max_lr:.3g}")
    ax.axvline(schedule.cycle_max_lr, color="C3", linestyle="--", label=f"1-Cycle cycle_max_lr {schedule.cycle_max_lr:.3g}")
    ax.axvline(schedule.cycle_min_lr, color="C2", linestyle="--", label=f"1-Cycle cycle_min_lr {schedule.cycle_min_lr:.3g}")
    ax.set_xscale("log")
    finite = [v for v in rt.losses if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, rt.smoothed[0] * 1.2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test at the large batch (DeepSpeed LRRangeTest, FusedOneCycleSGD)", fontsize=10)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr(result: dict, arms: Sequence[Arm], path: str) -> None:
    plt = _plt()
    fig, (ax, axm) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    large = result["config"]["batch"] * result["config"]["factor"]
    for i, arm in enumerate(arms):
        if arm.batch != large:
            continue
        run = result["runs"][arm.name]
        steps = [i * run["record_every"] for i in range(len(run["lr"]))]
        z = 3 if arm.name == "1-Cycle" else 2  # on top of the other 1-Cycle arm (same momentum)
        ax.plot(steps, run["lr"], color=f"C{i}", label=arm.name, zorder=z)
        moms = [float("nan") if m is None else m for m in run["momentum"]]
        axm.plot(steps, moms, color=f"C{i}", zorder=z)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-3)  # cosine's last steps go to 0
    ax.set_ylabel("learning rate (measured)")
    ax.set_title(f"Learning rate and momentum each {large}-batch arm used, per step", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    axm.set_ylabel("momentum")
    axm.set_xlabel("optimizer step")
    axm.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shrunken study (CI): one seed, few steps")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/convergence; "
                   "with --quick a folder under the system temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1: the model is tiny)")
    args = p.parse_args(argv)
    cfg = quick_config() if args.quick else Config()
    if args.threads is not None:
        cfg.threads = args.threads
    # a quick run must not overwrite the committed results
    out = args.out or (os.path.join(tempfile.gettempdir(), "onecycle_convergence_quick") if args.quick else RESULTS_DIR)
    run_study(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
