"""The paired runs of host_overhead.txt: one process per run, run from the root of each tree
(PYTHONPATH=<tree> python paired_runs.py), old and new alternately."""
import sys, time, statistics, torch
from onecycle_fused import FusedOneCycleSGD, FusedOneCycleAdamW
torch.set_num_threads(1)
for n, algo in [(161,"sgd"),(161,"adamw"),(5000,"sgd"),(5000,"adamw")]:
    ps=[torch.zeros(1,requires_grad=True) for _ in range(n)]
    for p in ps: p.grad=torch.full_like(p,1e-3)
    opt = FusedOneCycleSGD(ps,cycle_min_lr=1e-3,cycle_max_lr=1e-2,cycle_first_step_size=10**6,momentum=0.9) if algo=="sgd" else FusedOneCycleAdamW(ps,cycle_min_lr=1e-3,cycle_max_lr=1e-2,cycle_first_step_size=10**6)
    for _ in range(20): opt.step()
    ts=[]
    for _ in range(300 if n < 1000 else 60):
        t0=time.perf_counter(); opt.step(); ts.append(time.perf_counter()-t0)
    print(f"{n}x1 {algo}: {statistics.median(ts)*1e6:.1f} us", flush=True)
