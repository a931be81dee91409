"""Migration from torch.optim + a 1-Cycle scheduler: the fused optimizer,
loaded mid-run, continues the trajectory the original pair would have taken.

Oracles: torch.optim driven by DeepSpeed's own OneCycle (documented
differences accounted for: DeepSpeed cycles no SGD momentum and writes beta2 =
0.99), and torch.optim driven by torch's OneCycleLR up to the switch, then by
lr / beta1 values from our schedule's host evaluation.
"""
import copy

import pytest
import torch

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD, OneCycle
from onecycle_fused.migrate import load_torch_optimizer_state, schedule_position

ds_sched = pytest.importorskip("deepspeed.runtime.lr_schedules")

SCHEDULE = dict(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=6, cycle_second_step_size=4,
                cycle_first_stair_count=0, decay_step_size=3, decay_lr_rate=0.5,
                cycle_min_mom=0.8, cycle_max_mom=0.95)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(n)]


def _train(model, opt, batches, after_step=None):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


BEFORE, AFTER = 8, 12  # the switch is in the cycle; the continuation crosses into decay (T = 10)


def _deepspeed_run(make_opt, batches):
    """A torch optimizer driven by DeepSpeed's OneCycle: BEFORE steps, a
    checkpoint, AFTER more. Returns ((model, optimizer, scheduler) state
    dicts at the checkpoint, the final params, the optimizer)."""
    model = _model()
    opt = make_opt(model.parameters())
    sched = ds_sched.OneCycle(opt, **SCHEDULE)
    _train(model, opt, batches[:BEFORE], sched.step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    _train(model, opt, batches[BEFORE:], sched.step)
    return saved, _params(model), opt


@pytest.mark.parametrize("algo", ["adam", "adamw", "adamw_amsgrad"])
def test_deepspeed_onecycle_with_adam_continues_exactly(algo):
    torch_cls = torch.optim.Adam if algo == "adam" else torch.optim.AdamW
    fused_cls = FusedOneCycleAdam if algo == "adam" else FusedOneCycleAdamW
    amsgrad = algo.endswith("amsgrad")
    batches = _batches(BEFORE + AFTER)

    (saved_model, saved_opt, saved_sched), expected, opt = _deepspeed_run(
        lambda ps: torch_cls(ps, lr=1.0, weight_decay=0.05, amsgrad=amsgrad), batches)
    assert opt.param_groups[0]["betas"][1] == 0.99  # DeepSpeed overwrote beta2 (difference 3)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    fused = fused_cls(resumed.parameters(), **SCHEDULE, betas=(0.9, 0.999), weight_decay=0.0, backend="reference")
    k = load_torch_optimizer_state(fused, saved_opt, saved_sched)
    assert k == BEFORE == schedule_position(saved_sched)
    assert fused.step_counter().item() == BEFORE
    g = fused.param_groups[0]
    assert (g["betas"][1], g["weight_decay"], g["amsgrad"]) == (0.99, 0.05, amsgrad)  # carried over
    assert g["lr"] == pytest.approx(OneCycle(**SCHEDULE).lr(BEFORE))
    for p in resumed.parameters():
        assert fused.state[p]["step"].dtype == torch.int64 and fused.state[p]["step"].item() == BEFORE
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), expected)


