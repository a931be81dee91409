"""The benchmark suite, one command: ``python -m benchmarks.run`` (``--help`` for options).

Measures one optimizer step (update + 1-Cycle schedule) of torch.optim foreach
/ fused with a host scheduler, the compiled optimizer, and every onecycle_fused
backend available here (plus CUDA-graph replay on a GPU), side by side on
real-model parameter sets, each first checked on a small probe against a
float64 torch.optim reference (``agreement.py``: a row that computes the wrong
step is marked and never used as a peer), after a small end-to-end training
run (first, before any profiler session); then evaluates the targets. Prints a
table and writes results.json, results.md and PNG plots under
``benchmarks/results/<device>_<date>/``.

Defaults follow the hardware: on CPU the ResNet-50 and small-tensor sets with
SGD, Adam and AdamW (a few minutes on 2 cores); on CUDA every set with SGD and
AdamW. Giving ``--out`` an existing results folder merges the new rows into it
(e.g. a GPU run split over several commands).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

import onecycle_fused

from . import agreement
from . import e2e as e2e_mod
from . import impls as impls_mod
from . import measure, param_sets, report, targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HERE = os.path.dirname(os.path.abspath(__file__))


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    p.add_argument("--sets", default=None, help=f"comma list of {sorted(param_sets.SETS)}, or none (the "
                   "end-to-end run only) (default: resnet50,small on CPU; resnet50,gpt2,llama1b,small on CUDA)")
    p.add_argument("--opt", default=None, help="comma list of sgd,adam,adamw (default: sgd,adam,adamw on CPU; sgd,adamw on CUDA)")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    p.add_argument("--impls", default=None, help="only implementations whose name contains one of these comma-separated "
                   "substrings (default: all but the slow per-tensor 'ours-reference' oracle, which runs only when named)")
    p.add_argument("--skip-impls", default="", help="leave out implementations whose name contains one of these")
    p.add_argument("--quick", action="store_true", help="tiny set, few iterations: a smoke run (seconds)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, the first included (default 2 CPU, 10 CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed steps at most (default 15 CPU, 100 CUDA)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed steps per implementation before "
                   "stopping early (at least 3 steps; default 2.5 CPU, 5 CUDA)")
    p.add_argument("--compiled-max-tensors", type=int, default=None, help="skip torch.compile on sets with more "
                   "tensors (its compile time grows with the count; default 200 CPU, 1000 CUDA: the 5,000-tensor set "
                   "needs --compiled-max-tensors 5000)")
    p.add_argument("--e2e-steps", type=int, default=None, help="end-to-end training steps, 0 to skip (default 60 CPU, 500 CUDA)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>_<date>); "
                   "an existing one is merged into")
    p.add_argument("--note", action="append", default=[], help="a note stored with the results (repeatable)")
    p.add_argument("--interleave", default="auto", choices=["auto", "on", "off"],
                   help="time a case's implementations in interleaved rounds, so that a change in the machine's state "
                   "falls on all of them alike (CPU: one step each per round; CUDA: a block of back-to-back steps "
                   "each). auto: each case whose implementations' states fit in free memory together (on an "
                   "H100 all but the 1B set's; on CPU the default sets), the others back to back, each freed before "
                   "the next")
    p.add_argument("--min-time", type=float, default=None, help="CUDA: seconds of timed steps per implementation at "
                   "least, with more steps than --iters (up to 20x) when they are fast (default 0.25; 0 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} x{os.cpu_count()}"


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


def _gpu(device: torch.device):
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def metadata(device: torch.device, argv) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.run " + " ".join(argv),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "deepspeed": _version("deepspeed"),
        "onecycle_fused": onecycle_fused.__version__,
        "backends": onecycle_fused.available_backends(),
        "git": _git(),
        "load_avg_start": _loadavg(),
        "gpu": _gpu(device),
        "notes": [],
    }


def default_out(device: torch.device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    base = os.path.join(HERE, "results", f"{_slug(device_name(device))}_{date}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}_{n}"
    return path


def _selected(impl: impls_mod.Impl, include, exclude, device) -> bool:
    if any(x in impl.name for x in exclude):
        return False
    if include is None:
        return impl.name != "ours-reference"  # the oracle is per-tensor and slow: only when named
    return any(x in impl.name for x in include)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_params(shapes, dtype, device, seed=0):
    """One tensor per shape (separate allocations, as in a model), grads set once."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, dtype=dtype, device=device, generator=g).requires_grad_()
        p.grad = torch.randn(s, dtype=dtype, device=device, generator=g).mul_(1e-2)
        params.append(p)
    return params


