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
