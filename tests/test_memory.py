"""Memory over long runs: what an optimizer keeps must not grow with the
number of steps or edits, and must go with the optimizer. Counted in objects
and weakrefs (deterministic), not in RSS."""
import gc

import pytest
import torch

from onecycle_fused import FusedOneCycleAdamW, FusedOneCycleSGD
from onecycle_fused.schedule import _Schedule


def _live(kind) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_schedule_edited_to_new_values_keeps_no_schedule_per_value(cls, backend):
    # a schedule value set to a new value again and again (every epoch, a
    # sweep in one run): each value's parsed schedule was cached for the
    # optimizer's lifetime, ~1.3 KB per edit without bound
    p = torch.nn.Parameter(torch.randn(8))
    opt = cls([p], cycle_min_lr=1e-4, cycle_max_lr=1e-2, backend=backend)
    sched = opt.param_groups[0]["schedule"]["params"]

    def run(edits):
        for i in range(edits):
            sched["cycle_max_lr"] = 1e-2 + 1e-6 * i
            p.grad = torch.ones_like(p)
            opt.step()

    run(20)
    before = _live(_Schedule)
    run(300)
    assert _live(_Schedule) - before <= 10


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_deleted_optimizer_frees_params_state_and_plans(cls, backend):
    # nothing module-level (backend instances, step plans, caches) keeps an
    # optimizer's parameters or state alive once it and the model are gone
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = cls(model.parameters(), cycle_min_lr=1e-4, cycle_max_lr=1e-2, backend=backend)
    for _ in range(3):  # (a plan is built and used on the cpu backend)
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    opt.get_last_lr()
    opt.state_dict()
    refs = [weakref.ref(opt), weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    refs += [weakref.ref(t) for st in opt.state.values() for t in st.values()]
    del opt, model
    gc.collect()
    assert [r for r in refs if r() is not None] == []


@pytest.mark.parametrize("cls", [FusedOneCycleSGD, FusedOneCycleAdamW])
def test_load_state_dict_frees_the_old_state(cls):
    import copy
    import weakref

    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    opt = cls(params, cycle_min_lr=1e-4, cycle_max_lr=1e-2, backend="cpu")
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    old = [weakref.ref(t) for st in opt.state.values() for t in st.values()]
    for _ in range(3):
        opt.load_state_dict(copy.deepcopy(saved))
        opt.step()
    gc.collect()
    assert [r for r in old if r() is not None] == []
