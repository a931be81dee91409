"""torch.compile(fullgraph=True) around optimizer.step() (and a whole train
step where dynamo can trace backward): no graph break, same results as eager
within fp32 rounding (inductor fuses the element-wise math differently), and
the host lr mirror is right afterwards.

Each parametrization compiles a small graph: ~5-15 s each cold on 2 CPU cores.
"""
import contextlib

import pytest
import torch

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD, available_backends

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]
SCHEDULE = dict(cycle_min_lr=1e-2, cycle_max_lr=5e-2, cycle_first_step_size=2, decay_step_size=1, decay_lr_rate=0.5)
OPTIMIZERS = {
    "sgd_nesterov": (FusedOneCycleSGD, dict(nesterov=True, weight_decay=1e-3)),
    "adamw_amsgrad": (FusedOneCycleAdamW, dict(amsgrad=True)),
}
STEPS = 6  # crosses the cycle's peak (k = 2), its end (k = 4) and enters the decay phase


def _setup(name, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(model.parameters(), **SCHEDULE, **kwargs, backend=backend)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(STEPS)]
    return model, opt, data


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _no_recompile_storm():
    """At most one recompile: the first step creates the optimizer state lazily."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit") and hasattr(cfg, "fail_on_recompile_limit_hit"):
        return cfg.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _eager(name, backend):
    model, opt, data = _setup(name, backend)
    lrs = []
    for x, y in data:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        lrs.append(opt.get_last_lr())
    return [p.detach().clone() for p in model.parameters()], lrs, opt


def _check(model, lrs, opt, expected):
    params, exp_lrs, exp_opt = expected
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    assert lrs == exp_lrs  # the host mirror, re-read from the device counter
    assert opt.step_counter().item() == exp_opt.step_counter().item() == STEPS
    for p, q in zip(opt.state.values(), exp_opt.state.values()):
        assert p["step"].item() == q["step"].item() == STEPS


# the reference backend is dozens of small ops per tensor: inductor takes
# ~50 s cold on AdamW-amsgrad with 2 cores, so it is compiled with SGD only
@pytest.mark.parametrize("name,backend", [
    ("sgd_nesterov", "reference"),
    ("sgd_nesterov", "cpu"),
    ("adamw_amsgrad", "cpu"),
])
def test_compiled_step_fullgraph_equals_eager(name, backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not built")
    torch._dynamo.reset()
    expected = _eager(name, backend)
    model, opt, data = _setup(name, backend)

    @torch.compile(fullgraph=True)  # fullgraph: any graph break raises
    def opt_step():
        opt.step()

    lrs = []
    with _no_recompile_storm():
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            _loss(model, x, y).backward()
            if i == STEPS - 1:
                opt.step()  # eager after compiled steps: the counter carries on
            else:
                opt_step()
                # the rows the tables hold are recorded from inside the graph:
                # torch 2.13 drops attribute writes on an Optimizer there (the
                # next eager step would rebuild the tables), torch 2.11 raises
                assert opt._table_rows.rows == [opt._row(g) for g in opt.param_groups]
            lrs.append(opt.get_last_lr())
    _check(model, lrs, opt, expected)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="this torch's dynamo cannot trace Tensor.backward()")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_train_step_with_backward(name):
    """The whole step, forward + backward + optimizer.step(), in one graph.
    zero_grad stays outside: torch.optim.Optimizer.zero_grad is marked
    dynamo-disabled by torch itself."""
    torch._dynamo.reset()
    backend = BACKENDS[-1]
    expected = _eager(name, backend)
    model, opt, data = _setup(name, backend)

    @torch.compile(fullgraph=True)
    def train_step(x, y):
        loss = _loss(model, x, y)
        out = loss.detach()  # returning the graph-carrying loss would leak it
        loss.backward()
        opt.step()
        return out

    lrs = []
    with torch._dynamo.config.patch(trace_autograd_ops=True), _no_recompile_storm():
        for x, y in data:
            opt.zero_grad()
            loss = train_step(x, y)
            assert torch.isfinite(loss)
            lrs.append(opt.get_last_lr())
    _check(model, lrs, opt, expected)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_compiled_step_with_complex_params():
    """Complex parameters (a transposed one too) compiled: the real views
    are built inside the graph; results equal torch.optim.AdamW's eager
    step, which also steps complex parameters as real views."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.complex64), torch.randn(5, generator=gen)]
    ours = [torch.nn.Parameter(init[0].t().clone().t()), torch.nn.Parameter(init[1].clone())]  # [0]: strides (1, 4)
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = FusedOneCycleAdamW(ours, **SCHEDULE, backend="cpu")
    ref = torch.optim.AdamW(theirs, lr=0.1)

    @torch.compile(fullgraph=True)
    def opt_step():
        opt.step()

    with _no_recompile_storm():
        for k in range(STEPS):
            for p, q in zip(ours, theirs):
                q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
                p.grad = q.grad.clone()
            ref.param_groups[0].update(lr=opt.schedule.lr(k), betas=(opt.schedule.momentum(k), 0.999))
            opt_step()
            ref.step()
    for p, q, start in zip(ours, theirs, init):
        assert not torch.equal(p.detach(), start)
        torch.testing.assert_close(p.detach(), q.detach())
    assert opt.step_counter().item() == STEPS


