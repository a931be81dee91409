"""Step plans (onecycle_fused/step_plan.py, StepPlan in csrc/ops.cpp): the
planned path is bit for bit the list path, in steady state and through every
change that must invalidate a plan, and it is really used."""
import copy
import gc
import weakref

import pytest
import torch

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD, ops
from onecycle_fused import step_plan
from conftest import assert_same_optimizers

pytestmark = pytest.mark.skipif(not ops.cpu_library_loaded(), reason="onecycle_fused._C is not built")

SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5)
ALGOS = [
    (FusedOneCycleSGD, dict(SCHED, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (FusedOneCycleAdam, dict(SCHED, amsgrad=True)),
    (FusedOneCycleAdamW, dict(SCHED)),
]
ALGO_IDS = ["sgd", "adam", "adamw"]
# (shape, dtype, group): several groups, mixed dtypes, odd and empty sizes
LAYOUT = [((7,), torch.float32, 0), ((3, 5), torch.float64, 0), ((33,), torch.bfloat16, 1),
          ((1,), torch.float16, 1), ((0,), torch.float32, 1), ((4, 4), torch.float32, 2)]


def make(cls, kw, plan, layout=LAYOUT, backend="cpu"):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
              for shape, dtype, _ in layout]
    groups = [{"params": [p for p, (_, _, g) in zip(params, layout) if g == gid]}
              for gid in sorted({g for _, _, g in layout})]
    if len(groups) > 1:
        groups[1]["weight_decay"] = 0.05  # a group with its own hyper-parameters
    opt = cls(groups, backend=backend, **kw)
    opt._step_plan_enabled = plan
    return params, opt


def grad_for(p, k, i):
    gen = torch.Generator().manual_seed(1000 * k + i)
    return torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def set_grads(params, k):
    for i, p in enumerate(params):
        p.grad = grad_for(p, k, i)  # new tensors each step, as zero_grad(set_to_none=True)


def run_both(cls, kw, steps, action=None, layout=LAYOUT):
    """Steps a planned and a list-path optimizer alike; ``action(k, params,
    opt)`` runs before each step (grads are set before it). Compares after
    every step; returns the planned optimizer."""
    both = [make(cls, kw, True, layout), make(cls, kw, False, layout)]
    for k in range(steps):
        for params, opt in both:
            set_grads(params, k)
            if action is not None:
                action(k, params, opt)
            opt.step()
        assert_same_optimizers(*both)
    assert both[1][1]._plan.planned_steps == 0
    return both[0][1]


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_steady_state_is_planned_and_bit_identical(cls, kw):
    opt = run_both(cls, kw, 12)
    assert opt._plan.planned_steps == 11  # every step but the first


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_grads_kept_in_place(cls, kw):
    def action(k, params, opt):
        if k > 0:  # the grads of step 0 stay, overwritten in place (zero_grad(set_to_none=False))
            for i, p in enumerate(params):
                p.grad = opt._kept[i]
                p.grad.copy_(grad_for(p, k, i))
        opt._kept = [p.grad for p in params]

    assert run_both(cls, kw, 6, action)._plan.planned_steps == 5


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_grads_going_none_and_coming_back(cls, kw):
    def action(k, params, opt):
        if k in (3, 4):
            params[1].grad = None
        if k < 5:
            params[5].grad = None  # its first grad comes at step 5
        if k == 7:
            for p in params:
                p.grad = None  # no grads at all: the counter still advances

    opt = run_both(cls, kw, 12, action)
    assert opt._plan.planned_steps >= 4


@pytest.mark.parametrize("cls,kw", ALGOS[1:], ids=ALGO_IDS[1:])
def test_state_tensors_replaced_by_assignment(cls, kw):
    """Optimizer-state offloading: state[k] = v.to(...) and back; new values
    are used; the plan serves again afterwards and does not keep the old
    tensors alive."""
    kept = []  # the old tensors stay alive (as an offloading copy might): only the ids tell

    def action(k, params, opt):
        if k in (3, 6):
            for p in params:
                st = opt.state[p]
                kept.extend((st["exp_avg"], st["exp_avg_sq"]))
                st["exp_avg"] = st["exp_avg"].to(torch.float64).to(p.dtype)  # round trip: a new tensor
                st["exp_avg_sq"] = st["exp_avg_sq"] * 0.5  # new values must be read
        if k == 8:
            st = opt.state[params[0]]
            kept.append(st["step"])
            st["step"] = st["step"].clone()

    opt = run_both(cls, kw, 12, action)
    assert opt._plan.planned_steps >= 6
    st = opt.state[opt.param_groups[0]["params"][0]]
    old = weakref.ref(st["exp_avg"])
    st["exp_avg"] = st["exp_avg"].clone()
    gc.collect()
    assert old() is None  # the plan held it weakly


@pytest.mark.parametrize("cls,kw", ALGOS[:1], ids=ALGO_IDS[:1])
def test_momentum_buffer_replaced(cls, kw):
    kept = []

    def action(k, params, opt):
        if k % 3 == 2:
            for p in params[::2]:
                kept.append(opt.state[p]["momentum_buffer"])
                opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"] + 1.0

    run_both(cls, kw, 9, action)


def test_dead_state_tensor_with_reused_id_is_not_used():
    """A state tensor freed and a new one made in its place (so maybe at the
    same address): the plan's weak reference sees the death."""
    def action(k, params, opt):
        if k >= 2:
            for p in params:
                st = opt.state[p]
                del st["exp_avg"]
                gc.collect()
                st["exp_avg"] = torch.full_like(p, 0.25)

    run_both(FusedOneCycleAdamW, dict(SCHED), 6, action)


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_load_state_dict(cls, kw):
    def action(k, params, opt):
        if k == 4:
            sd = copy.deepcopy(opt.state_dict())
            for st in sd["state"].values():
                for key, v in st.items():
                    if key != "step" and isinstance(v, torch.Tensor):
                        st[key] = v * 0.5
            opt.load_state_dict(sd)

    opt = run_both(cls, kw, 8, action)
    assert opt._plan.planned_steps >= 5


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_add_param_group(cls, kw):
    def action(k, params, opt):
        if k == 3:
            extra = torch.linspace(-1, 1, 9, requires_grad=True)
            opt.add_param_group({"params": [extra]})
            params.append(extra)
        if k >= 3:
            params[-1].grad = grad_for(params[-1], k, 99)

    run_both(cls, kw, 7, action)


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_hyper_parameter_changes(cls, kw):
    def action(k, params, opt):
        if k == 3:
            opt.param_groups[0]["weight_decay"] = 0.2
        if k == 5 and "amsgrad" in opt.defaults:
            opt.param_groups[1]["amsgrad"] = not opt.param_groups[1]["amsgrad"]
        if k == 5 and cls is FusedOneCycleSGD:
            opt.param_groups[1]["nesterov"] = False
            opt.param_groups[1]["dampening"] = 0.1
        if k == 7:
            opt.param_groups[2]["maximize"] = True

    run_both(cls, kw, 10, action)


def test_sgd_momentum_switched_on_later():
    kw = dict(SCHED, cycle_momentum=False, momentum=0.0)

    def action(k, params, opt):
        if k == 3:
            for g in opt.param_groups:
                g["momentum"] = 0.9

    run_both(FusedOneCycleSGD, kw, 7, action)


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_set_step(cls, kw):
    def action(k, params, opt):
        if k == 4:
            opt.set_step(20)

    run_both(cls, kw, 8, action)


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_grad_scaler_skips(cls, kw):
    """grad_scale / found_inf as GradScaler hands them over: a step with an
    inf changes nothing, planned or not."""
    def action(k, params, opt):
        opt.grad_scale = torch.tensor(4.0)
        opt.found_inf = torch.tensor(1.0 if k in (2, 5) else 0.0)

    opt = run_both(cls, kw, 8, action)
    assert int(opt.step_counter()) == 6
    assert opt._plan.planned_steps == 7


def test_param_moved_between_groups_and_groups_reordered():
    def action(k, params, opt):
        if k == 3:
            p = opt.param_groups[0]["params"].pop()
            opt.param_groups[1]["params"].insert(0, p)
        if k == 5:
            opt.param_groups[0]["params"].reverse()
        if k == 7:
            opt.param_groups[1], opt.param_groups[2] = opt.param_groups[2], opt.param_groups[1]

    run_both(FusedOneCycleAdamW, dict(SCHED), 10, action)


def test_alternating_grads_back_off_and_stay_correct():
    """A grad present only every other step invalidates each plan before it
    is used: plans stop being built for a while, results stay identical."""
    def action(k, params, opt):
        if k % 2:
            params[0].grad = None

    opt = run_both(FusedOneCycleSGD, dict(SCHED, momentum=0.9), 40, action)
    assert opt._plan.planned_steps == 0
    assert opt._plan.cooldown > 0


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_bad_grads_raise_as_before_and_change_nothing(cls, kw):
    for plan in (True, False):
        params, opt = make(cls, kw, plan)
        for k in range(3):
            set_grads(params, k)
            opt.step()
        before = [p.detach().clone() for p in params]
        counter = int(opt.step_counter())
        params[2].grad_dtype = None  # torch's own check would refuse a float32 grad
        params[2].grad = torch.zeros(params[2].shape, dtype=torch.float32)  # a bf16 param
        with pytest.raises(ValueError, match=r"grads\[\d+\] must match params"):
            opt.step()
        params[2].grad = torch.zeros_like(params[2])
        params[2].grad.data = torch.zeros(3, 11, dtype=params[2].dtype)  # (the setter checks shapes)
        with pytest.raises(ValueError, match=r"grads\[\d+\] must match params"):
            opt.step()
        params[2].grad = torch.zeros(params[2].shape, dtype=params[2].dtype).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert int(opt.step_counter()) == counter
        params[2].grad = torch.zeros_like(params[2])
        opt.step()  # and it recovers
        assert int(opt.step_counter()) == counter + 1


def test_non_contiguous_grad_goes_through_a_plan_like_the_list_path():
    layout = [((6, 4), torch.float32, 0), ((5,), torch.float32, 0)]

    def action(k, params, opt):
        params[0].grad = grad_for(params[0], k, 0).t().contiguous().t()  # other strides

    run_both(FusedOneCycleAdamW, dict(SCHED), 5, action, layout=layout)


def test_reference_backend_never_plans():
    params, opt = make(FusedOneCycleAdamW, dict(SCHED), True, backend="reference")
    for k in range(3):
        set_grads(params, k)
        opt.step()
    assert opt._plan.plans is None and opt._plan.planned_steps == 0


def test_switch_off():
    params, opt = make(FusedOneCycleSGD, dict(SCHED), True)
    for k in range(3):
        set_grads(params, k)
        opt.step()
    assert opt._plan.planned_steps == 2
    opt._step_plan_enabled = False
    set_grads(params, 3)
    opt.step()
    assert opt._plan.planned_steps == 2 and opt._plan.plans is None


def test_fingerprint_matches_python_snapshot_on_changes():
    """plan_fingerprint (C) and the Python fallback see the same changes."""
    params, opt = make(FusedOneCycleAdam, dict(SCHED), True)
    set_grads(params, 0)
    opt.step()
    fns = [step_plan._fingerprint_function(), step_plan._snapshot_py]
    assert fns[0] is not step_plan._snapshot_py  # the C one is built

    def snaps():
        return [f(opt.param_groups, opt.state) for f in fns]

    mutations = [
        lambda: opt.state[params[0]].__setitem__("exp_avg", opt.state[params[0]]["exp_avg"].clone()),
        lambda: opt.state[params[1]].pop("exp_avg_sq"),
        lambda: opt.state[params[1]].__setitem__("extra", 1),
        lambda: opt.param_groups[0]["params"].append(params[2]),
        lambda: opt.param_groups.append({"params": []}),
        lambda: opt.state.pop(params[3]),
    ]
    for mutate in mutations:
        before = snaps()
        assert snaps() == before
        mutate()
        after = snaps()
        assert all(a != b for a, b in zip(after, before))
    assert fns[0](opt.param_groups, {1: "not a dict"}) is None
    assert fns[1](opt.param_groups, {1: "not a dict"}) is None


def test_step_plan_op_directly():
    """The class and op as registered: a plan steps like sgd_step_ and
    returns False, touching nothing, when a planned grad is missing or an
    unplanned param got one."""
    p = [torch.randn(5), torch.randn(3)]
    q = [t.clone() for t in p]
    watched = torch.zeros(2)
    bufs = [torch.zeros_like(t) for t in p]
    bufs_q = [torch.zeros_like(t) for t in p]
    steps = [torch.zeros((), dtype=torch.int64) for _ in p]
    steps_q = [torch.zeros((), dtype=torch.int64) for _ in p]
    for a, b in zip(p, q):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    _, opt = make(FusedOneCycleSGD, dict(SCHED, momentum=0.9), False, layout=[((1,), torch.float32, 0)])
    opt._refresh_tables()
    table = opt._tables[torch.device("cpu")]
    c1, c2 = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    plan = torch.classes.onecycle_fused.StepPlan("sgd", p, bufs, [], [], steps, [0, 0], [watched], False)
    assert len(plan) == 2
    assert torch.ops.onecycle_fused.step_planned_(plan, table, c1, None, None) is True
    torch.ops.onecycle_fused.sgd_step_(q, [t.grad for t in q], bufs_q, steps_q, [0, 0], table, c2, None, None)
    assert all(torch.equal(a, b) for a, b in zip(p + bufs + steps + [c1], q + bufs_q + steps_q + [c2]))
    before = [t.clone() for t in p + bufs + steps + [c1]]
    watched.grad = torch.zeros(2)
    assert plan.ready() is False
    assert torch.ops.onecycle_fused.step_planned_(plan, table, c1, None, None) is False
    watched.grad = None
    p[1].grad = None
    assert torch.ops.onecycle_fused.step_planned_(plan, table, c1, None, None) is False
    assert plan.step(table, c1, None, None) is False
    assert all(torch.equal(a, b) for a, b in zip(before, p + bufs + steps + [c1]))
    # the method (what the optimizer calls) steps as the op does
    p[1].grad = q[1].grad
    assert plan.step(table, c1, None, None) is True
    torch.ops.onecycle_fused.sgd_step_(q, [t.grad for t in q], bufs_q, steps_q, [0, 0], table, c2, None, None)
    assert all(torch.equal(a, b) for a, b in zip(p + bufs + steps + [c1], q + bufs_q + steps_q + [c2]))
    assert c1.item() == 2
    with pytest.raises(ValueError, match="algo"):
        torch.classes.onecycle_fused.StepPlan("lamb", p, bufs, [], [], steps, [0, 0], [], False)
    with pytest.raises(ValueError, match="state list"):
        torch.classes.onecycle_fused.StepPlan("adam", p, bufs, [], [], steps, [0, 0], [], False)


@pytest.mark.parametrize("cls,kw", ALGOS, ids=ALGO_IDS)
def test_schedule_config_edited_in_place(cls, kw):
    """A group's schedule dict edited in place (not replaced) changes the
    table rows and the lr mirror (_schedule_of caches by the dict object and
    a deep copy of it)."""
    def action(k, params, opt):
        if k == 3:
            opt.param_groups[0]["schedule"]["params"]["cycle_max_lr"] = 0.5  # nested, in place
        if k == 6:
            config = opt.param_groups[1]["schedule"]
            opt.param_groups[1]["schedule"] = dict(config, params=dict(config["params"], cycle_min_lr=0.02))

    opt = run_both(cls, kw, 9, action)
    fresh = cls([torch.zeros(1)], **dict(kw, cycle_max_lr=0.5))
    unedited = cls([torch.zeros(1)], **kw)
    for o in (fresh, unedited):
        o.set_step(9)
    assert opt.get_last_lr()[0] == fresh.get_last_lr()[0] != unedited.get_last_lr()[0]
    assert opt.param_groups[1]["schedule"]["params"]["cycle_min_lr"] == 0.02