_error = measure.error_text


def _recompiles(row: dict, before: tuple[int, int]) -> None:
    """Record how many graphs a compiled row compiled after its warm-up, in
    the timed stretch (0 expected), and whether dynamo gave up on a frame of
    it (its recompile limit, from the first step on): then the timed steps
    ran that frame eagerly, and the row is not the compiled step it names.
    ``before``: dynamo's graph count after the warm-up and its limit count
    before the build (only compiled rows compile, so the global counts are
    theirs)."""
    graphs, hits = before
    n, limit_hits = measure.dynamo_graphs() - graphs, measure.dynamo_limit_hits() - hits
    row["recompiles_after_warmup"] = n
    row["recompile_limit_hit"] = bool(limit_hits)
    if n:
        _add_note(row, f"RECOMPILED {n}x after warm-up (its timings include compile time)")
    if limit_hits:
        _add_note(row, "hit torch._dynamo's recompile limit: runs eagerly past it, not compiled "
                       "(a scheduler-written Python float guarded on every step)")


def _add_note(row: dict, text: str) -> None:
    row["note"] = (row["note"] + "; " if row["note"] else "") + text


def _count_launches(row: dict, step, device) -> None:
    """Add the launch counts (torch.profiler, CUDA) to a timed row. A profiler
    that fails (CUPTI refused, a session left open) costs the launch columns,
    never the row's timings: raised out of the timing ``try`` it would mark a
    measured row as an error, and an error in ours fails every target."""
    t0 = time.perf_counter()
    try:
        counts = measure.count_launches(step, device)
    except Exception as e:
        counts = {"launches_per_step": None, "kernels_per_step": None, "copies_per_step": None,
                  "launches_note": f"launches not counted: torch.profiler failed: {_error(e)}"}
    # what a profiler session costs (CUPTI set up and torn down each time on
    # some torch/CUDA pairs): sizes the GPU session's step limits
    counts["profile_s"] = round(time.perf_counter() - t0, 3)
    row.update(counts)
    if counts.get("launches_note"):
        _add_note(row, counts["launches_note"])


_T0 = time.perf_counter()  # (the import: the run's start, for the --no-progress lines)


def _status(progress, text: str) -> None:
    """What the run is doing: the progress bar's postfix, or with --no-progress
    a timestamped line on stderr (a log cut by a time limit then says which
    implementation took the time, e.g. a cold torch.compile)."""
    if progress.disable:
        print(f"[{time.perf_counter() - _T0:7.1f} s] {text}", file=sys.stderr, flush=True)
    else:
        progress.set_postfix_str(text, refresh=True)


def _interleaves(cfg, device, algo, numel, dtype, nbytes, n_impls) -> bool:
    """Whether a case's implementations are built together and timed in
    interleaved rounds (``cfg["interleave"]``: True, False or "auto"). Auto:
    when every implementation's states, counted twice (a compiled step's
    buffers, a graph's memory pool), and the copy's two buffers fit in half
    the free memory of the device (on CPU, of the host): not the 1B set's on
    an H100 (~9 GB of AdamW states per implementation in fp32), nor GPT-2's
    or the 1B set's on a small host, which would otherwise be killed for
    memory. The default sets (CPU: ResNet-50 and the small tensors) fit."""
    mode = cfg["interleave"]
    if mode != "auto":
        return bool(mode)
    need = n_impls * 2 * measure.state_bytes(algo, numel, dtype) + nbytes
    return need < measure.free_bytes(device) // 2


