"""Host time of one ``optimizer.step()``: onecycle_fused with and without its
step plan (``onecycle_fused/step_plan.py``), and torch's fused SGD / AdamW
with ``OneCycleLR.step()``, all in one run.

    python -m benchmarks.host_overhead                 # CPU
    python -m benchmarks.host_overhead --device cuda   # host CPU time per step on a GPU
    python -m benchmarks.host_overhead --device cuda --backend triton
    TRITON_INTERPRET=1 python -m benchmarks.host_overhead --backend triton --skip-kernels

Parameter sets: ResNet-50's 161 shapes but one element each, 5,000 tensors of
one element, 5,000 tensors of 4,096 elements (the issue-5 GPU target set),
and ResNet-50's real shapes with ``--full``. Grads stay in place (as with
``zero_grad(set_to_none=False)``). Each figure is the median over ``--iters``
steps after ``--warmup``.

What is timed: ``perf_counter`` around ``step()`` (plus ``scheduler.step()``
for torch). On CPU that is the whole step, kernels included (negligible for
one-element tensors). On CUDA nothing synchronises inside the timed region,
so it is the host's time to issue the step; the device is synchronised
between iterations, outside it, so the launch queue never fills up.
``plan: op`` is the plan's own call alone (``plan_op``): the rest of
``ours: plan`` is the Python around it.

``--backend triton`` (default: ``cpu`` on CPU, ``cuda`` on CUDA) times the
Triton backend's host side; on CPU that needs the interpreter, whose kernels
run on the host, so ``--skip-kernels`` replaces each launch by a no-op:
what is left is the Python and C++ around it (lists or plan, launch-table
key and lookup), the same code as on a GPU.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from onecycle_fused import FusedOneCycleAdamW, FusedOneCycleSGD
from benchmarks.param_sets import resnet50

SCHED = dict(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=10_000)


def param_sets(full: bool):
    sets = {
        "161 x 1 (ResNet-50 count)": [(1,)] * len(resnet50()),
        "5000 x 1": [(1,)] * 5000,
        "5000 x 4096": [(4096,)] * 5000,
    }
    if full:
        sets["ResNet-50 shapes"] = resnet50()
    return sets


def make_params(shapes, device):
    params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    return params


def time_steps(step, device, warmup, iters):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        sync()
    return statistics.median(times)


def ours(algo, shapes, device, plan, backend):
    params = make_params(shapes, device)
    cls = FusedOneCycleSGD if algo == "sgd" else FusedOneCycleAdamW
    kw = dict(momentum=0.9) if algo == "sgd" else {}
    opt = cls(params, backend=backend, **SCHED, **kw)
    opt._step_plan_enabled = plan
    return opt.step, opt


def plan_op(opt):
    """The planned step without the optimizer's Python around it: the plan's
    own call (C++ for cpu and cuda: the grads gathered, the op's checks, the
    launch), as ``step()`` makes it. What is left of ``ours: plan`` is
    Python: torch.optim's step wrapper (profiler range, hooks, no_grad) and
    ours (hyper-parameter and plan checks, the lr mirror). Steps the device
    counters and not the host's mirror: the optimizer is not stepped again."""
    from onecycle_fused import step_plan

    [(device, plan)] = opt._plan.plans
    table, counter = opt._tables[device], opt._counters[device]

    def step():
        if not step_plan.run_planned(plan, table, counter, None, None):
            raise RuntimeError("the plan no longer fits")

    return step


def torch_fused(algo, shapes, device):
    params = make_params(shapes, device)
    if algo == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1_000_000)

    def step():
        opt.step()
        sched.step()

    return step


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--full", action="store_true", help="also ResNet-50's real shapes")
    ap.add_argument("--algos", default="sgd,adamw")
    ap.add_argument("--backend", choices=("cpu", "cuda", "triton"), default=None,
                    help="ours: default cpu on CPU, cuda on CUDA")
    ap.add_argument("--skip-kernels", action="store_true",
                    help="triton: launch nothing (host side only; for the interpreter on CPU)")
    ap.add_argument("--python-key", action="store_true",
                    help="triton: the launch-table key in Python, as when _C did not load (then no plans)")
    return ap.parse_args(argv)


def skip_triton_kernels() -> None:
    """Every Triton launch of the backend becomes a no-op (``--skip-kernels``)."""
    from onecycle_fused.backends import triton as tb

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for algo in tb._KERNELS:
        tb._KERNELS[algo] = NoLaunch()
    tb.K.advance_kernel = NoLaunch()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    if args.skip_kernels:
        if backend != "triton":
            raise SystemExit("--skip-kernels is for --backend triton")
        skip_triton_kernels()
    if args.python_key:
        if backend != "triton":
            raise SystemExit("--python-key is for --backend triton")
        from onecycle_fused.backends import triton as tb

        tb._launch_key = None
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, ours: backend {backend}"
          + (" (kernels skipped)" if args.skip_kernels else "") + (" (key in Python)" if args.python_key else "")
          + "; median host time per step (us)")
    if args.skip_kernels and device.type == "cpu":
        print("(torch's CPU steps include their kernels, ours do not: plan/torch means something only for the "
              "one-element sets)")
    print(f"{'set':28} {'algo':6} {'torch fused+sched':>18} {'ours: lists':>12} {'ours: plan':>11} "
          f"{'plan/torch':>10} {'plan/lists':>10} {'plan: op':>9}")
    for name, shapes in param_sets(args.full).items():
        for algo in args.algos.split(","):
            iters = args.iters if len(shapes) < 1000 or shapes[0] == (1,) else max(20, args.iters // 5)
            t_torch = time_steps(torch_fused(algo, shapes, device), device, args.warmup, iters)
            t_list = time_steps(ours(algo, shapes, device, False, backend)[0], device, args.warmup, iters)
            step, opt = ours(algo, shapes, device, True, backend)
            t_plan = time_steps(step, device, args.warmup, iters)
            assert args.python_key or opt._plan.planned_steps >= args.warmup + iters - 1, "the plan was not used"
            t_op = time_steps(plan_op(opt), device, args.warmup, iters) if opt._plan.plans else math.nan
            print(f"{name:28} {algo:6} {t_torch * 1e6:18.1f} {t_list * 1e6:12.1f} {t_plan * 1e6:11.1f} "
                  f"{t_plan / t_torch:10.2f} {t_plan / t_list:10.2f} {t_op * 1e6:9.1f}")


if __name__ == "__main__":
    main()