def _steps_with_edits(cls, kwargs, edit, compiled):
    """STEPS steps on the cpu backend, ``edit(opt, i)`` before step i; the
    step compiled with fullgraph (recompiles allowed, never a silent eager
    fallback) or eager. Returns the parameters, the lrs after each step and
    the optimizer."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(params, **SCHEDULE, **kwargs, backend="cpu")
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    gen = torch.Generator().manual_seed(1)
    lrs = []
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for i in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            edit(opt, i)
            step()
            lrs.append(opt.get_last_lr())
    return [p.detach().clone() for p in params], lrs, opt


def _compiled_equals_eager(cls, kwargs, edit):
    torch._dynamo.reset()
    expected, expected_lrs, eager_opt = _steps_with_edits(cls, kwargs, edit, compiled=False)
    got, lrs, opt = _steps_with_edits(cls, kwargs, edit, compiled=True)
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q)
    assert lrs == expected_lrs
    assert opt._tables[torch.device("cpu")].tolist() == eager_opt._tables[torch.device("cpu")].tolist()


EDITS = {  # hyper-parameters edited between compiled steps: step index -> (key, value)
    "sgd_constant_momentum": (FusedOneCycleSGD, dict(cycle_momentum=False, momentum=0.5),
                              {2: ("momentum", 0.9), 3: ("weight_decay", 0.01), 4: ("momentum", 0.0)}),
    "adamw": (FusedOneCycleAdamW, dict(),
              {2: ("eps", 1e-3), 3: ("betas", "beta2=0.99"), 4: ("weight_decay", 0.05)}),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_hyperparameter_edits_between_compiled_steps_equal_eager(name):
    """A value edited between compiled steps recompiles, and dynamo then
    treats it as a symbolic float: the group-table refresh must trace it
    (a momentum edited on and off took float() of a symbolic comparison,
    math.isfinite a symbolic float: both failed to compile)."""
    if "cpu" not in BACKENDS:
        pytest.skip("backend 'cpu' is not built")
    cls, kwargs, edits = EDITS[name]

    def edit(opt, i):
        if i in edits:
            key, value = edits[i]
            group = opt.param_groups[0]
            group[key] = (group["betas"][0], 0.99) if key == "betas" else value

    _compiled_equals_eager(cls, kwargs, edit)


SCHEDULE_EDITS = {  # schedule values edited between compiled steps: step index -> (key, value)
    2: ("cycle_max_lr", 0.1),  # a float: symbolic at its next edit
    3: ("cycle_max_lr", 0.2),
    4: ("cycle_first_step_size", 3),  # an int
}


def test_schedule_edits_between_compiled_steps_equal_eager():
    """``param_groups[i]['schedule']['params']`` edited between compiled
    steps (README: edit it to change a schedule). An edited value becomes
    symbolic in dynamo: the schedule cache's key (a sorted, frozen config)
    could not be built from it, and the schedule's validation called
    math.isfinite on it; both failed to compile under fullgraph."""
    if "cpu" not in BACKENDS:
        pytest.skip("backend 'cpu' is not built")

    def edit(opt, i):
        if i in SCHEDULE_EDITS:
            key, value = SCHEDULE_EDITS[i]
            opt.param_groups[0]["schedule"]["params"][key] = value

    _compiled_equals_eager(FusedOneCycleSGD, {}, edit)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_get_last_lr_inside_compiled_function_is_not_stale():
    """get_last_lr() called inside a compiled function (a train step that
    logs its lr) was traced: the lr mirror of the trace became a constant of
    the graph, returned unchanged at every later call. It is a graph break
    now (read eagerly, after the compiled step), an error under fullgraph."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 3))]
    opt = FusedOneCycleSGD(params, **SCHEDULE, backend="cpu")

    def step_and_lr():
        opt.step()
        return opt.get_last_lr()

    compiled = torch.compile(step_and_lr)
    for k in range(STEPS):
        params[0].grad = torch.ones_like(params[0])
        assert compiled() == [opt.schedule.lr(k + 1)]

    def step_and_lr_fullgraph():  # (another code object: dynamo caches by code)
        opt.step()
        return opt.get_last_lr()

    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(Exception, match="disable"):
        torch.compile(step_and_lr_fullgraph, fullgraph=True)()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_duplicate_parameter_is_refused_by_a_compiled_step():
    """A parameter appended to a group's list a second time is refused by
    the eager step (ValueError, nothing changes). The compiled step skipped
    the check and stepped it, the step counter advancing twice a step."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = FusedOneCycleSGD(params, **SCHEDULE, backend="cpu")
    step = torch.compile(opt.step)  # not fullgraph: the ValueError itself comes out
    for p in params:
        p.grad = torch.ones_like(p)
    step()
    opt.param_groups[0]["params"].append(params[0])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="may appear only once"):
        step()
    assert torch.equal(params[0].detach(), before)
    assert opt.step_counter().item() == 1 and opt.state[params[0]]["step"].item() == 1


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_schedule_key_written_into_a_group_is_refused_by_a_compiled_step():
    """``param_groups[0]['cycle_max_lr'] = ...`` (or a torch OneCycleLR
    attached, which writes max_lr, base_momentum...) has no effect: eager
    refuses it with a ValueError naming where to write instead. The check
    was eager-only, so the compiled step ignored the value silently."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 3))]
    opt = FusedOneCycleSGD(params, **SCHEDULE, backend="cpu")
    step = torch.compile(opt.step)  # not fullgraph: the ValueError itself comes out
    params[0].grad = torch.ones_like(params[0])
    step()
    opt.param_groups[0]["cycle_max_lr"] = 0.3
    with pytest.raises(ValueError, match=r"\['schedule'\]\['params'\]\['cycle_max_lr'\]"):
        step()
    assert opt.step_counter().item() == 1


