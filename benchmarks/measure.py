"""Timing primitives: back-to-back step times, host CPU time, launch counts, the copy roofline.

One code path for CPU and CUDA. On CUDA, step times come from events
recorded between back-to-back steps (no synchronisation inside the timed
stretch), so a host-bound implementation shows its host time and a
device-bound one its kernel time, as a training loop would see them.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import statistics
import time
from typing import Callable, Optional

import torch

# bytes moved per parameter per step at fp32 (the bytes model of issue 5): SGD-momentum
# reads p, g, buf and writes p, buf; Adam/AdamW read p, g, m, v and write p, m, v
BYTES_PER_PARAM_FP32 = {"sgd": 20, "adam": 28, "adamw": 28}


def bytes_per_step(algo: str, numel: int, dtype: torch.dtype) -> int:
    """Bytes one step must move: params, grads and states all in ``dtype``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return BYTES_PER_PARAM_FP32[algo] * numel * elem // 4


# optimizer states per parameter: SGD's momentum buffer; Adam's two moments
STATES_PER_PARAM = {"sgd": 1, "adam": 2, "adamw": 2}


def state_bytes(algo: str, numel: int, dtype: torch.dtype) -> int:
    """Bytes of one optimizer's states, kept in the parameters' ``dtype``."""
    return STATES_PER_PARAM[algo] * numel * torch.empty((), dtype=dtype).element_size()


def dynamo_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far: a
    rise while a compiled step is timed means it recompiled after warm-up."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_limit_hits() -> int:
    """Times torch.compile (dynamo) gave up recompiling a frame in this process
    so far (its ``recompile_limit``, once ``cache_size_limit``): past it the
    frame runs eagerly, uncompiled, and says so only in a logged warning. An
    optimizer whose step guards on a Python float that a scheduler changes
    every step gets there (torch's foreach SGD on its ``momentum``)."""
    from torch._dynamo.utils import counters

    # counted under the graph-break type's name, which has changed wording
    # between torch versions ("recompile limit", "cache size limit")
    return sum(n for reason, n in counters["unimplemented"].items()
               if re.search(r"(recompile|cache)[ _](size[ _])?limit", reason, re.IGNORECASE))