def test_deepspeed_onecycle_with_sgd_continues_exactly():
    # DeepSpeed leaves SGD's momentum alone (difference 2): the fused SGD
    # reproduces that pair with cycle_momentum=False and the same momentum
    batches = _batches(BEFORE + AFTER)
    (saved_model, saved_opt, saved_sched), expected, _ = _deepspeed_run(
        lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-3), batches)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    fused = FusedOneCycleSGD(resumed.parameters(), **{**SCHEDULE, "cycle_momentum": False}, momentum=0.9,
                             backend="reference")
    load_torch_optimizer_state(fused, saved_opt, saved_sched)
    assert fused.param_groups[0]["nesterov"] and fused.param_groups[0]["weight_decay"] == 1e-3
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), expected)


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_torch_onecyclelr_position_and_state(algo):
    """From torch's OneCycleLR only the position and the optimizer state carry
    over; from the switch on, the oracle follows our schedule's values."""
    batches = _batches(BEFORE + AFTER)
    model = _model()
    if algo == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40)
    _train(model, opt, batches[:BEFORE], sched.step)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert schedule_position(sched) == BEFORE

    ours = OneCycle(**SCHEDULE)
    taken = [BEFORE]

    def set_values():  # the oracle: torch.optim with our schedule's values from the switch on
        for group in opt.param_groups:
            group["lr"] = ours.lr(taken[0])
            if algo == "sgd":
                group["momentum"] = ours.momentum(taken[0])
            else:
                group["betas"] = (ours.momentum(taken[0]), group["betas"][1])

    def after_step():
        taken[0] += 1
        set_values()

    set_values()
    _train(model, opt, batches[BEFORE:], after_step)
    expected = _params(model)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    cls = FusedOneCycleSGD if algo == "sgd" else FusedOneCycleAdamW
    fused = cls(resumed.parameters(), **SCHEDULE, backend="reference")
    assert load_torch_optimizer_state(fused, saved_opt, sched.state_dict()) == BEFORE
    key = "momentum_buffer" if algo == "sgd" else "exp_avg"
    for p_old, p_new in zip(model.parameters(), resumed.parameters()):
        assert fused.state[p_new][key].shape == p_new.shape
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), expected)


def test_fresh_torch_state_and_step_argument():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # never stepped: no buffers
    fused = FusedOneCycleSGD(model.parameters(), **SCHEDULE, backend="reference")
    assert load_torch_optimizer_state(fused, opt.state_dict(), step=3) == 3
    assert fused.step_counter().item() == 3 and len(fused.state) == 0
    # Adam without a scheduler: the position is the parameters' step count
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, _batches(2))
    fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
    assert load_torch_optimizer_state(fused, adam.state_dict()) == 2


def test_scheduler_behind_the_adam_steps_warns():
    """A torch scheduler stepped per epoch counts epochs, not optimizer steps:
    taking its last_epoch as the position would restart the schedule."""
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(adam, step_size=10)
    for _ in range(2):  # two epochs of three steps
        _train(model, adam, _batches(3))
        sched.step()
    fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
    with pytest.warns(UserWarning, match="says 2 optimizer steps were taken, but the Adam state has taken 6"):
        assert load_torch_optimizer_state(fused, adam.state_dict(), sched) == 2
    # step= is the way out, and a scheduler stepped per batch says nothing
    fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
    assert load_torch_optimizer_state(fused, adam.state_dict(), step=6) == 6
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
        assert load_torch_optimizer_state(fused, adam.state_dict(), {"last_epoch": 6}) == 6


def test_mismatches_raise():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, _batches(1))
    adam = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="betas"):
        load_torch_optimizer_state(adam, sgd.state_dict())
    fused = FusedOneCycleSGD(list(model.parameters())[:2], **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="parameters"):
        load_torch_optimizer_state(fused, sgd.state_dict())
    fused = FusedOneCycleSGD(model.parameters(), **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="scheduler or step"):
        load_torch_optimizer_state(fused, sgd.state_dict(), {"last_epoch": 1}, step=1)
    with pytest.raises(ValueError, match="last_epoch"):
        load_torch_optimizer_state(fused, sgd.state_dict(), {"nothing": 1})
    with pytest.raises(ValueError, match="load_state_dict"):
        load_torch_optimizer_state(fused, fused.state_dict())
    # the same number of parameters, in another order: the shapes tell
    swapped = [list(model.parameters())[i] for i in (1, 0, 2, 3)]
    for fused in (FusedOneCycleSGD(swapped, **SCHEDULE, backend="reference"),
                  FusedOneCycleAdam(swapped, **SCHEDULE, backend="reference")):
        torch_opt = sgd if isinstance(fused, FusedOneCycleSGD) else torch.optim.Adam(model.parameters())
        if torch_opt is not sgd:
            _train(model, torch_opt, _batches(1))
        with pytest.raises(ValueError, match="shape"):
            load_torch_optimizer_state(fused, torch_opt.state_dict())
        assert len(fused.state) == 0 and fused.step_counter().item() == 0
    plain = FusedOneCycleSGD(model.parameters(), **{**SCHEDULE, "cycle_momentum": False}, backend="reference")
    with pytest.raises(ValueError, match="no momentum"):  # its own momentum 0 kept
        load_torch_optimizer_state(plain, sgd.state_dict(), copy_hyperparameters=False)
    assert len(plain.state) == 0 and plain.param_groups[0]["momentum"] == 0
    load_torch_optimizer_state(plain, sgd.state_dict())  # torch's momentum 0.9 carried over
    assert plain.param_groups[0]["momentum"] == 0.9 and len(plain.state) == 4