def _switch_momentum_cycling_off(cls, step_fn, momentum=None):
    """Five steps through ``step_fn(opt)``; before the fourth, cycle_momentum
    is switched off (and the momentum / beta1 set to ``momentum``, if given).
    Returns the parameter and the group's momentum / beta1 at the end."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))]
    opt = cls(params, **SCHEDULE, backend="cpu")
    step = step_fn(opt)
    gen = torch.Generator().manual_seed(1)
    sgd = cls is FusedOneCycleSGD
    for i in range(5):
        params[0].grad = torch.randn(5, 3, generator=gen)
        if i == 3:
            group = opt.param_groups[0]
            group["schedule"]["params"]["cycle_momentum"] = False
            if momentum is not None and sgd:
                group["momentum"] = momentum
            elif momentum is not None:
                group["betas"] = (momentum, group["betas"][1])
        step()
    group = opt.param_groups[0]
    return params[0].detach().clone(), group["momentum"] if sgd else group["betas"][0]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_momentum_cycling_switched_off_after_compiled_steps_keeps_the_current_momentum():
    """cycle_momentum switched off keeps the momentum the group holds, the
    mirror of the next step's scheduled value. Compiled steps do not update
    the mirror: the step after the switch used the momentum of the last
    eager update (0.9 at step 0 here, 0.85 eager). The mirror is now
    recomputed from the counter first; a graph break (error under fullgraph)."""
    expected, momentum = _switch_momentum_cycling_off(FusedOneCycleSGD, lambda opt: opt.step)
    assert momentum == pytest.approx(0.85)
    got, got_momentum = _switch_momentum_cycling_off(FusedOneCycleSGD, lambda opt: torch.compile(opt.step))
    torch.testing.assert_close(got, expected)
    assert got_momentum == momentum
    with pytest.raises(Exception, match="disable"):
        _switch_momentum_cycling_off(FusedOneCycleSGD, lambda opt: torch.compile(opt.step, fullgraph=True))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdam])
def test_momentum_set_with_the_switch_off_after_compiled_steps_is_kept(cls):
    """cycle_momentum switched off together with a momentum / beta1 set by
    the user: eager steps with the user's value. After compiled steps the
    stale-mirror repair overwrote it with the schedule's value at the
    counter instead of 0.5. Only a value still equal to the
    mirror's last write is recomputed; a set one needs no counter read,
    so fullgraph compiles too."""
    expected, momentum = _switch_momentum_cycling_off(cls, lambda opt: opt.step, momentum=0.5)
    assert momentum == 0.5
    for fullgraph in (False, True):
        got, got_momentum = _switch_momentum_cycling_off(
            cls, lambda opt: torch.compile(opt.step, fullgraph=fullgraph), momentum=0.5)
        torch.testing.assert_close(got, expected)
        assert got_momentum == 0.5


@pytest.mark.skipif("cpu" not in BACKENDS, reason="onecycle_fused._C is not built")
def test_a_group_added_after_compiled_steps_mirrors_the_current_lr():
    """Compiled steps do not update the host lr mirror (get_last_lr brings it
    up to date). A group added between compiled steps took its mirror from
    the stale host count: its 'lr', and the others', read the schedule at
    step 0 after 5 steps. add_param_group reads the counter first now."""
    torch._dynamo.reset()
    p, q, r = (torch.nn.Parameter(torch.randn(n)) for n in (4, 3, 2))
    opt = FusedOneCycleSGD([p], **SCHEDULE, backend="cpu")
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    for added, steps in ((q, 5), (r, 3)):
        for _ in range(steps):
            for t in opt.param_groups:
                for x in t["params"]:
                    x.grad = torch.ones_like(x)
            step()
        opt.add_param_group({"params": [added]})
        k = int(opt.step_counter())
        assert [g["lr"] for g in opt.param_groups] == [opt.schedule.lr(k)] * len(opt.param_groups), k
    assert k == 8