def bench_case(set_name, shapes, dtype_name, algo, params, impl_list, device, cfg, progress) -> list[dict]:
    """Every implementation on one (set, dtype, optimizer) case, plus the copy roofline.

    Interleaved (:func:`_interleaves`): all are built first and timed in
    rounds together with the copy, so a change in the machine's state falls
    on all of them alike (``measure.time_interleaved`` on CPU, one step each
    per round; ``measure.time_rounds`` on CUDA, a block of back-to-back steps
    each). Otherwise (the 1B set on a GPU, whose states would not fit all at
    once) each is built, timed back to back and freed in turn.
    """
    dtype = DTYPES[dtype_name]
    numel = param_sets.numel(shapes)
    nbytes = measure.bytes_per_step(algo, numel, dtype)
    interleave = _interleaves(cfg, device, algo, numel, dtype, nbytes, len(impl_list))
    base = {"set": set_name, "n_tensors": len(shapes), "n_params": numel, "dtype": dtype_name, "opt": algo,
            "bytes_per_step": nbytes, "interleaved": interleave}
    min_time = cfg.get("min_time", 0.0)
    if not interleave:
        try:
            base.update(measure.copy_roofline(nbytes, device, cfg["warmup"], cfg["iters"], cfg["budget"], min_time))
        except Exception as e:  # (e.g. out of memory next to the 1B set) the case's rows are still measured
            base.update(copy_ms=None, copy_gbps=None, copy_capped=None, copy_note=f"copy not measured: {_error(e)}")
        _free(device)  # the copy's two buffers (up to half the free memory) back to the device
    rows, built, compile_counts = [], {}, {}
    for impl in impl_list:
        _status(progress, f"{set_name}/{dtype_name}/{algo}: {impl.name}")
        row = dict(base, impl=impl.name, family=impl.family, scheduler=impl.scheduler, backend=impl.backend,
                   status="ok", note="")
        rows.append(row)
        step = None
        row_t0 = time.perf_counter()
        try:
            if impl.backend is not None:
                why = impls_mod.ours_status(impl.backend, device, dtype)
                if why:
                    raise impls_mod.Skip(why)
            if impl.family == "torch-compiled" and len(shapes) > cfg["compiled_max_tensors"]:
                raise impls_mod.Skip(f"{len(shapes)} tensors > --compiled-max-tensors {cfg['compiled_max_tensors']} "
                                     "(compile time)")
            # first: does it compute the step it is timed for?
            row.update(agreement.check(impl, algo, dtype, device))
            if row["agrees"] is False:
                row["note"] = row["agreement_note"]
            limit_hits = measure.dynamo_limit_hits() if impl.family == "torch-compiled" else 0
            step = impl.build(params, algo, device)
            t0 = time.perf_counter()
            step()  # the first step: state allocation, compilation
            measure.sync(device)
            row["first_step_s"] = time.perf_counter() - t0
            _status(progress, f"{set_name}/{dtype_name}/{algo}: {impl.name} first step {row['first_step_s']:.2f} s")
            if impl.family == "torch-compiled":
                # the warm-up steps first (a changed Python float may compile a
                # second, dynamic graph on step 2), then count graphs: the timed
                # steps must compile none
                for _ in range(max(2, cfg["warmup"]) - 1):  # at least the second step, even with --quick
                    step()
                measure.sync(device)
                compile_counts[impl.name] = (measure.dynamo_graphs(), limit_hits)
            if interleave:
                built[impl.name] = step
            else:
                row.update(measure.time_steps(step, device, max(0, cfg["warmup"] - 1), cfg["iters"], cfg["budget"],
                                              min_time_s=min_time))
                if impl.name in compile_counts:
                    _recompiles(row, compile_counts[impl.name])
                _count_launches(row, step, device)
        except impls_mod.Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # one failing implementation must not sink the run
            row.update(status="error", note=_error(e))
        finally:
            if not interleave:
                step = None
                if impl.family == "torch-compiled":
                    torch._dynamo.reset()
                _free(device)
                # wall time of the row (probe, build, first step, timing, profiling): sizes the GPU
                # session's step limits
                row["row_s"] = round(time.perf_counter() - row_t0, 3)
        if not interleave or row["status"] != "ok":
            progress.update(1)
    if interleave:
        _status(progress, f"{set_name}/{dtype_name}/{algo}: timing {len(built)} interleaved")
        # the copy roofline joins the rounds: the same bytes, the same background load
        n = max(1, nbytes // 2)
        src = dst = None
        copy_note = None
        try:
            src = torch.ones(n, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            built["__copy__"] = lambda: dst.copy_(src)
        except Exception as e:  # (out of memory beside every implementation's states) the rows are still timed
            copy_note = f"copy not measured: {_error(e)}"
        if device.type == "cuda":
            stats, errors = measure.time_rounds(built, device, max(0, cfg["warmup"] - 1), cfg["iters"], cfg["budget"],
                                                min_time_s=min_time)
        else:
            stats, errors = measure.time_interleaved(built, device, max(0, cfg["warmup"] - 1), cfg["iters"],
                                                     cfg["budget"])
        copy = stats.pop("__copy__", None)
        if copy is None and copy_note is None:
            copy_note = f"copy not measured: {errors.pop('__copy__', 'no time')}"
        n_timed = len(built) - ("__copy__" in built)
        for row in rows:
            if copy is not None:
                row.update(copy_ms=copy["median_ms"], copy_gbps=2 * n / (copy["median_ms"] / 1e3) / 1e9,
                           copy_capped=False)
            else:
                row.update(copy_ms=None, copy_gbps=None, copy_capped=None, copy_note=copy_note)
            if row["impl"] in errors:
                row.update(status="error", note=errors[row["impl"]])
            elif row["impl"] in stats:
                row.update(stats[row["impl"]])
                if row["impl"] in compile_counts:
                    _recompiles(row, compile_counts[row["impl"]])
                _count_launches(row, built[row["impl"]], device)
        del src, dst
        built.clear()
        torch._dynamo.reset()
        _free(device)
        progress.update(n_timed)
    for row in rows:
        if row["status"] == "ok":
            row["gbps"] = measure.gbps(nbytes, row["median_ms"])
            row["frac_of_copy"] = row["copy_ms"] / row["median_ms"] if row.get("copy_ms") else None
    report.fill_vs_fused(rows)  # (again over all rows after a merge, see main)
    return rows


def _load(out_dir):
    """The results.json already in ``out_dir`` (rows of earlier runs to merge into), or None."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


INCOMPLETE = "INCOMPLETE: "  # (the checkpoint note of a run still going, or cut short)
EARLIER_CUT = "an earlier run into this folder was cut short, its finished cases kept: "


def _merge(old, meta, rows, e2e):
    if old is None:
        return meta, rows, e2e
    keys = {(r["set"], r["dtype"], r["opt"], r["impl"]) for r in rows}
    kept = [r for r in old["rows"] if (r["set"], r["dtype"], r["opt"], r["impl"]) not in keys]
    meta = dict(meta)
    meta["command"] = old["meta"]["command"] + "  &&  " + meta["command"]
    # an earlier run's checkpoint note speaks of that run: merged with a later
    # one (which may have measured what it lacked), it says so in the past
    earlier = [EARLIER_CUT + n[len(INCOMPLETE):] if n.startswith(INCOMPLETE) else n
               for n in old["meta"].get("notes", [])]
    meta["notes"] = list(dict.fromkeys(earlier + meta["notes"]))
    before, now = old["meta"].get("device_name"), meta.get("device_name")
    if before and now and before != now:
        # (a GPU phase that found its machine gone may start on another kind):
        # the header names the last device only, so say that rows differ
        meta["notes"].append(f"rows from runs on different devices: {before} (earlier) and {now} (merged in); "
                             "compare rows within a case only")
    return meta, kept + rows, e2e if e2e is not None else old.get("e2e")


def _write(out_dir, old, meta, rows, e2e, device_type, plots, partial=None):
    """Merge with the folder's earlier rows and write results.json / .md (and plots).

    ``partial`` (a note) marks a checkpoint written after each case, so a run
    cut short (the GPU session's per-step timeouts) leaves the cases it
    finished; the final write replaces it.
    """
    meta, rows, e2e = _merge(old, meta, [dict(r) for r in rows], e2e)
    if partial:
        meta = dict(meta, notes=meta["notes"] + [partial])
    if plots:  # (an earlier run's "plots skipped" no longer holds)
        meta = dict(meta, notes=[n for n in meta["notes"] if n != report.NO_PLOTS_NOTE])
    report.fill_vs_fused(rows)  # rows of earlier runs merged in may hold the peer, or lack the column
    targ = targets.evaluate(device_type, rows, e2e)
    report.write_all(out_dir, meta, rows, targ, e2e, plots=plots)
    return meta, rows, e2e, targ


def _run_e2e(device, steps):
    """The end-to-end run; an exception is recorded in its place (the step-time rows must still be written)."""
    try:
        return e2e_mod.run(device, steps)
    except Exception as e:
        import traceback

        traceback.print_exc()
        return {"steps": steps, "error": _error(e), "variants": {}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device in this process")
    on_gpu = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sets = [] if args.sets == "none" else _csv(args.sets) if args.sets else (["tiny"] if args.quick else
                                              ["resnet50", "gpt2", "llama1b", "small"] if on_gpu else ["resnet50", "small"])
    opts = _csv(args.opt) if args.opt else (["sgd", "adamw"] if on_gpu else ["sgd", "adam", "adamw"])
    dtypes = _csv(args.dtype)
    for name in sets:
        param_sets.get(name)  # raises ValueError on a bad name
    for o in opts:
        if o not in measure.BYTES_PER_PARAM_FP32:
            raise SystemExit(f"--opt must name sgd, adam or adamw, got {o!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype must name {', '.join(DTYPES)}, got {d!r}")
    cfg = {
        "warmup": args.warmup if args.warmup is not None else (1 if args.quick else 10 if on_gpu else 2),
        "iters": args.iters if args.iters is not None else (3 if args.quick else 100 if on_gpu else 15),
        "budget": args.budget if args.budget is not None else (1.0 if args.quick else 5.0 if on_gpu else 2.5),
        "compiled_max_tensors": args.compiled_max_tensors if args.compiled_max_tensors is not None else
        (1000 if on_gpu else 200),
        "min_time": args.min_time if args.min_time is not None else (0.0 if args.quick or not on_gpu else 0.25),
        "interleave": "auto" if args.interleave == "auto" else args.interleave == "on",
    }
    e2e_steps = args.e2e_steps if args.e2e_steps is not None else (10 if args.quick else 500 if on_gpu else 60)
    include = _csv(args.impls) if args.impls else None
    everything = impls_mod.all_impls(device)
    impl_list = [i for i in everything if _selected(i, include, _csv(args.skip_impls), device)]
    unmatched = [x for x in include or () if not any(x in i.name for i in everything)]
    if unmatched:  # a typo would otherwise run nothing, or less, and say nothing
        raise SystemExit(f"--impls {', '.join(map(repr, unmatched))} matches no implementation; they are: "
                         f"{', '.join(i.name for i in everything)}")
    if sets and not impl_list:
        raise SystemExit("--impls / --skip-impls leave no implementation to run")

    meta = metadata(device, argv)
    meta["config"] = dict(cfg, sets=sets, opts=opts, dtypes=dtypes, e2e_steps=e2e_steps)
    meta["notes"] += args.note
    if not on_gpu:
        meta["notes"].append(f"CPU run: {os.cpu_count()} cores; timings are medians, other processes may share the cores.")
    out_dir = args.out or default_out(device)

    from tqdm import tqdm

    total = len(sets) * len(dtypes) * len(opts) * len(impl_list)
    n_cases, done = len(sets) * len(dtypes) * len(opts), 0
    old = _load(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if args.no_plots:
        meta["notes"].append(report.NO_PLOTS_NOTE)
    print(f"{meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | "
          f"backends {meta['backends']}", flush=True)
    rows = []
    e2e = None
    if e2e_steps > 0:
        # first, before any torch.profiler session (the cases count launches
        # with it): its hooks outlived a session in some torch versions and
        # slowed launches (pytorch#144455), the eager variants more than the graph
        print("end-to-end run...", file=sys.stderr)
        e2e = _run_e2e(device, e2e_steps)
    with tqdm(total=total, desc="benchmarks", unit="impl", disable=args.no_progress, file=sys.stderr) as progress:
        for set_name in sets:
            shapes = param_sets.get(set_name)
            for dtype_name in dtypes:
                params = make_params(shapes, DTYPES[dtype_name], device)
                for algo in opts:
                    case_rows = bench_case(set_name, shapes, dtype_name, algo, params, impl_list, device, cfg, progress)
                    rows += case_rows
                    done += 1
                    progress.write(report.text_table(case_rows), file=sys.stdout)
                    sys.stdout.flush()
                    # a checkpoint: a run cut short still leaves the cases it finished
                    _write(out_dir, old, meta, rows, e2e, device.type, plots=False,
                           partial=f"{INCOMPLETE}checkpoint after {done} of {n_cases} cases (the run did not finish)")
                del params
                _free(device)

    meta["load_avg_end"] = _loadavg()
    meta, all_rows, e2e, targ = _write(out_dir, old, meta, rows, e2e, device.type, plots=not args.no_plots)
    if len(all_rows) > len(rows):
        print(f"({len(all_rows) - len(rows)} rows of earlier runs in {out_dir} merged: see results.md)")
    print("End-to-end:")
    print(report.e2e_text(e2e))
    print()
    print("Targets (" + ("issue 5, GPU" if on_gpu else "issue 3, CPU") + "):")
    print(report.targets_text(targ))
    print(f"\nwrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