def test_positions_of_any_integer_type():
    """step= takes any integer (numpy, a one-element tensor), as set_step does;
    a scheduler position stored as an integral float (e.g. a state that went
    through JSON) is that integer; anything else is a ValueError naming it
    (a float used to be truncated: 2.5 -> step 3)."""
    np = pytest.importorskip("numpy")
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, _batches(2))
    for step in (np.int64(3), np.int32(3), torch.tensor(3)):
        fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
        assert load_torch_optimizer_state(fused, opt.state_dict(), step=step) == 3
        assert type(load_torch_optimizer_state(fused, opt.state_dict(), step=step)) is int
        assert fused.step_counter().item() == 3 and fused.param_groups[0]["lr"] == OneCycle(**SCHEDULE).lr(3)
    for bad in (3.0, True, -1, "3"):
        with pytest.raises(ValueError, match="step"):
            load_torch_optimizer_state(fused, opt.state_dict(), step=bad)

    assert schedule_position({"last_batch_iteration": 4.0}) == 5
    assert schedule_position({"last_batch_iteration": np.int64(4)}) == 5
    assert schedule_position({"last_epoch": 7.0}) == 7
    assert schedule_position({"last_epoch": torch.tensor(7)}) == 7
    for bad in (2.5, float("nan"), float("inf"), "4", None, True):
        with pytest.raises(ValueError, match="last_batch_iteration"):
            schedule_position({"last_batch_iteration": bad})
    with pytest.raises(ValueError, match="last_epoch"):
        schedule_position({"last_epoch": 6.5})
    fused = FusedOneCycleAdam(model.parameters(), **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="last_batch_iteration"):
        load_torch_optimizer_state(fused, opt.state_dict(), {"last_batch_iteration": 2.5})
    assert fused.step_counter().item() == 0  # nothing loaded


@pytest.mark.parametrize("torch_kind,fused_cls,ok", [
    ("adamw", FusedOneCycleAdamW, True),
    ("adam_decoupled", FusedOneCycleAdamW, True),  # torch.optim.Adam(decoupled_weight_decay=True) is AdamW
    ("adam_decoupled", "adam_decoupled", True),  # and so is ours
    ("adamw", "adam_decoupled", True),
    ("adam_decoupled", FusedOneCycleAdam, False),
    ("adam", FusedOneCycleAdam, True),
    ("adamw", FusedOneCycleAdam, False),  # L2 instead of decoupled decay: another trajectory
    ("adam", FusedOneCycleAdamW, False),
])
def test_weight_decay_kind_must_match(torch_kind, fused_cls, ok):
    """Adam's L2 and AdamW's decoupled weight decay give different steps with
    the same weight_decay; the state says which (torch's
    decoupled_weight_decay), so a mismatch is refused instead of silently
    continuing another trajectory. A matching pair continues exactly (the
    oracle: torch with DeepSpeed's OneCycle)."""
    if torch_kind == "adamw":
        make = lambda ps: torch.optim.AdamW(ps, lr=1.0, weight_decay=0.1)
    else:
        try:
            make = lambda ps: torch.optim.Adam(ps, lr=1.0, weight_decay=0.1,
                                               decoupled_weight_decay=torch_kind == "adam_decoupled")
            make([torch.nn.Parameter(torch.zeros(1))])
        except TypeError:
            pytest.skip("this torch's Adam has no decoupled_weight_decay")
    batches = _batches(BEFORE + AFTER)
    (saved_model, saved_opt, saved_sched), expected, _ = _deepspeed_run(make, batches)
    if "decoupled_weight_decay" not in saved_opt["param_groups"][0]:
        pytest.skip("this torch does not record decoupled_weight_decay")

    resumed = _model()
    resumed.load_state_dict(saved_model)
    if fused_cls == "adam_decoupled":
        fused = FusedOneCycleAdam(resumed.parameters(), **SCHEDULE, backend="reference", decoupled_weight_decay=True)
    else:
        fused = fused_cls(resumed.parameters(), **SCHEDULE, backend="reference")
    if not ok:
        with pytest.raises(ValueError, match="decoupled_weight_decay"):
            load_torch_optimizer_state(fused, saved_opt, saved_sched)
        assert fused.step_counter().item() == 0 and len(fused.state) == 0  # nothing loaded
        # keeping the fused optimizer's own hyper-parameters is the user's call
        load_torch_optimizer_state(fused, saved_opt, saved_sched, copy_hyperparameters=False)
        return
    load_torch_optimizer_state(fused, saved_opt, saved_sched)
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), expected)


