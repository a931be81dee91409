"""The schedule against DeepSpeed's own OneCycle / LRRangeTest (the oracle), the
documented differences, golden values, validation and config parsing."""
import inspect
import json
import logging
import math

import pytest
import torch

from conftest import SEED_CONFIG
from onecycle_fused import LRRangeTest, OneCycle, TorchOneCycle, schedule_from_config
from onecycle_fused.backends.reference import schedule_values

ds = pytest.importorskip("deepspeed.runtime.lr_schedules")


def deepspeed_trajectory(cls, kwargs, steps, n_groups=1, optimizer="adam"):
    """lr and momentum of every group after k = 0..steps scheduler steps,
    DeepSpeed driven as `optimizer.step(); scheduler.step()`."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(n_groups)]
    groups = [{"params": [p]} for p in params]
    opt = torch.optim.Adam(groups, lr=1.0) if optimizer == "adam" else torch.optim.SGD(groups, lr=1.0, momentum=0.5)
    sched = cls(opt, **kwargs)
    lrs, moms = [], []
    for _ in range(steps + 1):
        lrs.append([g["lr"] for g in opt.param_groups])
        moms.append([g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups])
        sched.step()
    return lrs, moms


ONECYCLE_CONFIGS = [
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=10),
    dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=7, cycle_second_step_size=13),
    dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=13, cycle_second_step_size=5,
         cycle_first_stair_count=4, cycle_second_stair_count=3),
    dict(cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=12, cycle_first_stair_count=5),
    dict(cycle_min_lr=0.001, cycle_max_lr=0.01, cycle_first_step_size=10, decay_step_size=3, decay_lr_rate=0.5),
    dict(cycle_min_lr=0.001, cycle_max_lr=0.01, cycle_first_step_size=9, cycle_second_step_size=0),
    dict(cycle_min_lr=0.001, cycle_max_lr=0.01, cycle_first_step_size=6, cycle_second_step_size=0,
         cycle_first_stair_count=3, decay_step_size=2, decay_lr_rate=0.1),
    dict(cycle_min_lr=0.5, cycle_max_lr=0.5, cycle_first_step_size=4, cycle_min_mom=0.9, cycle_max_mom=0.9),
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=1, decay_step_size=1, decay_lr_rate=2.0),
    # the tutorial's values, shrunk
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=20, cycle_first_stair_count=10,
         cycle_second_step_size=20, cycle_second_stair_count=10, decay_step_size=20, decay_lr_rate=0.001,
         cycle_min_mom=0.85, cycle_max_mom=0.99),
]


@pytest.mark.parametrize("cfg", ONECYCLE_CONFIGS)
def test_onecycle_matches_deepspeed(cfg):
    sched = OneCycle(**cfg)
    steps = 3 * sched.total_size + 5
    lrs, moms = deepspeed_trajectory(ds.OneCycle, cfg, steps)
    for k in range(steps + 1):
        assert sched.lr(k) == lrs[k][0], k  # bit for bit
        if k == 0:
            continue  # difference 1, tested below
        if k <= sched.total_size:
            assert sched.momentum(k) == moms[k][0], k
        else:  # decay phase, decay_mom_rate = 0 in these configs: momentum stays at max
            assert sched.momentum(k) == moms[k][0] == cfg.get("cycle_max_mom", 0.9)


def test_per_group_lists_match_deepspeed():
    cfg = dict(cycle_min_lr=[1e-4, 1e-2, 0.0], cycle_max_lr=[1e-3, 0.1, 0.5], cycle_first_step_size=8,
               cycle_second_step_size=5, cycle_first_stair_count=4, decay_step_size=3, decay_lr_rate=0.3,
               cycle_min_mom=[0.8, 0.85, 0.5], cycle_max_mom=[0.9, 0.95, 0.6])
    sched = OneCycle(**cfg)
    assert sched.num_groups == 3
    lrs, moms = deepspeed_trajectory(ds.OneCycle, cfg, 40, n_groups=3)
    for k in range(1, 41):
        assert sched.lr(k) == lrs[k]
        assert [sched.lr(k, group=g) for g in range(3)] == lrs[k]
        if k <= sched.total_size:
            assert sched.momentum(k) == moms[k]


@pytest.mark.parametrize("cfg", [
    dict(lr_range_test_min_lr=1e-4, lr_range_test_step_size=10, lr_range_test_step_rate=2.0),
    dict(lr_range_test_min_lr=1e-3, lr_range_test_step_size=7, lr_range_test_step_rate=0.5, lr_range_test_staircase=True),
    dict(lr_range_test_min_lr=[1e-3, 1e-2], lr_range_test_step_size=3, lr_range_test_step_rate=1.0),
    dict(),
])
def test_lr_range_test_matches_deepspeed(cfg):
    sched = LRRangeTest(**cfg)
    n_groups = sched.num_groups or 1
    lrs, _ = deepspeed_trajectory(ds.LRRangeTest, cfg, 50, n_groups=n_groups)
    for k in range(51):
        got = sched.lr(k)
        assert (got if isinstance(got, list) else [got]) == lrs[k]
        assert sched.momentum(k) is None


def _defaults(fn, skip=("self", "optimizer", "params", "last_batch_iteration")):
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if name not in skip}


@pytest.mark.parametrize("ours, theirs", [(OneCycle, ds.OneCycle), (LRRangeTest, ds.LRRangeTest)],
                         ids=["OneCycle", "LRRangeTest"])
def test_parameter_names_and_defaults_are_deepspeeds(ours, theirs):
    """Issue 2: DeepSpeed's exact parameter names and defaults (no test pinned
    them: every OneCycle case above sets cycle_first_step_size, so a changed
    default of 2000 went unnoticed). decay_step_size's default is DeepSpeed's
    0 in the signatures too (it was None, to tell it from its alias: now a
    marked 0 does that)."""
    want = _defaults(theirs.__init__)
    got = _defaults(ours.__init__)
    got.pop("post_cycle_decay_step_size", None)  # the alias (difference 5)
    assert list(got) == list(want)  # names, in DeepSpeed's order
    required = [n for n, v in want.items() if v is inspect.Parameter.empty]
    built = ours(**{n: 0.5 for n in required}).params()
    assert {n: built[n] for n in want if n not in required} == {n: v for n, v in want.items() if n not in required}
    if ours is OneCycle:
        assert required == ["cycle_min_lr", "cycle_max_lr"]
        assert got["decay_step_size"] == 0 and type(built["decay_step_size"]) is int
        with pytest.raises(ValueError, match="not both"):  # a 0 given is still told from the default
            OneCycle(0.1, 1.0, decay_step_size=0, post_cycle_decay_step_size=5)
        assert OneCycle(0.1, 1.0, post_cycle_decay_step_size=5).decay_step_size == 5
        # the optimizers take the same schedule keywords with the same defaults
        from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD

        for cls in (FusedOneCycleSGD, FusedOneCycleAdam, FusedOneCycleAdamW):
            kw = _defaults(cls)
            assert [n for n in kw if n in got] == list(got)
            assert {n: kw[n] for n in got if n not in required} == {n: got[n] for n in got if n not in required}
            p = torch.nn.Parameter(torch.zeros(1))
            assert cls([p], cycle_min_lr=0.5, cycle_max_lr=0.5).schedule.params() == built


# ---- golden values: DeepSpeed 0.19.8 on the tutorial's config, k = steps applied


def test_golden_values_from_tutorial_json():
    sched = OneCycle.from_config(SEED_CONFIG)
    golden_lr = {1: 1.0e-4, 2: 1.018e-4, 500: 5.5e-4, 999: 9.982e-4, 1000: 1.0e-3, 2000: 1.0e-4,
                 2001: 9.99999000001e-5, 3000: 9.99000999e-5}
    for k, v in golden_lr.items():
        assert sched.lr(k) == pytest.approx(v, rel=1e-9, abs=0), k  # golden values have 9-12 digits
    for k, v in {2: 0.98972, 500: 0.92, 1000: 0.85}.items():
        assert sched.momentum(k) == pytest.approx(v, rel=1e-12), k


def test_tutorial_config_forms():
    with open(SEED_CONFIG) as f:
        config = json.load(f)
    from_path = schedule_from_config(SEED_CONFIG)
    assert isinstance(from_path, OneCycle)
    assert from_path == schedule_from_config(config) == schedule_from_config(config["scheduler"])
    assert from_path.total_size == 2000 and from_path.decay_step_size == 1000
    assert from_path.second_stair_count == 500


def test_lr_range_test_from_config():
    cfg = {"scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-5,
                                                            "lr_range_test_step_size": 100,
                                                            "lr_range_test_step_rate": 5,
                                                            "lr_range_test_staircase": True}}}
    sched = LRRangeTest.from_config(cfg)
    assert sched.lr(250) == 1e-5 * (1 + 5 * 2)
    with pytest.raises(ValueError, match="not a OneCycle"):
        OneCycle.from_config(cfg)


@pytest.mark.parametrize("cls, kw, position", [
    (OneCycle, dict(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4), "last_batch_iteration"),
    (LRRangeTest, dict(lr_range_test_step_size=3), "last_batch_iteration"),
    (TorchOneCycle, dict(max_lr=0.1, total_steps=10), "last_epoch"),
])
def test_the_constructors_take_a_fresh_start_position_as_deepspeed_and_torch_do(cls, kw, position):
    """DeepSpeed's schedulers take last_batch_iteration=-1, torch's
    OneCycleLR last_epoch=-1 (their defaults): a ported call that spells it
    out builds the same schedule (it was a TypeError, where a config's -1 was
    taken); any other position is a ValueError saying where a resume comes from."""
    assert cls(**kw, **{position: -1}) == cls(**kw)
    assert inspect.signature(cls).parameters[position].default == -1
    for bad in (5, 0, True, [5]):
        with pytest.raises(ValueError, match=rf"{position}=.* is not supported: a run resumes from"):
            cls(**kw, **{position: bad})


@pytest.mark.parametrize("config, match", [
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "scheduler type"),
    ({"optimizer": {}}, "scheduler"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "bogus": 1}}}, "bogus"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1}}}, "cycle_max_lr"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1,
                                                   "last_batch_iteration": 10}}}, "last_batch_iteration"),
    # wrong JSON shapes: ValueError naming the entry, not a TypeError from deep inside
    ({"scheduler": {"type": "OneCycle", "params": [0.1, 1.0]}}, "params"),
    ({"scheduler": {"type": "OneCycle", "params": "cycle_min_lr=0.1"}}, "params"),
    ({"scheduler": {"type": ["OneCycle"], "params": {}}}, "type"),
    ({"scheduler": {"type": {"name": "OneCycle"}}}, "type"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1,
                                                   "last_batch_iteration": [5]}}}, "last_batch_iteration"),
])
def test_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_config(config)


# ---- the documented differences from DeepSpeed, each checked explicitly


def test_difference_1_initial_momentum_is_max():
    cfg = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10, cycle_min_mom=0.85, cycle_max_mom=0.95)
    _, moms = deepspeed_trajectory(ds.OneCycle, cfg, 1)
    assert moms[0] == [0.85]  # DeepSpeed writes cycle_min_mom at construction
    assert OneCycle(**cfg).momentum(0) == 0.95  # its own get_mom() formula at k = 0


def test_difference_2_sgd_momentum_is_cycled():
    from onecycle_fused import FusedOneCycleSGD

    cfg = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("DeepSpeed")  # does not propagate: caplog would not see it
    logger.addHandler(handler)
    try:
        _, moms = deepspeed_trajectory(ds.OneCycle, cfg, 5, optimizer="sgd")
    finally:
        logger.removeHandler(handler)
    assert all(m == [0.5] for m in moms)  # DeepSpeed leaves SGD's momentum alone
    # ... and says so (the README's table said "silently"; DeepSpeed 0.19.8 logs it)
    assert any("cycle_momentum is disabled" in r.getMessage() for r in records)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = FusedOneCycleSGD([p], **cfg)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["momentum"])
        p.grad = torch.ones(2)
        opt.step()
    assert seen == [OneCycle(**cfg).momentum(k) for k in range(5)]
    assert len(set(seen)) == 5


def test_difference_3_beta2_is_kept():
    from onecycle_fused import FusedOneCycleAdam

    cfg = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10)
    params = [torch.nn.Parameter(torch.zeros(1))]
    adam = torch.optim.Adam(params, lr=1.0, betas=(0.9, 0.999))
    ds.OneCycle(adam, **cfg).step()
    assert adam.param_groups[0]["betas"][1] == 0.99  # DeepSpeed overwrites beta2
    p = torch.nn.Parameter(torch.zeros(1))
    opt = FusedOneCycleAdam([p], betas=(0.9, 0.999), **cfg)
    p.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["betas"][1] == 0.999


def test_difference_4_momentum_decays_down():
    cfg = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, decay_step_size=2,
               decay_mom_rate=0.5, cycle_min_mom=0.8, cycle_max_mom=0.9)
    sched = OneCycle(**cfg)
    _, moms = deepspeed_trajectory(ds.OneCycle, cfg, 20)
    for k in range(11, 21):
        d = k - 10
        assert moms[k][0] == pytest.approx(0.9 * (1 + 0.5 * d / 2))  # DeepSpeed: grows past 1
        assert sched.momentum(k) == pytest.approx(0.9 / (1 + 0.5 * d / 2))
        assert sched.momentum(k) < 0.9
    assert moms[20][0] > 1


def test_difference_5_tutorial_alias():
    sched = OneCycle(cycle_min_lr=0.1, cycle_max_lr=1.0, post_cycle_decay_step_size=7)
    assert sched.decay_step_size == 7
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(TypeError):
        ds.OneCycle(torch.optim.Adam(params), 0.1, 1.0, post_cycle_decay_step_size=7)
    with pytest.raises(ValueError, match="not both"):
        OneCycle(cycle_min_lr=0.1, cycle_max_lr=1.0, decay_step_size=0, post_cycle_decay_step_size=7)
    # the alias works in a DeepSpeed config too
    cfg = {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0,
                                                        "post_cycle_decay_step_size": 3}}}
    assert schedule_from_config(cfg).decay_step_size == 3


# ---- the on-device tensor evaluation equals the host spec bit for bit


def _table(sched, n_groups=1):
    from onecycle_fused.schedule import ROW_WIDTH

    rows = []
    for g in range(n_groups):
        r = sched.row(g)
        rows.append(r + [0.0] * (ROW_WIDTH - len(r)))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("sched", [OneCycle(**c) for c in ONECYCLE_CONFIGS] + [
    OneCycle(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, decay_step_size=2, decay_mom_rate=0.5),
    LRRangeTest(lr_range_test_min_lr=1e-4, lr_range_test_step_size=10, lr_range_test_step_rate=2.0),
    LRRangeTest(lr_range_test_min_lr=1e-3, lr_range_test_step_size=7, lr_range_test_staircase=True),
], ids=repr)
def test_tensor_schedule_equals_host(sched):
    table = _table(sched)
    for k in list(range(0, 120)) + [10**6 + 3, 2**40]:
        lr, mom = schedule_values(table, torch.tensor(k, dtype=torch.int64))
        assert lr.item() == sched.lr(k), k
        expected_mom = sched.momentum(k)
        if expected_mom is not None:
            assert mom.item() == expected_mom, k


@pytest.mark.parametrize("sched", [OneCycle(**c) for c in ONECYCLE_CONFIGS] + [
    OneCycle(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, decay_step_size=2, decay_mom_rate=0.5),
    OneCycle(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, cycle_momentum=False),
    LRRangeTest(lr_range_test_min_lr=1e-4, lr_range_test_step_size=10, lr_range_test_step_rate=2.0),
], ids=repr)
def test_values_is_lr_and_momentum_in_one(sched):
    """``_values(k)``, the optimizer's host mirror's one evaluation per step,
    is ``(lr(k), momentum(k))`` exactly, momentum None where not cycled."""
    from onecycle_fused.schedule import TorchOneCycle

    for s in (sched, TorchOneCycle(max_lr=0.1, total_steps=50), TorchOneCycle(max_lr=0.1, total_steps=50,
                                                                                 cycle_momentum=False)):
        for k in list(range(0, 60)) + [10**6 + 3, 2**40]:
            assert s._values(k) == (s.lr(k), s.momentum(k)), (s, k)


def test_host_schedule_float64_large_steps():
    sched = OneCycle.from_config(SEED_CONFIG)
    k = 10**9
    assert sched.lr(k) == pytest.approx(1e-4 / (1 + 0.001 * (k - 2000) / 1000), rel=1e-15)


# ---- validation: ValueError naming the parameter

GOOD = dict(cycle_min_lr=0.01, cycle_max_lr=0.1)


@pytest.mark.parametrize("override, name", [
    (dict(cycle_first_step_size=0), "cycle_first_step_size"),
    (dict(cycle_first_step_size=-3), "cycle_first_step_size"),
    (dict(cycle_first_step_size=2.5), "cycle_first_step_size"),
    (dict(cycle_first_step_size=True), "cycle_first_step_size"),
    (dict(cycle_second_step_size=-1), "cycle_second_step_size"),
    (dict(decay_step_size=-1), "decay_step_size"),
    (dict(decay_step_size=1.5), "decay_step_size"),
    (dict(cycle_first_stair_count=-1), "cycle_first_stair_count"),
    (dict(cycle_second_stair_count=0.5), "cycle_second_stair_count"),
    (dict(cycle_min_lr=-0.1), "cycle_min_lr"),
    (dict(cycle_min_lr=math.nan), "cycle_min_lr"),
    (dict(cycle_max_lr=math.inf), "cycle_max_lr"),
    (dict(cycle_min_lr=0.2, cycle_max_lr=0.1), "cycle_min_lr"),
    (dict(cycle_min_lr="0.1"), "cycle_min_lr"),
    (dict(cycle_min_mom=1.0), "cycle_min_mom"),
    (dict(cycle_max_mom=1.5), "cycle_max_mom"),
    (dict(cycle_min_mom=-0.1), "cycle_min_mom"),
    (dict(cycle_min_mom=0.95, cycle_max_mom=0.9), "cycle_min_mom"),
    (dict(decay_lr_rate=-1.0), "decay_lr_rate"),
    (dict(decay_lr_rate=math.inf), "decay_lr_rate"),
    (dict(decay_mom_rate=math.nan), "decay_mom_rate"),
    (dict(cycle_momentum="yes"), "cycle_momentum"),
    (dict(cycle_min_lr=[0.01, 0.02], cycle_max_lr=[0.1, 0.2, 0.3]), "length"),
    (dict(cycle_min_lr=[]), "cycle_min_lr"),
    (dict(cycle_min_lr=[0.01, -1.0], cycle_max_lr=[0.1, 0.1]), r"cycle_min_lr\[1\]"),
])
def test_onecycle_validation(override, name):
    with pytest.raises(ValueError, match=name):
        OneCycle(**{**GOOD, **override})


@pytest.mark.parametrize("override, name", [
    (dict(lr_range_test_min_lr=-1), "lr_range_test_min_lr"),
    (dict(lr_range_test_step_size=0), "lr_range_test_step_size"),
    (dict(lr_range_test_step_rate=math.nan), "lr_range_test_step_rate"),
    (dict(lr_range_test_step_rate=-2.0), "lr_range_test_step_rate"),
    (dict(lr_range_test_staircase=1), "lr_range_test_staircase"),
])
def test_lr_range_test_validation(override, name):
    with pytest.raises(ValueError, match=name):
        LRRangeTest(**override)


def test_integral_floats_are_accepted():
    # JSON writers sometimes emit 1000.0 for integers
    sched = OneCycle(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=1000.0, cycle_first_stair_count=10.0)
    assert sched.cycle_first_step_size == 1000 and isinstance(sched.cycle_first_step_size, int)


def test_numpy_integral_step_sizes_are_accepted_like_python_floats():
    """A config computed with numpy gives np.float32(1000.0) / np.int64 step
    sizes: accepted as 1000.0 is (was a ValueError for np.float32 only, saying
    it was not an integer), with DeepSpeed's values; a non-integral one is
    still refused."""
    np = pytest.importorskip("numpy")
    cfg = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=np.float32(6.0),
               cycle_second_step_size=np.float64(4.0), cycle_first_stair_count=np.int64(3),
               decay_step_size=np.float32(2.0), decay_lr_rate=0.5)
    sched = OneCycle(**cfg)
    assert (sched.cycle_first_step_size, sched.cycle_second_step_size, sched.decay_step_size) == (6, 4, 2)
    assert all(type(v) is int for v in (sched.cycle_first_step_size, sched.cycle_second_step_size,
                                         sched.cycle_first_stair_count, sched.decay_step_size))
    steps = 2 * sched.total_size + 4
    lrs, _ = deepspeed_trajectory(ds.OneCycle, {k: (float(v) if k.endswith("size") else int(v) if k.endswith("count")
                                                    else v) for k, v in cfg.items()}, steps)
    assert [sched.lr(k) for k in range(steps + 1)] == [lr[0] for lr in lrs]
    assert LRRangeTest(lr_range_test_step_size=np.float32(5.0)).lr_range_test_step_size == 5
    for bad in (np.float32(5.5), np.float64("nan"), np.float32("inf"), np.bool_(True)):
        with pytest.raises(ValueError, match="cycle_first_step_size"):
            OneCycle(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=bad)


def test_group_index_is_checked():
    """lr(k, group=g) names a group: one the lists do not have is a ValueError
    (was an IndexError, and -1 silently read the last group)."""
    sched = OneCycle(cycle_min_lr=[0.1, 0.2], cycle_max_lr=1.0)
    assert sched.lr(0, group=1) == 0.2 and sched.momentum(0, group=1) == 0.9
    for bad in (2, -1, True, 1.0, "0"):
        with pytest.raises(ValueError, match="group"):
            sched.lr(0, group=bad)
        with pytest.raises(ValueError, match="group"):
            sched.momentum(0, group=bad)
    scalar = OneCycle(cycle_min_lr=0.1, cycle_max_lr=1.0)
    assert scalar.lr(0, group=5) == 0.1  # scalars hold for every group
    with pytest.raises(ValueError, match="group"):
        scalar.lr(0, group=-1)


def test_check_num_groups():
    sched = OneCycle(cycle_min_lr=[0.1, 0.2], cycle_max_lr=1.0)
    sched.check_num_groups(2)
    with pytest.raises(ValueError, match="cycle_min_lr"):
        sched.check_num_groups(3)


def test_config_and_params_do_not_alias_the_schedules_lists():
    """Editing the per-group lists of a config() (to build a variant) left the
    schedule itself edited, unvalidated: config() and params() returned its
    own lists."""
    from onecycle_fused import LRRangeTest, OneCycle, TorchOneCycle, schedule_from_config

    for sched in (OneCycle([1e-4, 2e-4], [1e-3, 2e-3], cycle_min_mom=[0.8, 0.7]),
                  LRRangeTest([1e-4, 1e-3]),
                  TorchOneCycle([0.1, 0.2], total_steps=10, base_momentum=[0.8, 0.85])):
        want = (sched.lr(3), sched.momentum(3), repr(sched))
        for d in (sched.config()["params"], sched.params()):
            for v in d.values():
                if isinstance(v, list):
                    v[0] = 123.0
                    v.append(5.0)
        assert (sched.lr(3), sched.momentum(3), repr(sched)) == want
        assert schedule_from_config(sched.config()) == sched


def test_config_file_read_as_json_bytes(tmp_path):
    """A JSON file is read as bytes: a UTF-8 BOM (Windows editors) was "not a
    JSON file", and non-ASCII text depended on the locale (UnicodeDecodeError
    under LC_ALL=C); an undecodable file is the usual "not a JSON file" error
    naming it."""
    import json as _json

    from onecycle_fused import OneCycle, schedule_from_config

    body = _json.dumps({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}},
                        "comment": "lr \u2265 0"}, ensure_ascii=False).encode("utf-8")
    for name, data in (("bom.json", b"\xef\xbb\xbf" + body), ("utf8.json", body)):
        (tmp_path / name).write_bytes(data)
        assert schedule_from_config(tmp_path / name) == OneCycle(1e-4, 1e-3)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ValueError, match="bin.json is not a JSON file"):
        schedule_from_config(str(tmp_path / "bin.json"))
