"""torch.distributed.checkpoint's state_dict API (``get_state_dict`` /
``set_state_dict``), the usual checkpoint route for FSDP2 (torchtitan, ...).

It keeps only ``"state"`` and ``"param_groups"`` of the optimizer's state_dict
(the top-level ``step_counter`` is dropped), and on a fresh optimizer it calls
``step()`` with zero grads and every ``"lr"`` set to 0 to make the state it
loads into. The API works without a process group, so one process checks it.
"""
import copy
import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from onecycle_fused import FusedOneCycleAdamW, FusedOneCycleSGD

OPTIONS = {
    "default": StateDictOptions(),
    "flatten": StateDictOptions(flatten_optimizer_state_dict=True),  # torchtitan's choice
    "full": StateDictOptions(full_state_dict=True),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _opt(cls, model):
    ps = list(model.parameters())
    kw = dict(cycle_min_lr=1e-2, cycle_max_lr=1e-1, cycle_first_step_size=3, weight_decay=0.1)
    if cls is FusedOneCycleSGD:
        kw["nesterov"] = True
    return cls([{"params": ps[:2]}, {"params": ps[2:], "cycle_max_lr": 0.2}], **kw)


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(8)]


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_set_state_dict_resumes_exactly(cls, options):
    data = _data()
    full = _model()
    _train(full, _opt(cls, full), data)

    model = _model()
    opt = _opt(cls, model)
    _train(model, opt, data[:4])
    msd, osd = get_state_dict(model, opt, options=OPTIONS[options])

    fresh = _model()
    fresh_opt = _opt(cls, fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr was set from outside" for DCP's lr=0 step
        set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd, options=OPTIONS[options])
    assert int(fresh_opt.step_counter()) == 4
    assert fresh_opt.get_last_lr() == opt.get_last_lr()
    assert all("step_counter" not in g for g in fresh_opt.param_groups)
    for a, b in zip(model.parameters(), fresh.parameters()):  # DCP's init step moved nothing
        assert torch.equal(a, b)
    _train(fresh, fresh_opt, data[4:])
    for a, b in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_get_state_dict_of_a_fresh_optimizer_changes_nothing(cls):
    # DCP's load flow: the template state_dict comes from the fresh optimizer
    model = _model()
    opt = _opt(cls, model)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, osd = get_state_dict(model, opt)
    assert int(opt.step_counter()) == 0
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert len(osd["state"]) == 4 and all(int(st["step"]) == 0 for st in osd["state"].values())
    # and training from there is a fresh run's
    ref = _model()
    ref_opt = _opt(cls, ref)
    _train(ref, ref_opt, _data())
    _train(model, opt, _data())
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_counter_in_groups_is_exact_where_parameter_steps_are_not():
    # set_step moves the counter away from the parameters' step counts; the
    # groups' copy of the counter carries the position itself
    model = _model()
    opt = _opt(FusedOneCycleAdamW, model)
    _train(model, opt, _data()[:2])
    opt.set_step(7)
    _, osd = get_state_dict(model, opt)
    assert [g["step_counter"] for g in osd["param_groups"]] == [7, 7]
    fresh = _model()
    fresh_opt = _opt(FusedOneCycleAdamW, fresh)
    set_state_dict(fresh, fresh_opt, model_state_dict=fresh.state_dict(), optim_state_dict=osd)
    assert int(fresh_opt.step_counter()) == 7


def test_plain_state_dict_keeps_the_counter_out_of_the_live_groups():
    model = _model()
    opt = _opt(FusedOneCycleSGD, model)
    _train(model, opt, _data()[:3])
    sd = opt.state_dict()
    assert int(sd["step_counter"]) == 3 and [g["step_counter"] for g in sd["param_groups"]] == [3, 3]
    assert all("step_counter" not in g for g in opt.param_groups)
    opt.load_state_dict(sd)
    assert all("step_counter" not in g for g in opt.param_groups)
    assert int(opt.step_counter()) == 3


@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_get_state_dict_of_an_optimizer_on_meta(cls):
    """Parameters not yet materialised (a model built on the meta device):
    DCP's state-making step counts nothing, so nothing reads or copies the
    meta counter (the skipped step's mirror update copied it the CUDA way:
    RuntimeError, where the plain step DCP used to get worked)."""
    with torch.device("meta"):
        model = _model()
    opt = _opt(cls, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, osd = get_state_dict(model, opt)
    assert len(osd["state"]) == 4 and all(st["step"].device.type == "meta" for st in osd["state"].values())
    assert opt._host.step == 0 and opt.param_groups[0]["lr"] == 1e-2


def test_position_from_parameter_steps_refuses_a_non_finite_one():
    """Without any saved counter (flattened DCP), the position is the largest
    per-parameter step: an infinite one is named as a bad step, not an
    OverflowError from int()."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedOneCycleAdamW([p], cycle_min_lr=0.01, cycle_max_lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    del sd["step_counter"]
    for g in sd["param_groups"]:
        del g["step_counter"]
    sd["state"][0]["step"] = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match=r"state\[0\]\['step'\]"):
        opt.load_state_dict(sd)
    assert int(opt.step_counter()) == 1
