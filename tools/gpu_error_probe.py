"""Do our C++ errors reach Python as exceptions on this machine?

The first H100 session (2026-11-27, benchmarks/results/h100_2026-11-27/)
saw the process die with SIGSEGV in the two gpu tests whose CUDA op raises
from prepare_step (csrc/cuda/tensor_table.cu): a strided parameter
(ValueError) and a state overlapping its parameter (RuntimeError). The same
ops raise normally here, on the CPU, with torch 2.11 and a _C_cuda built by
nvcc (the op reached through redispatch; tools/check_gpu_versions.sh).

Found in the second H100 session: the image's compiler wrapper
(/opt/gcc/bin) linked libstdc++ statically into our libraries, which then
define __cxa_throw (printed below): their errors crashed, torch's did not,
with or without a profiler session first. Built with /usr/bin/g++ there
(tools/gpu_session.sh now does), they raise.

Each case runs in a subprocess of its own, so one crash does not hide the
others (the profiler_then_* cases open a torch.profiler session first, as
the crashed tests' process had); the first case that crashes is run again under cuda-gdb (the GPU
image has no gdb) for a native backtrace. The loaded C++ runtime and the
compilers are printed too: the GPU image builds with /opt/gcc (CC), this
machine with the system GCC.

    python3 tools/gpu_error_probe.py            # all cases, then the backtrace
    python3 tools/gpu_error_probe.py --case X   # one case in this process
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _sgd_call(params, grads, bufs, counter, table):
    import torch

    steps = [torch.zeros((), dtype=torch.int64, device=p.device) for p in params]
    torch.ops.onecycle_fused.sgd_step_(params, grads, bufs, steps, [0] * len(params), table, counter, None, None)


def _table(device):
    import torch
    from onecycle_fused import FusedOneCycleSGD

    p = torch.nn.Parameter(torch.zeros(1, device=device))
    backend = "cuda" if device == "cuda" else "cpu"
    opt = FusedOneCycleSGD([p], backend=backend, cycle_min_lr=0.01, cycle_max_lr=0.1,
                           cycle_first_step_size=10, momentum=0.9)
    p.grad = torch.zeros_like(p)
    opt.step()
    return next(iter(opt._tables.values()))


def case_torch_own():
    """torch's own error on CUDA: the baseline."""
    import torch

    torch.ones(2, device="cuda") + torch.ones(3, device="cuda")


def case_cpu_op():
    """a RuntimeError from _C (csrc/ops.cpp, overlap.h), compiled by the host C++ compiler"""
    import torch

    table = _table("cpu")
    base = torch.randn(101)
    p = base[:100]
    _sgd_call([p], [torch.randn_like(p)], [base[1:]], torch.zeros((), dtype=torch.int64), table)


def case_cuda_launch():
    """a ValueError from launch_step (sgd_step.cu), before the CUDAGuard"""
    import torch

    table = _table("cuda")
    p = torch.randn(4, device="cuda")
    _sgd_call([p], [torch.randn_like(p)], [torch.zeros_like(p)], torch.zeros((), dtype=torch.int64), table)


def case_cuda_prepare():
    """a ValueError from prepare_step (tensor_table.cu), under the CUDAGuard"""
    import torch

    table = _table("cuda")
    p = torch.randn(10, 10, device="cuda")[:, ::2]
    _sgd_call([p], [torch.randn_like(p)], [torch.zeros_like(p)],
              torch.zeros((), dtype=torch.int64, device="cuda"), table)


def case_cuda_overlap():
    """a RuntimeError from overlap.h's check_state_apart, in prepare_step"""
    import torch

    table = _table("cuda")
    base = torch.randn(101, device="cuda")
    p = base[:100]
    _sgd_call([p], [torch.randn_like(p)], [base[1:]], torch.zeros((), dtype=torch.int64, device="cuda"), table)


def _profile_our_steps():
    """A torch.profiler (CUPTI) session around steps of ours, as
    tests/test_cuda_backend.py's launch-count test opened one: on the first
    H100 session both crashing tests ran after it in the same process (a
    suspicion the second session cleared: see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    p = torch.nn.Parameter(torch.zeros(1000, device="cuda"))
    from onecycle_fused import FusedOneCycleAdamW

    opt = FusedOneCycleAdamW([p], backend="cuda", cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10)
    p.grad = torch.ones_like(p)
    opt.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
    print("profiler: CUDA events", sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()),
          flush=True)


def case_profiler_then_torch_own():
    """torch's own error after a profiler session: if this crashes, no C++ error survives CUPTI here"""
    _profile_our_steps()
    case_torch_own()


def case_profiler_then_cuda_prepare():
    """prepare_step's ValueError after a profiler session (the crashed tests' order)"""
    _profile_our_steps()
    case_cuda_prepare()


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def _run_case(name: str) -> None:
    import onecycle_fused.ops as ops

    print("cuda library loaded:", ops.cuda_library_loaded(), flush=True)
    try:
        CASES[name]()
    except Exception as e:  # the expected outcome: the error reached Python
        print(f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return
    print("no error raised")


def _sh(cmd: str) -> None:
    print(f"$ {cmd}", flush=True)
    subprocess.run(cmd, shell=True, cwd=ROOT, stderr=subprocess.STDOUT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES))
    args = ap.parse_args()
    if args.case:
        _run_case(args.case)
        return 0

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    crashed = []
    for name in CASES:
        r = subprocess.run([sys.executable, __file__, "--case", name], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name:26s} exit {r.returncode:4d}  {last}", flush=True)
        if r.returncode != 0:
            crashed.append(name)
            print("   " + "\n   ".join(r.stderr.strip().splitlines()[-6:]), flush=True)

    print("\n# toolchain and runtime", flush=True)
    _sh("echo CC=${CC:-} CXX=${CXX:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")
    _sh("${CC:-gcc} --version | head -n 1; g++ --version | head -n 1; nvcc --version | tail -n 2")
    _sh("${CXX:-g++} -v 2>&1 | grep -E '^(Configured with|gcc version)' | cut -c1-600")
    _sh("ldd onecycle_fused/_C_cuda*.so | grep -E 'stdc|gcc_s|unwind|cudart|c10'")
    # a C++ runtime or unwinder linked into our libraries (a toolchain that
    # links libstdc++ / libgcc statically) would throw with its own copy
    _sh("for f in onecycle_fused/_C*.so; do echo $f; nm -D --defined-only $f | "
        "grep -E '__cxa_throw|_Unwind_RaiseException|__gxx_personality' || echo '  (none defined)'; done")
    _sh(f"{sys.executable} -c \"import torch, onecycle_fused.ops; "
        "print(''.join(l for l in open('/proc/self/maps') if any(k in l for k in "
        "('libstdc++', 'libgcc_s', 'libunwind'))))\" | awk '{print $6}' | sort -u")

    gdb = shutil.which("cuda-gdb")
    if crashed and gdb:
        print(f"\n# {crashed[0]} under cuda-gdb", flush=True)
        try:
            r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, __file__,
                                "--case", crashed[0]], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=50)
            lines = (r.stdout + r.stderr).splitlines()
            at = next((i for i, l in enumerate(lines) if "SIGSEGV" in l or "signal" in l.lower()), 0)
            print("\n".join(lines[max(0, at - 5):at + 50]))
        except subprocess.TimeoutExpired:
            print("cuda-gdb: timed out")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
