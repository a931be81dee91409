import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# the DeepSpeed tutorial config, copied as written from shared/seed/
SEED_CONFIG = os.path.join(os.path.dirname(__file__), "data", "onecycle_tutorial.json")


def assert_same_optimizers(a, b):
    """Two (params, optimizer) pairs stepped alike hold equal parameters,
    step counters and state, bit for bit (step plans against the list path)."""
    (pa, oa), (pb, ob) = a, b
    assert int(oa.step_counter()) == int(ob.step_counter())
    assert len(oa.param_groups) == len(ob.param_groups)
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        for p, q in zip(ga["params"], gb["params"]):
            assert torch.equal(p, q)
            sa, sb = oa.state.get(p, {}), ob.state.get(q, {})
            assert sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert torch.equal(sa[key], sb[key]), key
                else:
                    assert sa[key] == sb[key], key
