"""onecycle_fused: SGD / Adam / AdamW fused with DeepSpeed's 1-Cycle schedule,
computed on the device from a step counter (no host sync, CUDA-graph safe)."""
from .schedule import LRRangeTest, OneCycle, schedule_from_config
from .optim import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD
from .backends import available_backends

__version__ = "0.1.0"

__all__ = [
    "OneCycle",
    "LRRangeTest",
    "schedule_from_config",
    "FusedOneCycleSGD",
    "FusedOneCycleAdam",
    "FusedOneCycleAdamW",
    "available_backends",
]
