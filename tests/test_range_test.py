"""LR range test: losses against torch.optim driven by DeepSpeed's own
LRRangeTest, the suggestion rule on known curves, divergence stop, plot."""
import copy
import math
import random

import pytest
import torch

from onecycle_fused.range_test import lr_range_test, smooth_losses, suggest_lr_bounds, toy_problem


def _oracle_losses(model, loss_fn, data, min_lr, max_lr, num_steps, opt_cls, **opt_kwargs):
    """torch.optim + deepspeed.runtime.lr_schedules.LRRangeTest, stepped as
    DeepSpeed documents it (optimizer.step(); scheduler.step())."""
    LRRangeTest = pytest.importorskip("deepspeed.runtime.lr_schedules").LRRangeTest

    opt = opt_cls(model.parameters(), lr=min_lr, **opt_kwargs)
    sched = LRRangeTest(opt, lr_range_test_min_lr=min_lr, lr_range_test_step_size=1,
                        lr_range_test_step_rate=(max_lr / min_lr - 1) / (num_steps - 1))
    losses, lrs = [], []
    for i in range(num_steps):
        batch = data[i % len(data)]
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name,opt_cls,kwargs", [
    ("sgd", torch.optim.SGD, {"momentum": 0.9}),
    ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.999), "weight_decay": 0.01}),
])
def test_losses_match_torch_with_deepspeed_schedule(name, opt_cls, kwargs, device):
    model, loss_fn, data = toy_problem(seed=1, num_batches=4)
    model = model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    min_lr, max_lr, n = 1e-3, 0.5 if name == "sgd" else 0.05, 25
    res = lr_range_test(model, loss_fn, data, min_lr=min_lr, max_lr=max_lr, num_steps=n,
                        optimizer=name, optimizer_kwargs=kwargs, check_every=7)
    lrs, losses = _oracle_losses(twin, loss_fn, data, min_lr, max_lr, n, opt_cls, **kwargs)
    assert not res.diverged and res.steps_run == n
    torch.testing.assert_close(torch.tensor(res.lrs, dtype=torch.float64), torch.tensor(lrs, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert math.isclose(res.lrs[-1], max_lr, rel_tol=1e-12)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # restore=True puts the model back as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("num_steps, check_every", [(20, 20), (40, 40), (40, 10)])
def test_losses_are_read_to_the_host_only_at_checks(num_steps, check_every):
    """Issue 6: losses accumulate on the device, no host read per step. Every
    read of a tensor to Python (tolist, item, float, bool...) during the test
    is counted: one per divergence check and one at the end, however many
    steps ran."""
    from torch.overrides import TorchFunctionMode

    names = {"tolist", "item", "__float__", "__int__", "__bool__", "__index__", "numpy"}

    class Reads(TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in names:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model, loss_fn, data = toy_problem(seed=0, num_batches=4)
    with Reads():
        res = lr_range_test(model, loss_fn, data, min_lr=1e-4, max_lr=1e-2, num_steps=num_steps,
                            check_every=check_every)
    assert res.steps_run == num_steps and not res.diverged
    assert len(Reads.seen) == num_steps // check_every + 1, Reads.seen


def test_suggestion_rule_on_known_curve():
    # loss falls until lr = 0.3 (index 30), then rises steeply
    lrs = [0.01 * (i + 1) for i in range(60)]
    losses = [2.0 - 0.05 * i if i <= 30 else 0.5 + 0.4 * (i - 30) for i in range(60)]
    lo, hi, smoothed = suggest_lr_bounds(lrs, losses, beta=0.0)  # no smoothing: the raw minimum
    assert hi == pytest.approx(0.31) and lo == pytest.approx(0.31 / 4)
    assert smoothed == pytest.approx(losses)
    # smoothing delays the minimum by a few steps, never before the raw one
    _, hi_s, _ = suggest_lr_bounds(lrs, losses, beta=0.6, min_lr_divisor=3)
    assert 0.31 <= hi_s <= 0.36
    # a non-finite loss ends the usable curve
    lo, hi, smoothed = suggest_lr_bounds([1, 2, 3, 4], [3.0, 2.0, float("nan"), 0.1], beta=0.0)
    assert (lo, hi, len(smoothed)) == (0.5, 2.0, 2)


def test_smoothing_is_bias_corrected_ema():
    vals = [4.0, 2.0, 1.0]
    beta = 0.5
    avg, expect = 0.0, []
    for i, v in enumerate(vals):
        avg = beta * avg + (1 - beta) * v
        expect.append(avg / (1 - beta ** (i + 1)))
    assert smooth_losses(vals, beta) == pytest.approx(expect)
    assert smooth_losses([3.0], 0.98) == pytest.approx([3.0])  # the first value is unbiased


def test_stops_on_divergence_and_writes_png(tmp_path):
    model, loss_fn, data = toy_problem(seed=0, num_batches=4)
    out = tmp_path / "rt.png"
    res = lr_range_test(model, loss_fn, data, min_lr=1e-2, max_lr=1e4, num_steps=200,
                        check_every=5, plot=str(out))
    assert res.diverged
    assert res.steps_run < 200 and res.steps_run % 5 == 0
    assert res.cycle_max_lr < res.lrs[-1] and res.cycle_min_lr == pytest.approx(res.cycle_max_lr / 4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sched = res.one_cycle(cycle_first_step_size=10)
    assert sched.lr(0) == res.cycle_min_lr and sched.lr(10) == res.cycle_max_lr


@pytest.mark.parametrize("bad,match", [
    ({"min_lr": 0.0}, "min_lr"),
    ({"max_lr": 1e-6}, "max_lr"),
    ({"num_steps": 1}, "num_steps"),
    ({"optimizer": "lamb"}, "optimizer"),
    ({"check_every": 0}, "check_every"),
    ({"diverge_factor": 1.0}, "diverge_factor"),
    # bools are not numbers here (True would silently be 1.0), as elsewhere
    ({"min_lr": True}, "min_lr"),
    ({"min_lr": 1e-3, "max_lr": True}, "max_lr"),
    ({"diverge_factor": True}, "diverge_factor"),
    ({"beta": 1.0}, "beta"),
    ({"beta": True}, "beta"),
    ({"beta": -0.5}, "beta"),
    ({"min_lr_divisor": True}, "min_lr_divisor"),
    ({"staircase": 1}, "staircase"),
    ({"optimizer": ["sgd"]}, "optimizer"),
    ({"optimizer_kwargs": {"backend": "cpu"}}, "optimizer_kwargs"),
    ({"optimizer_kwargs": {"schedule": {}}}, "optimizer_kwargs"),
])
def test_bad_arguments_name_the_parameter(bad, match):
    model, loss_fn, data = toy_problem(num_batches=1)
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return loss_fn(m, batch)

    with pytest.raises(ValueError, match=match):
        lr_range_test(model, counting_loss, data, **bad)
    assert calls == []  # refused before the first step (beta used to fail at the first check)


def test_max_lr_divisor_scales_both_bounds():
    """max_lr_divisor divides the peak found at the smoothed-loss minimum, and
    cycle_min_lr follows it; bad divisors are refused before anything runs."""
    lrs = [0.01 * (i + 1) for i in range(50)]
    losses = [(lr - 0.3) ** 2 for lr in lrs]  # minimum at lr 0.3
    lo1, hi1, _ = suggest_lr_bounds(lrs, losses, beta=0.0)
    lo10, hi10, _ = suggest_lr_bounds(lrs, losses, beta=0.0, max_lr_divisor=10)
    assert hi1 == pytest.approx(0.3) and hi10 == pytest.approx(0.03)
    assert lo1 == pytest.approx(0.3 / 4) and lo10 == pytest.approx(0.03 / 4)
    for bad in (0.5, 0, float("inf"), True, "10"):
        with pytest.raises(ValueError, match="max_lr_divisor"):
            suggest_lr_bounds(lrs, losses, max_lr_divisor=bad)
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_lr_divisor"):
        lr_range_test(model, lambda m, b: m(b).sum(), [torch.ones(1, 2)], max_lr_divisor=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_staircase_holds_the_lr_for_step_size_steps_like_deepspeed():
    """staircase=True used to do nothing: the schedule's step size was fixed
    at 1, where DeepSpeed's floor(k / 1) is k. With step_size the lr is held
    flat for step_size steps (DeepSpeed's lr_range_test_step_size /
    _staircase) and the last stair, the one holding step num_steps - 1, is
    max_lr."""
    from deepspeed.runtime.lr_schedules import LRRangeTest as DSRangeTest

    model, loss_fn, data = toy_problem(seed=2, num_batches=2)
    min_lr, max_lr, n, size = 1e-3, 0.1, 23, 5
    res = lr_range_test(model, loss_fn, data, min_lr=min_lr, max_lr=max_lr, num_steps=n,
                        staircase=True, step_size=size, check_every=n)
    assert res.steps_run == n
    # DeepSpeed's own schedule, driven as optimizer.step(); scheduler.step()
    rate = (max_lr / min_lr - 1) / ((n - 1) // size)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ds = DSRangeTest(opt, lr_range_test_min_lr=min_lr, lr_range_test_step_size=size,
                     lr_range_test_step_rate=rate, lr_range_test_staircase=True)
    want = []
    for _ in range(n):
        want.append(opt.param_groups[0]["lr"])
        ds.step()
    assert res.lrs == want
    assert len(set(res.lrs)) == (n - 1) // size + 1  # flat stairs of `size` steps
    assert res.lrs[0] == min_lr and math.isclose(res.lrs[-1], max_lr, rel_tol=1e-12)
    # without staircase the step size does not change the (linear) curve
    model, loss_fn, data = toy_problem(seed=2, num_batches=2)
    smooth = lr_range_test(model, loss_fn, data, min_lr=min_lr, max_lr=max_lr, num_steps=n, step_size=size,
                           check_every=n)
    assert len(set(smooth.lrs)) == n and math.isclose(smooth.lrs[-1], max_lr, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 23])
def test_bad_step_size_names_it(bad):
    model, loss_fn, data = toy_problem(num_batches=1)
    with pytest.raises(ValueError, match="step_size"):
        lr_range_test(model, loss_fn, data, num_steps=23, staircase=True, step_size=bad)


def test_bad_plot_path_fails_before_training(tmp_path):
    """A plot path that cannot be written is a ValueError before the first
    step (it used to surface only after the whole test had run)."""
    model, loss_fn, data = toy_problem(num_batches=1)
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return loss_fn(m, batch)

    for bad, match in ((tmp_path / "missing" / "rt.png", "missing"), (tmp_path / "rt.pnx", "pnx"), (tmp_path, "directory")):
        with pytest.raises(ValueError, match=match):
            lr_range_test(model, counting_loss, data, num_steps=5, plot=str(bad))
    assert calls == []
    result = lr_range_test(model, counting_loss, data, num_steps=5, plot=str(tmp_path / "rt"))
    assert result.plot_path == str(tmp_path / "rt") and (tmp_path / "rt").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("which, bad, match", [
    ("model", "a model", "model must be a torch.nn.Module"),
    ("loss_fn", 0.5, "loss_fn must be a callable"),
    ("data", 5, "data must be an iterable of batches"),
    ("plot", 123, "plot must be a file path"),
])
def test_arguments_of_the_wrong_kind_name_themselves(which, bad, match):
    """A model that is no Module, data that is no iterable, a plot that is
    no path: a ValueError naming the argument before any step (they were an
    AttributeError, "'int' object is not iterable", os.fspath's TypeError)."""
    model, loss_fn, data = toy_problem(num_batches=1)
    args = {"model": model, "loss_fn": loss_fn, "data": data}
    kwargs = {"plot": bad} if which == "plot" else {}
    if which != "plot":
        args[which] = bad
    with pytest.raises(ValueError, match=match):
        lr_range_test(args["model"], args["loss_fn"], args["data"], num_steps=5, **kwargs)


def test_restore_puts_back_modes_and_grads():
    """restore=True leaves the model as it was: weights and buffers, but also
    eval mode (the test trains in train mode) and the grads it had."""
    model, loss_fn, data = toy_problem(num_batches=1)
    model = torch.nn.Sequential(model, torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.1))
    model.eval()
    model[1].train()  # a mixed state comes back as it was, module by module
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_range_test(model, loss_fn, data, num_steps=4)
    assert [m.training for m in model.modules()] == [False, False, False, False, False, True, False]
    assert torch.equal(first.grad, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="restore"):
        lr_range_test(model, loss_fn, data, num_steps=4, restore="yes")


def test_numpy_scalars_are_numbers():
    """numpy scalars (a grid from np.logspace, a count from np.int64) are
    accepted like Python numbers, with the same curve."""
    np = pytest.importorskip("numpy")
    model, loss_fn, data = toy_problem(num_batches=1)
    plain = lr_range_test(model, loss_fn, data, min_lr=1e-3, max_lr=0.5, num_steps=6, step_size=2, staircase=True)
    numpy = lr_range_test(model, loss_fn, data, min_lr=np.float64(1e-3), max_lr=np.float32(0.5),
                          num_steps=np.int64(6), step_size=np.int32(2), check_every=np.int64(3), staircase=True)
    assert numpy.lrs == pytest.approx(plain.lrs, rel=1e-7) and numpy.losses == pytest.approx(plain.losses, rel=1e-5)
    assert all(type(v) is float for v in numpy.lrs)


def test_negative_losses_are_not_divergence():
    """The divergence rule is a ratio to the smoothed minimum: with a loss that
    goes below 0 (a negative log-likelihood) `smoothed > 4 * min` held for
    any curve, so the test stopped at the first check on a flat loss."""
    model = torch.nn.Linear(2, 1)
    for level in (-1.0, -1e-3):
        res = lr_range_test(model, lambda m, b: m(b).sum() * 0 + level, [torch.ones(1, 2)],
                            num_steps=30, check_every=5)
        assert not res.diverged and res.steps_run == 30
    # a positive curve that rises past 4x its minimum still stops at the next check
    vals = iter([1.0] * 10 + [100.0] * 100)
    res = lr_range_test(model, lambda m, b: m(b).sum() * 0 + next(vals), [torch.ones(1, 2)],
                        num_steps=60, check_every=5, beta=0.0)
    assert res.diverged and res.steps_run == 15


@pytest.mark.parametrize("seed", range(7))
def test_stop_step_is_the_whole_history_rule(seed):
    """The divergence check is kept running (each check reads only the new
    losses): it stops at the same step as the rule applied to the whole
    smoothed history at every check, on rising, falling, mixed-sign and
    non-finite curves, and one whose minimum falls between two checks."""
    rng = random.Random(seed)
    n, every, beta, factor = 60, rng.choice([1, 3, 7]), rng.choice([0.0, 0.5, 0.98]), rng.choice([1.5, 4.0])
    base = rng.choice([0.0, -0.5, 1.0])
    vals = [base + rng.uniform(0.01, 1.0) * math.exp(rng.uniform(0, 4) * i / n) for i in range(n)]
    if seed == 5:
        vals[33] = math.inf
    if seed == 6:  # a dip at step 4, unseen by a rule that looked at the checks' values only
        every, beta, factor = 7, 0.0, 1.5
        vals = [5.0, 5.0, 5.0, 1.0] + [5.0] * 3 + [3.0] * (n - 7)
    expect, expect_diverged = n, False
    for k in sorted(set(range(every, n, every)) | {n}):  # the checks: every `every` steps, and the last
        prefix = vals[:k]
        smoothed = smooth_losses(prefix, beta) if all(map(math.isfinite, prefix)) else None
        if smoothed is None or (min(smoothed) > 0 and smoothed[-1] > factor * min(smoothed)):
            expect, expect_diverged = k, True
            break
    model = torch.nn.Linear(2, 1)
    it = iter(vals)
    res = lr_range_test(model, lambda m, b: m(b).sum() * 0 + next(it), [torch.ones(1, 2)], num_steps=n,
                        check_every=every, beta=beta, diverge_factor=factor)
    assert (res.steps_run, res.diverged) == (expect, expect_diverged)
    assert res.losses == pytest.approx(vals[:expect], nan_ok=True)


def test_checks_read_each_loss_once():
    """Each divergence check reads the losses since the previous one: a test
    of n steps reads ~2n floats (the checks, then the result), where
    re-reading the whole history at every check read ~n^2 / 2."""
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        floats = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", None) == "tolist":
                Reads.floats += len(out)
            return out

    model, loss_fn, data = toy_problem(seed=0, num_batches=4)
    with Reads():
        res = lr_range_test(model, loss_fn, data, min_lr=1e-4, max_lr=1e-2, num_steps=40, check_every=1)
    assert res.steps_run == 40 and Reads.floats == 2 * 40


def test_a_loss_without_grad_is_a_value_error():
    """A loss_fn that detaches its loss (or computes it under no_grad) failed
    in autograd, naming no argument; the model is left as it was."""
    model, loss_fn, data = toy_problem(seed=0, num_batches=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="loss_fn returned a loss that does not require grad"):
        lr_range_test(model, lambda m, b: loss_fn(m, b).detach(), data, num_steps=10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_shot_iterator_that_runs_out_names_the_problem():
    """A generator shorter than num_steps cannot be started again; the error
    used to say "data yielded no batch" although it had yielded 3."""
    model, loss_fn, data = toy_problem(num_batches=3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        lr_range_test(model, loss_fn, (b for b in data), num_steps=10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    res = lr_range_test(model, loss_fn, (b for b in data), num_steps=3)  # exactly enough
    assert res.steps_run == 3
    res = lr_range_test(model, loss_fn, data, num_steps=10)  # a list is started again
    assert res.steps_run == 10
    with pytest.raises(ValueError, match="no batch"):
        lr_range_test(model, loss_fn, [], num_steps=10)


def test_restore_covers_non_persistent_and_replaced_buffers():
    """state_dict leaves out non-persistent buffers; a forward that updates
    one, in place or by replacing it, is put back too."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 3)
            self.register_buffer("seen", torch.zeros(()), persistent=False)
            self.register_buffer("total", torch.zeros(()), persistent=False)

        def forward(self, x):
            self.seen += 1  # in place
            self.total = self.total + x.shape[0]  # a new tensor
            return self.lin(x)

    _, loss_fn, data = toy_problem(num_batches=2)
    model = Counting()
    seen, total = model.seen, model.total
    lr_range_test(model, loss_fn, data, num_steps=5)
    assert model.seen is seen and model.total is total
    assert model.seen.item() == 0 and model.total.item() == 0
    lr_range_test(model, loss_fn, data, num_steps=5, restore=False)
    assert model.seen.item() == 5 and model.total.item() == 5 * 64


def test_restore_puts_back_buffer_slots_a_forward_filled_or_added():
    """A buffer registered as None (a lazily built cache) that the forward
    fills, or one the forward registers, is put back as it was: the restore
    used to end in load_state_dict's "Missing key(s)" RuntimeError, losing
    the result."""

    class Caching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 3)
            self.register_buffer("cache", None)

        def forward(self, x):
            self.cache = x.detach().mean(0)
            if not hasattr(self, "added"):
                self.register_buffer("added", torch.ones(1))
                self.register_buffer("added_np", torch.ones(1), persistent=False)
            return self.lin(x)

    _, loss_fn, data = toy_problem(num_batches=2)
    model = Caching()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = lr_range_test(model, loss_fn, data, num_steps=4)
    assert res.steps_run == 4
    assert model.cache is None and not hasattr(model, "added") and not hasattr(model, "added_np")
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_optimizer_kwargs_and_one_cycle_bounds_are_value_errors():
    """optimizer_kwargs that is not a dict, sets lr, or names no argument of
    the optimizer, and a bound passed to one_cycle(), were TypeErrors (from
    dict(), the constructor, Python's duplicate keyword); now ValueErrors
    naming them, before any step."""
    model, loss_fn, data = toy_problem(num_batches=1)
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return loss_fn(m, batch)

    for kwargs, match in (([("momentum", 0.9)], "optimizer_kwargs"), ({"lr": 0.1}, "lr"),
                          ({"params": []}, "params"), ({"betas": (0.9, 0.99)}, "betas")):
        with pytest.raises(ValueError, match=match):
            lr_range_test(model, counting_loss, data, num_steps=4, optimizer_kwargs=kwargs)
    assert calls == []
    res = lr_range_test(model, loss_fn, data, num_steps=4, optimizer="adam",
                        optimizer_kwargs={"betas": (0.9, 0.99), "amsgrad": True})
    assert res.steps_run == 4
    for bound in ("cycle_min_lr", "cycle_max_lr"):
        with pytest.raises(ValueError, match=bound):
            res.one_cycle(**{bound: 1e-3})
    assert res.one_cycle(cycle_first_step_size=10).cycle_max_lr == res.cycle_max_lr
