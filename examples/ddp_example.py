"""DistributedDataParallel or FSDP2 (``fully_shard``) with the fused optimizer.

Nothing special is needed: build the optimizer on the wrapped model's
parameters. Under FSDP2 the parameters are DTensors and each rank steps its
local shard; every rank's step counter advances in lockstep (each rank runs
the same number of steps), so the schedule agrees across ranks without any
communication.

    torchrun --nproc_per_node 2 examples/ddp_example.py            # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 examples/ddp_example.py --fsdp2    # FSDP2, torch >= 2.6
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist

from onecycle_fused import FusedOneCycleAdamW


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp2", action="store_true", help="shard with torch.distributed.fsdp.fully_shard")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        # the rank's GPU before the group exists: NCCL binds to it (device_id),
        # and its barriers do not have to guess the device
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    if args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    opt = FusedOneCycleAdamW(model.parameters(), cycle_min_lr=1e-4, cycle_max_lr=3e-3,
                             cycle_first_step_size=max(1, args.steps // 2), weight_decay=0.01)

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for i in range(args.steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = torch.randn(16, 8, generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP / FSDP average the gradients across ranks
        opt.step()
        if rank == 0 and (i % 5 == 0 or i == args.steps - 1):
            print(f"step {i:3d}  loss {loss.item():.4f}  next lr {opt.get_last_lr()[0]:.2e}")
    dist.barrier()  # every rank done before any tears its process group down
    # DDP / FSDP hold the process group, so its gloo worker threads would live
    # on into interpreter shutdown, where one releasing the barrier's work
    # can abort the process ("terminate called without an active
    # exception", seen in 1 run of 5-10 on a loaded 2-core machine): release
    # them here, then the group's threads stop with it
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
