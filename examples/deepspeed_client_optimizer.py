"""The fused optimizer as DeepSpeed's client optimizer:
``deepspeed.initialize(model=..., optimizer=ours, config=...)``.

Take the ``"scheduler"`` entry out of the DeepSpeed config and give it to the
optimizer (``schedule=schedule_from_config(config)``): the schedule then runs
inside the fused step and DeepSpeed must not drive a second one. DeepSpeed
calls ``optimizer.step()`` once per ``gradient_accumulation_steps`` micro
batches, so the schedule position counts optimizer steps, as DeepSpeed's own
``OneCycle`` does.

What runs where:
* fp32 with ZeRO stage 0 (this script, CPU or GPU): the engine calls our
  ``step()`` directly.
* ZeRO stages 1-3 and ``bf16`` / ``fp16`` wrap the client optimizer in
  DeepSpeed's partitioning / mixed-precision optimizers, which call our
  ``step()`` on fp32 (master) partitions: the fused step and its schedule
  apply there. ZeRO needs ``"zero_allow_untested_optimizer": true`` in the
  config for any client optimizer. fp32 ZeRO 1-3 and bf16 ZeRO 0-3 are tested
  on CPU (tests/test_trainers.py); fp16 is GPU-only (a ``gpu`` test).
* With ``bf16`` / ``fp16`` at ZeRO stage 0, DeepSpeed's wrapper runs one step
  on all-zero gradients while it is built (to create the optimizer state):
  that step counts, so training starts at schedule step 1. Call
  ``opt.set_step(0)`` after ``deepspeed.initialize`` to start at 0.

Checkpoints (``--save DIR`` / ``--resume DIR``): ``engine.save_checkpoint``
and, in a new process with the engine built the same way,
``engine.load_checkpoint`` resume the schedule where it stopped, with no extra
code: the step counter is part of the optimizer state that every ZeRO stage
saves and loads (``state_dict()['step_counter']``). DeepSpeed's universal
checkpoints (``ds_to_universal`` + ``"checkpoint": {"load_universal": true}``)
restore the per-parameter state without our ``load_state_dict``; the optimizer
then takes the position from the per-parameter ``step`` counts at the next
step or ``step_counter()`` / ``get_last_lr()`` call. Tested on CPU for ZeRO
0-3 in fp32 and bf16 (tests/test_trainers.py). ``load_checkpoint(...,
load_optimizer_states=False)`` loads the weights only: the optimizer state
starts afresh, and so does the schedule (at step 0, where DeepSpeed's own
scheduler would continue). To keep the schedule's position, call
``opt.set_step(engine.global_steps - engine.skipped_steps)`` after it.

CPU, one process (DeepSpeed picks its CPU accelerator when there is no GPU):

    python examples/deepspeed_client_optimizer.py
    python examples/deepspeed_client_optimizer.py --save ckpt   # 10 optimizer steps
    python examples/deepspeed_client_optimizer.py --resume ckpt # steps 11-20
or, several processes:
    deepspeed --num_gpus 2 examples/deepspeed_client_optimizer.py
"""
import argparse
import os

import torch

import deepspeed
from onecycle_fused import FusedOneCycleAdamW, schedule_from_config

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 10**9,
    "scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 5,
        "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}},
}


def build(config=DS_CONFIG, seed=0):
    config = dict(config)
    schedule = schedule_from_config(config.pop("scheduler"))  # ours runs it, DeepSpeed does not
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    opt = FusedOneCycleAdamW(model.parameters(), schedule=schedule, weight_decay=0.01)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def batches(n, batch_size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 16, generator=gen), torch.randn(batch_size, 4, generator=gen)) for _ in range(n)]


def train(engine, data):
    for x, y in data:
        x, y = x.to(engine.device), y.to(engine.device)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)  # divides by gradient_accumulation_steps
        engine.step()  # calls optimizer.step() at accumulation boundaries
    return engine


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batches", type=int, default=20)
    parser.add_argument("--save", metavar="DIR", help="engine.save_checkpoint(DIR) after training")
    parser.add_argument("--resume", metavar="DIR", help="engine.load_checkpoint(DIR) before training")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29513")):
        os.environ.setdefault(key, value)  # a single process without a launcher
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    engine, opt = build()
    if args.resume:
        engine.load_checkpoint(args.resume)  # weights, optimizer state and the schedule's position
    train(engine, batches(args.micro_batches))
    if args.save:
        engine.save_checkpoint(args.save)
    print(f"optimizer steps {int(opt.step_counter())}, next lr {opt.get_last_lr()[0]:.3e}")
    return engine, opt


if __name__ == "__main__":
    main()