def test_tensor_betas_continue_and_bad_hyperparameters_raise_at_load():
    """torch.optim.Adam takes tensor betas; the loaded beta2 is its number, so
    the continuation runs (it used to fail at the next step). A copied value
    the fused optimizer refuses is a ValueError at the load, nothing changed
    (it used to load and fail at the next step)."""
    from onecycle_fused import TorchOneCycle
    torch_one_cycle = dict(max_lr=0.05, total_steps=30, pct_start=0.25)
    batches = _batches(BEFORE + AFTER)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.99)),
                           foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **torch_one_cycle)
    _train(model, opt, batches[:BEFORE], sched.step)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    saved_sched = sched.state_dict()
    _train(model, opt, batches[BEFORE:], sched.step)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    fused = FusedOneCycleAdam(resumed.parameters(), schedule=TorchOneCycle(**torch_one_cycle), backend="reference")
    load_torch_optimizer_state(fused, saved_opt, saved_sched)
    assert fused.param_groups[0]["betas"][1] == pytest.approx(0.99)
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), _params(model))

    for key, bad in (("betas", (0.9, 1.5)), ("weight_decay", -1.0), ("eps", float("nan"))):
        edited = copy.deepcopy(saved_opt)
        edited["param_groups"][0][key] = bad
        fused = FusedOneCycleAdam(resumed.parameters(), schedule=TorchOneCycle(**torch_one_cycle), backend="reference")
        with pytest.raises(ValueError, match=r"param_groups\[0\].*" + key.split("s[")[0]):
            load_torch_optimizer_state(fused, edited, saved_sched)
        assert fused.step_counter().item() == 0 and len(fused.state) == 0
        assert fused.param_groups[0]["betas"][1] == 0.999 and fused.param_groups[0]["weight_decay"] == 0.0
    sgd = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    _train(resumed, sgd, batches[:1])
    edited = sgd.state_dict()
    edited["param_groups"][0].update(nesterov=True, dampening=0.5)  # torch refuses it at construction only
    fused = FusedOneCycleSGD(resumed.parameters(), **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="nesterov"):
        load_torch_optimizer_state(fused, edited, step=1)
    assert fused.step_counter().item() == 0 and len(fused.state) == 0


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_constant_momentum_is_carried_over_when_the_schedule_does_not_cycle_it(algo):
    """DeepSpeed's LRRangeTest schedules no momentum: torch's momentum / beta1
    is a constant hyper-parameter of the update, carried over like beta2
    (it was not: the fused optimizer's own default continued another run)."""
    from onecycle_fused import LRRangeTest
    range_test = dict(lr_range_test_min_lr=1e-3, lr_range_test_step_size=3, lr_range_test_step_rate=0.5,
                      lr_range_test_staircase=True)
    batches = _batches(BEFORE + AFTER)
    if algo == "sgd":
        make, fused_cls = (lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.7)), FusedOneCycleSGD
    else:
        make, fused_cls = (lambda ps: torch.optim.Adam(ps, lr=1.0, betas=(0.6, 0.98))), FusedOneCycleAdam
    model = _model()
    opt = make(model.parameters())
    sched = ds_sched.LRRangeTest(opt, **range_test)
    _train(model, opt, batches[:BEFORE], sched.step)
    saved_model, saved_opt, saved_sched = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    _train(model, opt, batches[BEFORE:], sched.step)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    fused = fused_cls(resumed.parameters(), schedule=LRRangeTest(**range_test), backend="reference")
    assert load_torch_optimizer_state(fused, saved_opt, saved_sched) == BEFORE
    _train(resumed, fused, batches[BEFORE:])
    _assert_same(_params(resumed), _params(model))
    assert fused.get_last_lr() == sched.get_last_lr()
    if algo == "sgd":
        assert fused.param_groups[0]["momentum"] == 0.7
        assert all(torch.equal(a, b) for a, b in zip(_params(resumed), _params(model)))  # SGD: bit for bit
    else:
        assert fused.param_groups[0]["betas"] == (0.6, 0.98)
    # copy_hyperparameters=False keeps the fused optimizer's own
    fused = fused_cls(resumed.parameters(), schedule=LRRangeTest(**range_test), backend="reference",
                      **({"momentum": 0.9} if algo == "sgd" else {"betas": (0.9, 0.999)}))
    load_torch_optimizer_state(fused, saved_opt, saved_sched, copy_hyperparameters=False)
    g = fused.param_groups[0]
    assert (g["momentum"] == 0.9) if algo == "sgd" else (g["betas"] == (0.9, 0.999))


