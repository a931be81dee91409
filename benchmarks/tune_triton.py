"""Tune the Triton backend's launch configuration by measurement (needs a GPU).

For each algorithm, dtype and parameter set, every (block, iters, num_warps)
in the grid is timed as CUDA-graph replays of one whole optimizer step (so
host overhead is out and only the kernel counts), median over repeats, next
to a device-to-device copy of the same number of bytes (the roofline). The
table goes to stdout and, with ``--out``, to a file with the device, torch,
triton and CUDA versions, for ``benchmarks/results/``.

    python benchmarks/tune_triton.py --out benchmarks/results/triton_tuning_h100.txt
    python benchmarks/tune_triton.py --algos sgd --dtypes bf16 --sets resnet50 --full

The default grid (18 configurations, every algo/dtype, ResNet-50 and GPT-2
sets) takes about 10 minutes on an H100, most of it compiling the kernel
variants; ``--full`` (80 configurations) several times that.

The last lines print the ``TritonBackend.configure(...)`` calls for the best
configuration per dtype (fastest summed over the algorithms and sets timed):
copy them into ``_Launcher.__init__`` in ``onecycle_fused/backends/triton.py``
together with the measured numbers.

Not run in CI (no GPU); the argument parsing and the grid are exercised by
``--dry-run``, which prints the configurations it would time.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.param_sets import SETS  # noqa: E402
from onecycle_fused import FusedOneCycleAdam, FusedOneCycleAdamW, FusedOneCycleSGD  # noqa: E402

OPTIMIZERS = {"sgd": FusedOneCycleSGD, "adam": FusedOneCycleAdam, "adamw": FusedOneCycleAdamW}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DEFAULT_DTYPES = ["fp32", "bf16", "fp16"]  # (fp64 when asked: rarely trained in, not worth a GPU session's minutes)
# tensors touched per parameter: SGD-momentum reads p, g, buf, writes p, buf;
# Adam/AdamW read p, g, m, v, write p, m, v
TENSOR_PASSES = {"sgd": 5, "adam": 7, "adamw": 7}
SCHEDULE = dict(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=1000)

BLOCKS = (256, 512, 1024, 2048, 4096)
ITERS = (1, 2, 4, 8, 16)
WARPS = (2, 4, 8, 16)
DEFAULT_GRID = dict(blocks=(512, 1024, 2048), iters=(2, 4, 8), warps=(4, 8))


def grid(blocks, iters, warps):
    """Configurations worth timing: at least one and at most 16 elements per thread
    per block, chunks of 256 to 65536 elements."""
    for b, it, w in itertools.product(blocks, iters, warps):
        per_thread = b // (32 * w)
        if 1 <= per_thread <= 16 and 256 <= b * it <= 65536:
            yield b, it, w


def _median_ms(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_config(algo, dtype, shapes, repeats, inner):
    """Milliseconds per step (graph replay) for the current launch configuration."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    kwargs = dict(SCHEDULE)
    if algo == "sgd":
        kwargs["nesterov"] = True
    opt = OPTIMIZERS[algo](params, backend="triton", **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, allocate state, build the launch table
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.replay()
    torch.cuda.synchronize()
    ms = _median_ms(graph.replay, repeats, inner)
    del graph, opt, params
    return ms


def copy_ms(nbytes: int, repeats: int, inner: int) -> float:
    """A device-to-device copy moving ``nbytes`` in total (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), repeats, inner)


def versions() -> str:
    props = torch.cuda.get_device_properties(0)
    import triton

    return (f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"triton {triton.__version__}, CUDA {torch.version.cuda}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES, choices=list(DTYPES))
    ap.add_argument("--sets", nargs="+", default=["resnet50", "gpt2"], choices=sorted(SETS))
    ap.add_argument("--full", action="store_true", help="the large grid (80 configurations)")
    ap.add_argument("--repeats", type=int, default=7, help="medians over this many timed runs")
    ap.add_argument("--inner", type=int, default=20, help="graph replays per timed run")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
    args = ap.parse_args(argv)

    space = dict(blocks=BLOCKS, iters=ITERS, warps=WARPS) if args.full else DEFAULT_GRID
    configs = list(grid(space["blocks"], space["iters"], space["warps"]))
    if args.dry_run:
        print(f"{len(configs)} configurations x {len(args.algos)} algos x {len(args.dtypes)} dtypes x {len(args.sets)} sets")
        for c in configs:
            print("block=%d iters=%d num_warps=%d" % c)
        return 0
    if not torch.cuda.is_available():
        print("tune_triton.py needs a CUDA device", file=sys.stderr)
        return 2

    from onecycle_fused.backends.triton import TritonBackend

    lines = [versions(), ""]
    header = f"{'algo':6} {'dtype':5} {'set':9} {'block':>5} {'iters':>5} {'warps':>5} {'ms':>8} {'GB/s':>7} {'copy%':>6}"
    lines.append(header)
    print("\n".join(lines), flush=True)
    totals: dict = {}  # (dtype, config) -> summed ms over algos and sets
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        saved = TritonBackend.launch_config(dtype)
        try:
            for algo, set_name in itertools.product(args.algos, args.sets):
                shapes = SETS[set_name]()
                numel = sum(torch.Size(s).numel() for s in shapes)
                nbytes = TENSOR_PASSES[algo] * numel * torch.empty((), dtype=dtype).element_size()
                roof = copy_ms(nbytes, args.repeats, args.inner)
                rows = []
                for block, iters, warps in configs:
                    TritonBackend.configure(dtype, block=block, iters=iters, num_warps=warps)
                    ms = time_config(algo, dtype, shapes, args.repeats, args.inner)
                    totals[(dtype_name, block, iters, warps)] = totals.get((dtype_name, block, iters, warps), 0) + ms
                    rows.append((ms, block, iters, warps))
                for ms, block, iters, warps in sorted(rows):
                    line = (f"{algo:6} {dtype_name:5} {set_name:9} {block:5d} {iters:5d} {warps:5d} {ms:8.3f} "
                            f"{nbytes / ms / 1e6:7.0f} {100 * roof / ms:5.0f}%")
                    lines.append(line)
                    print(line, flush=True)
                line = f"{'copy':6} {dtype_name:5} {set_name:9} {'':5} {'':5} {'':5} {roof:8.3f} {nbytes / roof / 1e6:7.0f}  100%"
                lines.append(line)
                print(line, flush=True)
        finally:
            TritonBackend.configure(dtype, saved.block, saved.iters, saved.num_warps)

    lines.append("")
    lines.append("# best per dtype (summed over the algorithms and sets above):")
    for dtype_name in args.dtypes:
        best = min((ms, key) for key, ms in totals.items() if key[0] == dtype_name)
        _, (_, block, iters, warps) = best
        lines.append(f"TritonBackend.configure(torch.{DTYPES[dtype_name]}, block={block}, iters={iters}, num_warps={warps})"
                     .replace("torch.torch.", "torch."))
    print("\n".join(lines[-1 - len(args.dtypes):]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
