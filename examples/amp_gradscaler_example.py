"""A plain training loop with torch.amp autocast and GradScaler.

The fused optimizer takes GradScaler's ``grad_scale`` / ``found_inf`` on the
device: gradients are unscaled inside the fused step, and a step with inf/nan
gradients changes nothing, not even the schedule position (the step counter
counts applied steps only). No ``scheduler.step()`` call anywhere.

    python examples/amp_gradscaler_example.py            # CPU: bfloat16 autocast
    python examples/amp_gradscaler_example.py --steps 50 # on a GPU: float16 autocast
"""
import argparse

import torch

from onecycle_fused import FusedOneCycleAdamW


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device(args.device)
    # float16 needs the scaler; on CPU autocast runs in bfloat16 and the
    # scaler still exercises the same code path
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)).to(device)
    opt = FusedOneCycleAdamW(model.parameters(), cycle_min_lr=1e-4, cycle_max_lr=3e-3,
                             cycle_first_step_size=max(1, args.steps // 2), weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(256, 32, device=device)
    y = torch.randint(0, 10, (256,), device=device)

    for i in range(args.steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # the fused step unscales and skips on inf by itself
        scaler.update()
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {loss.item():.4f}  next lr {opt.get_last_lr()[0]:.2e}  "
                  f"applied steps {int(opt.step_counter())}")
    return model, opt


if __name__ == "__main__":
    main()