def test_named_groups_in_another_order_raise():
    """torch >= 2.6 saves param_names for a group built from named_parameters().
    The same names in another order are other parameters at each position:
    a ValueError, even where the shapes agree (they used to load silently,
    each parameter getting another one's momentum), nothing changed. Other
    names (e.g. a DDP 'module.' prefix) are not compared."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    if "param_names" not in sgd.state_dict()["param_groups"][0]:
        pytest.skip("this torch does not save param_names")
    x = torch.randn(3, 4)
    model(x).sum().backward()
    sgd.step()
    named = list(model.named_parameters())
    swapped = [named[i] for i in (2, 1, 0, 3)]  # 0.weight <-> 1.weight: both 4x4
    fused = FusedOneCycleSGD(swapped, **SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="1.weight"):
        load_torch_optimizer_state(fused, sgd.state_dict(), step=1)
    assert len(fused.state) == 0 and fused.step_counter().item() == 0
    prefixed = [("module." + n, p) for n, p in named]
    fused = FusedOneCycleSGD(prefixed, **SCHEDULE, backend="reference")
    load_torch_optimizer_state(fused, sgd.state_dict(), step=1)
    for (_, p), q in zip(named, model.parameters()):
        assert torch.equal(fused.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


@pytest.mark.parametrize("copy_hyperparameters", [True, False])
def test_a_bad_schedule_edited_into_the_group_names_the_group(copy_hyperparameters):
    """load_torch_optimizer_state asks the schedule of each group: a bad one
    edited into param_groups[i]['schedule'] is refused naming that group, as
    step() names it, not "the group" (the state_dict copy it was asked of)."""
    model = _model()
    ref = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = FusedOneCycleAdam(model.parameters(), **SCHEDULE)
    opt.param_groups[0]["schedule"]["params"]["cycle_min_lr"] = -1.0
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['schedule'\]: cycle_min_lr"):
        load_torch_optimizer_state(opt, ref.state_dict(), step=0, copy_hyperparameters=copy_hyperparameters)
    opt.param_groups[0]["schedule"] = OneCycle(**SCHEDULE)  # an object, not its config
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['schedule'\] must be .* edit param_groups\[0\]"):
        load_torch_optimizer_state(opt, ref.state_dict(), step=0, copy_hyperparameters=copy_hyperparameters)
