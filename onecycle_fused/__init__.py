"""onecycle_fused: SGD / Adam / AdamW fused with DeepSpeed's (or torch's)
1-Cycle schedule, computed on the device from a step counter (no host sync,
CUDA-graph safe)."""
from .schedule import LRRangeTest, OneCycle, TorchOneCycle, schedule_from_config
from .optim import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD
from .backends import available_backends
from .migrate import load_torch_optimizer_state
from .range_test import RangeTestResult, lr_range_test
from .schedule_mirror import ScheduleMirror

__version__ = "0.1.0"

__all__ = [
    "OneCycle",
    "LRRangeTest",
    "TorchOneCycle",
    "schedule_from_config",
    "FusedOneCycleSGD",
    "FusedOneCycleAdam",
    "FusedOneCycleAdamW",
    "available_backends",
    "lr_range_test",
    "RangeTestResult",
    "load_torch_optimizer_state",
    "ScheduleMirror",
]
