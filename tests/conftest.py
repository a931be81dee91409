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
