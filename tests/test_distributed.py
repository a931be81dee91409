"""DDP, FSDP2 (fully_shard: parameters are DTensors, the step works on the
local shards) and DDP with torch's ZeroRedundancyOptimizer (resumed from its
checkpoint half-way; also with a shard that missed the first steps, and the
README's counter all_reduce) with 2 processes on gloo on CPU: the trained
parameters equal a single-process run on the whole batch.

The workers are this file run as a script (``python test_distributed.py RANK
WORLD RENDEZVOUS_FILE OUT``), so nothing depends on how pytest imports tests. One pair of
processes runs every configuration (~15-25 s on 2 cores).
"""
import gc
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

STEPS = 6
SCHEDULE = dict(cycle_min_lr=1e-2, cycle_max_lr=5e-2, cycle_first_step_size=2, decay_step_size=1, decay_lr_rate=0.5)


def _model():
    torch.manual_seed(0)
    # Linear weights with an odd first dimension: FSDP2 pads the last shard
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]


def _optimizer_class(algo):
    """The class and its keyword arguments."""
    from onecycle_fused import FusedOneCycleAdamW, FusedOneCycleSGD

    if algo == "sgd":
        return FusedOneCycleSGD, dict(SCHEDULE, nesterov=True, weight_decay=1e-3)
    return FusedOneCycleAdamW, dict(SCHEDULE)


def _optimizer(algo, params):
    cls, kw = _optimizer_class(algo)
    return cls(params, **kw)


def _train(model, opt, data, rank=0, world=1):
    for x, y in data:
        # each rank takes its slice of the batch; the mean loss over the
        # slices, averaged by DDP / FSDP, is the mean loss over the batch
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _single(algo):
    model = _model()
    opt = _optimizer(algo, model.parameters())
    _train(model, opt, _data())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, opt.get_last_lr()


LATE = ("0.bias", "2.weight", "2.bias")  # zero_late: no grads before step LATE_FROM (a part trained later)
LATE_FROM = 2


def _train_late(model, opt, data, first_step):
    """Every rank the whole batch (no DDP: the same grads everywhere), the
    LATE parameters without grads before step LATE_FROM."""
    for k, (x, y) in enumerate(data, start=first_step):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if k < LATE_FROM:
            for name, p in model.named_parameters():
                if name in LATE:
                    p.grad = None
        opt.step()


