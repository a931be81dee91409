"""A stand-in lr scheduler for trainers that insist on one."""
from __future__ import annotations

import torch


class ScheduleMirror(torch.optim.lr_scheduler.LRScheduler):
    """Changes nothing, reports the truth.

    Trainers such as Hugging Face's ``Trainer`` build their own lr scheduler
    when given none and log *its* values. The fused optimizers compute lr on
    the device and ignore ``param_groups[i]['lr']``, so the math is right
    either way, but the log is not. Pass ``ScheduleMirror(opt)`` as the
    scheduler: its ``get_last_lr()`` is the lr of the next fused step.
    """

    def __init__(self, optimizer):
        self.fused = optimizer
        super().__init__(optimizer)

    def get_lr(self):
        return self.fused.get_last_lr()

    def state_dict(self):
        # torch's would hold every attribute but the optimizer, so ours too:
        # a checkpoint pickling the whole optimizer, which a trainer's
        # torch.load(weights_only=True) refuses on resume. The schedule's
        # position is in the optimizer's state_dict.
        return {k: v for k, v in super().state_dict().items() if k != "fused"}