def error_text(e: BaseException) -> str:
    """An exception as a row's one-line note: its type and the first line
    of its message, cut at 200 characters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection inside a timed stretch (as ``timeit``):
    a collection pass over the process's objects (torch's and dynamo's are
    many) lands on whichever step triggers it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _cuda_step_times(step: Callable[[], object], device: torch.device, iters: int, budget_s: float,
                     min_iters: int = 3, min_time_s: float = 0.0, max_iters: Optional[int] = None,
                     chunk: int = 10) -> list[float]:
    """Seconds per step of back-to-back steps on CUDA, from events recorded
    between them (no synchronisation inside a chunk). At least ``iters``
    steps, and more (up to ``max_iters``) until ``min_time_s`` seconds of
    steps were timed; fewer (at least ``min_iters``) once ``budget_s`` wall
    seconds passed.

    Each chunk of ``chunk`` steps follows a synchronisation, so its first
    step would start on an idle device and carry the host's time to issue it
    on top of its own: one untimed lead step goes first, and the timed ones
    find work queued ahead of them as in a training loop. (Without it every
    tenth sample held the host's latency: p90 measured the chunking.)
    """
    max_iters = max(iters, max_iters or iters)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters:
        n = min(chunk, max_iters - len(times))
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        step()  # the lead step (see above)
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times += [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]
        if len(times) >= iters and sum(times) >= min_time_s:
            break
        if len(times) >= min_iters and time.perf_counter() - start > budget_s:
            break
    return times


def _cuda_host_times(step: Callable[[], object], device: torch.device, bursts: int,
                     burst_len: int = 1) -> tuple[list[float], list[float]]:
    """Host CPU seconds per step on CUDA, (the calling thread's, the
    process's), over ``bursts`` bursts of ``burst_len`` steps, each started
    after a synchronisation (see :func:`time_steps`)."""
    thread: list[float] = []
    process: list[float] = []
    for _ in range(bursts):
        torch.cuda.synchronize(device)
        c0, p0 = time.thread_time(), time.process_time()
        for _ in range(burst_len):
            step()
        thread.append((time.thread_time() - c0) / burst_len)
        process.append((time.process_time() - p0) / burst_len)
    torch.cuda.synchronize(device)
    return thread, process


def _stats(times: list[float], cpu: list[float], process: Optional[list[float]] = None) -> dict:
    """The row figures from per-step seconds (wall or device), host CPU
    seconds per step and, on CUDA, the process's host CPU seconds."""
    out = {
        "median_ms": statistics.median(times) * 1e3,
        "p10_ms": _percentile(times, 0.1) * 1e3,
        "p90_ms": _percentile(times, 0.9) * 1e3,
        "iters": len(times),
        "host_cpu_ms": statistics.median(cpu) * 1e3,
    }
    if process is not None:
        out["host_cpu_process_ms"] = statistics.median(process) * 1e3
        out["host_cpu_clock"] = "thread"
        if out["host_cpu_ms"] == 0.0 and out["host_cpu_process_ms"] > 0.0:
            # a thread clock that does not tick at this scale (a sandbox's
            # coarse accounting, say) would make every host ratio 0 or
            # undefined: the process's time then, marked
            out["host_cpu_ms"] = out["host_cpu_process_ms"]
            out["host_cpu_clock"] = "process"
    return out


def time_steps(
    step: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    budget_s: float,
    min_iters: int = 3,
    host_bursts: int = 25,
    burst_len: int = 1,
    min_time_s: float = 0.0,
) -> dict:
    """Median wall time per step over back-to-back steps, and host CPU time per step.

    Runs ``warmup`` steps, then up to ``iters`` timed steps, stopping early
    (after at least ``min_iters``) once ``budget_s`` seconds have passed.
    On CUDA, steps are timed with events (:func:`_cuda_step_times`), and
    more than ``iters`` of them (up to 20x) while less than ``min_time_s``
    seconds of steps were timed: a ResNet-50 step of 0.2 ms would otherwise
    be timed over 20 ms, where one hiccup of the machine moves the median.
    Host CPU time: on CPU ``time.process_time`` (all threads of the
    process: the kernels run there) over the timed steps themselves. On
    CUDA ``time.thread_time``, the CPU time of the thread that calls the
    step (where every implementation's host work happens), over bursts of
    ``burst_len`` steps, each started after a synchronisation, so a full
    launch queue cannot make the host spin inside the measurement; the
    process's CPU time over the same bursts is kept as
    ``host_cpu_process_ms``. The thread's: on the second H100 session the
    process's moved 3x between two runs of one case (torch fused 0.33-1.02
    ms), background threads (the CUDA driver's, CUPTI's after the previous
    row's launch count, OpenMP workers spinning after a CPU op) counted in.
    One step per burst by default: a device-bound step that launches
    hundreds of kernels (torch foreach on the 1B set: ~50 launches per
    foreach op, ~420 per AdamW step) fills the ~1,000-entry queue within 3
    steps, and the host's wait for the device would be counted as its CPU
    time. No garbage collection inside the timed stretches.
    """
    for _ in range(warmup):
        step()
    sync(device)
    with _gc_paused():
        if device.type == "cuda":
            times = _cuda_step_times(step, device, iters, budget_s, min_iters, min_time_s, 20 * iters)
            cpu, process = _cuda_host_times(step, device, host_bursts, burst_len)
            return _stats(times, cpu, process)
        times: list[float] = []
        cpu: list[float] = []
        start = time.perf_counter()
        while len(times) < iters:
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            t1, c1 = time.perf_counter(), time.process_time()
            times.append(t1 - t0)
            cpu.append(c1 - c0)
            if len(times) >= min_iters and t1 - start > budget_s:
                break
    return _stats(times, cpu)


def time_rounds(steps: dict, device: torch.device, warmup: int, iters: int, budget_s: float,
                min_iters: int = 3, min_time_s: float = 0.0, rounds: int = 5,
                host_bursts: int = 25) -> tuple[dict, dict]:
    """:func:`time_steps` for several implementations on CUDA, in rounds.

    Each round times a block of back-to-back steps of every implementation
    still being timed (the order rotating from round to round), then its
    host bursts; every figure is over all of an implementation's blocks. So
    a change in the machine's state (on the H100 sessions a row's median
    moved up to 2x between runs, and torch fused with two host schedulers
    of like cost differed 2x within one) falls on all of them alike,
    instead of on whichever was timed at that moment. Each implementation
    gets a ``1 / rounds`` share of ``iters``, ``min_time_s``, ``budget_s``
    and ``host_bursts`` per round, and no more steps in a round than its
    warm-up steps say fit in its share of ``budget_s`` (at least one).

    Returns (stats by name, error message by name for any that raised), as
    :func:`time_interleaved`.
    """
    if device.type != "cuda":
        raise ValueError("time_rounds is for CUDA devices; use time_interleaved on CPU")
    errors: dict[str, str] = {}
    times: dict[str, list] = {k: [] for k in steps}
    cpu: dict[str, list] = {k: [] for k in steps}
    process: dict[str, list] = {k: [] for k in steps}
    live = dict(steps)

    def fail(name, e):
        errors[name] = error_text(e)
        del live[name]

    per_iters = max(1, math.ceil(iters / rounds))
    # a round's steps of each: its share of iters, fewer where that share
    # would outlast its share of the budget (a step's time from the warm-up):
    # a chunk of 10 torch foreach steps on 5,000 tensors took ~0.9 s
    per_round = {}
    for name, fn in list(live.items()):
        try:
            t0 = time.perf_counter()
            for _ in range(warmup):
                fn()
            sync(device)
        except Exception as e:  # reported as this implementation's error
            fail(name, e)
            continue
        took = (time.perf_counter() - t0) / warmup if warmup else 0.0
        fit = int(budget_s / rounds / took) if took > 0 else per_iters
        per_round[name] = max(1, min(per_iters, fit))
    per_bursts = max(1, math.ceil(host_bursts / rounds))
    with _gc_paused():
        for r in range(rounds):
            names = list(live)
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                n = per_round[name]
                try:
                    times[name] += _cuda_step_times(live[name], device, n, budget_s / rounds,
                                                    max(1, math.ceil(min_iters / rounds)), min_time_s / rounds,
                                                    20 * n, chunk=min(10, n))
                    t, p = _cuda_host_times(live[name], device, per_bursts)
                except Exception as e:
                    fail(name, e)
                    continue
                cpu[name] += t
                process[name] += p
    return {name: _stats(times[name], cpu[name], process[name]) for name in live}, errors


# host-side CUDA API calls that put work on the device
_LAUNCH_APIS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch"}
_COPY_PREFIXES = ("cudaMemcpy", "cudaMemset", "cuMemcpy", "cuMemset")  # any variant (2D, Peer, D8...)
# CUPTI may suffix a version (cudaLaunchKernel_v7000) or the per-thread
# default-stream variant (cudaLaunchKernel_ptsz, cudaMemcpy_ptds)
_API_SUFFIX = re.compile(r"(_v\d+|_ptsz|_ptds)+$")


def count_launches(step: Callable[[], object], device: torch.device, steps: int = 3) -> dict:
    """Kernel launches per step on CUDA, from torch.profiler (None on CPU).

    ``launches``: host API calls that launch kernels or graphs (a graph
    replay counts 1); ``kernels``: kernels the device ran (CUPTI reports the
    nodes of a replayed graph too; not the device-side copies of
    ``record_function`` ranges); ``copies``: memcpy/memset API calls.
    """
    if device.type != "cuda":
        return {"launches_per_step": None, "kernels_per_step": None, "copies_per_step": None}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    launches = kernels = copies = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            # a record_function range (torch.optim's "Optimizer.step#AdamW.step",
            # ours too) comes back a second time as a device-side
            # "gpu_user_annotation" spanning its kernels: not a kernel
            if not e.name.startswith(("Memcpy", "Memset")) and not getattr(e, "is_user_annotation", False):
                kernels += 1
            continue
        api = _API_SUFFIX.sub("", e.name)
        if api in _LAUNCH_APIS:
            launches += 1
        elif api.startswith(_COPY_PREFIXES):
            copies += 1
    if launches == 0 and kernels == 0:
        # every step launches something: the profiler saw no CUDA activity
        # (CUPTI unavailable or refused in this container), which is no count
        return {"launches_per_step": None, "kernels_per_step": None, "copies_per_step": None,
                "launches_note": "torch.profiler recorded no CUDA activity (CUPTI unavailable?): launches not counted"}
    return {"launches_per_step": launches / steps, "kernels_per_step": kernels / steps,
            "copies_per_step": copies / steps}


# a container's memory limit and use: cgroup v2, then v1 (a v1 "no limit" is a huge number)
_CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # (v2's "max": no limit)
        return None


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    free = None
    try:  # Linux: what can be had without swapping, page cache included
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    for limit_path, usage_path in _CGROUP_MEMORY:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None:
            # in a container the host's free memory is not the process's: past
            # its limit the run is killed
            return max(0, min(free, limit - usage))
    return free


def copy_roofline(total_bytes: int, device: torch.device, warmup: int, iters: int, budget_s: float,
                  min_time_s: float = 0.0) -> dict:
    """A copy moving ``total_bytes`` (read half, write half), timed like a step.

    On CUDA a device-to-device copy; on CPU ``Tensor.copy_`` (torch's parallel
    memcpy). If the two buffers do not fit in half the free memory the copy
    is shrunk and its time scaled linearly (``capped`` says so).
    """
    n = max(1, total_bytes // 2)
    limit = max(1 << 20, free_bytes(device) // 4)  # two buffers in half the free memory
    m = min(n, limit)
    src = torch.ones(m, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), device, warmup, iters, budget_s, host_bursts=1, burst_len=1,
                   min_time_s=min_time_s)
    del src, dst
    scale = n / m
    ms = t["median_ms"] * scale
    return {"copy_ms": ms, "copy_gbps": 2 * n / (ms / 1e3) / 1e9, "copy_capped": m < n}


def gbps(nbytes: int, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0 or math.isnan(ms):
        return None
    return nbytes / (ms / 1e3) / 1e9


def time_interleaved(steps: dict, device: torch.device, warmup: int, iters: int, budget_s: float,
                     min_iters: int = 3) -> tuple[dict, dict]:
    """Like :func:`time_steps` for several implementations at once, in rounds.

    Each round runs one step of every implementation still being timed, so a
    change in background load (other processes on shared cores) hits all of
    them alike instead of whichever happened to run at that moment. An
    implementation stops after ``iters`` steps, or after ``min_iters`` once
    its own timed steps exceed ``budget_s``. CPU only (on CUDA, blocks of
    back-to-back steps take turns: :func:`time_rounds`).

    Returns (stats by name, error message by name for any that raised).
    """
    if device.type == "cuda":
        raise ValueError("time_interleaved is for CPU devices; use time_rounds on CUDA")
    errors: dict[str, str] = {}
    times: dict[str, list] = {k: [] for k in steps}
    cpu: dict[str, list] = {k: [] for k in steps}

    def call(name, fn):
        try:
            fn()
            return True
        except Exception as e:  # reported as this implementation's error
            errors[name] = error_text(e)
            return False

    live = dict(steps)
    for _ in range(warmup):
        for name, fn in list(live.items()):
            if not call(name, fn):
                del live[name]
    with _gc_paused():
        while live:
            for name, fn in list(live.items()):
                t0, c0 = time.perf_counter(), time.process_time()
                ok = call(name, fn)
                t1, c1 = time.perf_counter(), time.process_time()
                if not ok:
                    del live[name]
                    continue
                times[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
                n = len(times[name])
                if n >= iters or (n >= min_iters and sum(times[name]) > budget_s):
                    del live[name]
    stats = {name: _stats(ts, cpu[name]) for name, ts in times.items() if name not in errors and ts}
    return stats, errors
