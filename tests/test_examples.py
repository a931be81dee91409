"""The scripts in examples/, run as a user runs them (a subprocess, their
smallest sizes), and the lr they print checked against the schedule's host
evaluation. tests/test_trainers.py checks the trainers' numbers in depth
through the examples' functions; here the command lines themselves must work,
including torchrun for the DDP / FSDP2 example. About 35 s on 2 CPU cores.
"""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from onecycle_fused import OneCycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(args, cwd, timeout=300, retry_teardown_abort=False, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), **env)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if (retry_teardown_abort and proc.returncode != 0
            and "terminate called without an active exception" in proc.stderr):
        # torch's gloo process group, under torchrun, aborted at exit (1 run
        # in 5-10 on a loaded 2-core machine) after every step had run: a gloo
        # worker releasing a work item during interpreter shutdown. The
        # example now releases the group first (0 in 36 so loaded); should
        # it come back, one more run, and only for that
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(pattern, out):
    rows = [m.groups() for m in re.finditer(pattern, out)]
    assert rows, out
    return rows


def test_amp_gradscaler_example_script(tmp_path):
    steps = 4
    out = _run([sys.executable, os.path.join(EXAMPLES, "amp_gradscaler_example.py"), "--steps", str(steps)], tmp_path)
    sched = OneCycle(1e-4, 3e-3, cycle_first_step_size=steps // 2)
    rows = _rows(r"step +(\d+) +loss +\S+ +next lr +(\S+) +applied steps +(\d+)", out)
    assert rows[-1][0] == str(steps - 1)
    for _, lr, applied in rows:
        assert float(lr) == pytest.approx(sched.lr(int(applied)), rel=5e-3)  # printed with 3 digits
    assert os.listdir(tmp_path) == []  # writes nothing


@pytest.mark.parametrize("fsdp2", [False, True])
def test_ddp_example_with_torchrun(tmp_path, fsdp2):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if fsdp2:
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    if torch.cuda.is_available():
        pytest.skip("the example picks nccl on a GPU machine; this test is for gloo")
    steps = 4
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(EXAMPLES, "ddp_example.py"), "--steps", str(steps)] + (["--fsdp2"] if fsdp2 else [])
    out = _run(args, tmp_path, retry_teardown_abort=True)
    sched = OneCycle(1e-4, 3e-3, cycle_first_step_size=steps // 2)
    rows = _rows(r"step +(\d+) +loss +\S+ +next lr +(\S+)", out)
    assert [int(i) for i, _ in rows] == [0, steps - 1]  # rank 0 only
    for i, lr in rows:
        assert float(lr) == pytest.approx(sched.lr(int(i) + 1), rel=5e-3)


def test_hf_trainer_example_script(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    steps = 10
    out = _run([sys.executable, os.path.join(EXAMPLES, "hf_trainer_example.py"), "--steps", str(steps)], tmp_path,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sched = OneCycle(1e-4, 1e-3, cycle_first_step_size=steps // 2)
    rows = _rows(r"step +(\d+) +loss +\S+ +lr +(\S+)", out)
    assert [int(s) for s, _ in rows] == [5, 10]  # logging_steps=5
    for s, lr in rows:
        # the Trainer logs, at global step s, the lr that step used: k = s - 1 steps had been applied
        assert float(lr) == pytest.approx(sched.lr(int(s) - 1), rel=1e-3)


def test_deepspeed_client_optimizer_script(tmp_path):
    pytest.importorskip("deepspeed")
    script = os.path.join(EXAMPLES, "deepspeed_client_optimizer.py")
    # the script as __main__, except that DeepSpeed's CPU accelerator does not
    # JIT-compile its shared-memory all-reduce (tens of seconds on a fresh
    # machine; one process never uses it), as in tests/test_trainers.py
    sched = OneCycle(1e-4, 1e-3, cycle_first_step_size=5, cycle_min_mom=0.85, cycle_max_mom=0.95)
    # --save, then --resume in a new process: the schedule goes on from step 4
    for args, expected in ((["--save", "ckpt"], 4), (["--resume", "ckpt"], 8)):
        run = ("import runpy, sys, deepspeed.comm.torch as t; t.build_shm_op = lambda: None; "
               f"sys.argv = [{script!r}, '--micro-batches', '8', *{args!r}]; "
               f"runpy.run_path({script!r}, run_name='__main__')")
        out = _run([sys.executable, "-c", run], tmp_path, MASTER_PORT=str(_free_port()))
        (steps, lr), = _rows(r"optimizer steps (\d+), next lr (\S+)", out)
        assert int(steps) == expected  # 8 micro batches a run, gradient_accumulation_steps=2
        assert float(lr) == pytest.approx(sched.lr(expected), rel=1e-3)


def test_lightning_example_script(tmp_path):
    pytest.importorskip("lightning")
    out = _run([sys.executable, os.path.join(EXAMPLES, "lightning_example.py"), "--steps", "4"], tmp_path)
    assert "logged to ./lightning_logs/version_0" in out
    assert os.listdir(tmp_path) == ["lightning_logs"]  # what its docstring says it writes, in the cwd
    assert os.path.exists(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")


def test_examples_refuse_zero_steps(tmp_path, script="amp_gradscaler_example.py"):
    # (--steps 1 used to end in "cycle_first_step_size must be an integer >= 1"; the
    # others parse --steps the same way)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--steps", "0"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_amp_example_runs_a_single_step():
    from test_trainers import _example

    model, opt = _example("amp_gradscaler_example").main(["--steps", "1"])
    assert int(opt.step_counter()) <= 1