def _single_late(algo):
    model = _model()
    opt = _optimizer(algo, model.parameters())
    _train_late(model, opt, _data(), 0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, opt.get_last_lr()


def _run_zero_late(algo, rank, world, out):
    """ZeroRedundancyOptimizer resumed from its checkpoint when one rank's
    shard (ZeRO puts 2.weight, 0.bias and 2.bias together, apart from
    0.weight) missed the first steps: that rank takes the counter from its
    shard's step counts, behind the others; the README's all_reduce of the
    counters puts every rank at the run's position again."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kw = _optimizer_class(algo)
    data = _data()
    model = _model()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)
    _train_late(model, opt, data[:RESUME_AT], 0)
    opt.consolidate_state_dict(to=0)
    path = f"{out}.zero_late_{algo}.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path)
    model = _model()
    model.load_state_dict(saved["model"])
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)
    # the README's snippet, as written there
    zero.load_state_dict(saved["optim"])
    c = zero.optim.step_counter().clone()      # (reading it takes the restored counts over)
    lowest = c.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX)
    zero.optim.set_step(int(c))
    _train_late(model, zero, data[RESUME_AT:], RESUME_AT)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "lr": zero.optim.get_last_lr(), "counter": int(zero.optim.step_counter()), "lowest": int(lowest)}


CONFIGS = [(mode, algo) for mode in ("ddp", "fsdp2", "zero") for algo in ("sgd", "adamw")] + [("zero_late", "adamw")]
RESUME_AT = 3  # ZeroRedundancyOptimizer: saved and loaded into a fresh one after this many steps


def _run_zero(algo, rank, world, out):
    """DDP with torch's ZeroRedundancyOptimizer around ours (each rank steps
    its shard of the parameters), resumed half-way from ZeRO's own
    checkpoint. ZeRO copies its groups' keys (our constructor's schedule
    keywords, the saved lr / momentum mirror) into our groups before every
    step, and its load_state_dict writes the per-parameter state, steps
    included, straight into our ``state``: no error, no "set from outside"
    warning, and the counter taken over from the steps."""
    import warnings

    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kw = _optimizer_class(algo)
    data = _data()

    def build(state=None):
        model = _model()
        if state is not None:
            model.load_state_dict(state)
        model = torch.nn.parallel.DistributedDataParallel(model)
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)

    model, opt = build()
    _train(model, opt, data[:RESUME_AT], rank, world)
    opt.consolidate_state_dict(to=0)
    path = f"{out}.zero_{algo}.pt"
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path)
    model, opt = build(saved["model"])
    opt.load_state_dict(saved["optim"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, data[RESUME_AT:], rank, world)
    ours = [str(w.message) for w in caught if "onecycle_fused" in w.filename or "FusedOneCycle" in str(w.message)]
    assert not ours, ours
    state = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "lr": opt.optim.get_last_lr(), "counter": int(opt.optim.step_counter())}


def _run_config(mode, algo, rank, world, out):
    if mode == "zero":
        return _run_zero(algo, rank, world, out)
    if mode == "zero_late":
        return _run_zero_late(algo, rank, world, out)
    model = _model()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = _optimizer(algo, model.parameters())
    _train(model, opt, _data(), rank, world)
    state = model.state_dict()
    if mode == "fsdp2":  # gather the DTensor shards into full tensors
        state = {k: v.full_tensor() for k, v in state.items()}
    else:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "lr": opt.get_last_lr(), "counter": int(opt.step_counter())}


def _worker(rank, world, rendezvous, out):
    """Every configuration in one process group: starting processes is the
    slow part (~10 s for the pair), so the pair is started once."""
    import traceback

    # a file rendezvous: no TCP port to race for with other processes
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    results = {}
    try:
        for mode, algo in CONFIGS:
            try:
                if mode == "fsdp2":
                    from torch.distributed import fsdp

                    if not hasattr(fsdp, "fully_shard"):
                        results[mode, algo] = "skip: this torch has no torch.distributed.fsdp.fully_shard"
                        continue
                results[mode, algo] = _run_config(mode, algo, rank, world, out)
            except Exception:  # reported by the test of this configuration
                results[mode, algo] = "error on rank %d:\n%s" % (rank, traceback.format_exc())
            dist.barrier()
        if rank == 0:
            torch.save(results, out)
    finally:
        # the models (DDP / FSDP hold the group) freed now: otherwise the gloo
        # threads live into interpreter shutdown, where one can abort the
        # process (examples/ddp_example.py says how)
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    world = 2
    tmp = tmp_path_factory.mktemp("dist")
    out, rendezvous = tmp / "results.pt", tmp / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(rendezvous), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)


@pytest.mark.parametrize("mode,algo", CONFIGS)
def test_two_processes_equal_single_process(mode, algo, distributed_results):
    got = distributed_results[mode, algo]
    if isinstance(got, str):
        if got.startswith("skip:"):
            pytest.skip(got[5:])
        pytest.fail(got)
    expected, lr = (_single_late if mode == "zero_late" else _single)(algo)
    for k, v in expected.items():
        torch.testing.assert_close(got["state"][k], v, msg=k)
    assert got["lr"] == lr and got["counter"] == STEPS
    if mode == "zero_late":  # what the README's all_reduce is for: a rank came back behind
        assert got["lowest"] == RESUME_AT - LATE_FROM


if __name__ == "__main__":
    rank, world, rendezvous, out = sys.argv[1:]
    _worker(int(rank), int(world), rendezvous, out)
