"""Trainers and loops from examples/: a plain torch.amp + GradScaler loop,
PyTorch Lightning, Hugging Face Trainer and DeepSpeed's client optimizer.

Each runs a tiny model built in code (no download) and is checked against an
independent run: torch.optim with the schedule's values set by hand, or the
fused optimizer in a plain loop where the trainer's own plumbing is under
test. Lightning, transformers and DeepSpeed are optional: their tests skip
when the package is missing. About 40-50 s in all on 2 CPU cores.
"""
import csv
import glob
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import onecycle_fused
from onecycle_fused import FusedOneCycleAdamW, FusedOneCycleSGD, OneCycle

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_params_close(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name)


# --------------------------------------------------------------------------
# torch.amp + GradScaler


@pytest.mark.parametrize("device,backend", [
    ("cpu", "reference"),
    ("cpu", "auto"),
    pytest.param("cuda", "auto", marks=pytest.mark.gpu),
])
def test_amp_gradscaler_skips_and_matches_torch(device, backend):
    """Gradients scaled by GradScaler, one step with an inf gradient: the
    fused AdamW equals torch.optim.AdamW whose lr / beta1 are set by hand from
    the schedule at the count of *applied* steps (the skipped one does not
    advance the schedule)."""
    sched = OneCycle(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=3, cycle_min_mom=0.8,
                     cycle_max_mom=0.95)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin.load_state_dict(model.state_dict())
    model, twin = model.to(device), twin.to(device)
    fused = FusedOneCycleAdamW(model.parameters(), schedule=sched, weight_decay=0.01, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=sched.lr(0), betas=(sched.momentum(0), 0.999), weight_decay=0.01,
                            foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10), torch.amp.GradScaler(device, init_scale=2.0**10)]
    gen = torch.Generator().manual_seed(1)
    applied = 0
    for i in range(8):
        x, y = torch.randn(4, 8, generator=gen).to(device), torch.randn(4, 2, generator=gen).to(device)
        for net, opt, scaler in ((model, fused, scalers[0]), (twin, ref, scalers[1])):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
            if i == 3:  # an overflow: this step must change nothing
                net[0].weight.grad[0, 0] = float("inf")
            if opt is ref:
                for g in ref.param_groups:
                    g["lr"], g["betas"] = sched.lr(applied), (sched.momentum(applied), 0.999)
            scaler.step(opt)
            scaler.update()
        applied += i != 3
        assert int(fused.step_counter()) == applied
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert applied == 7
    _assert_params_close(model, twin)
    assert fused.get_last_lr() == [sched.lr(7)]


def test_amp_example_runs():
    model, opt = _example("amp_gradscaler_example").main(["--steps", "6"])
    assert int(opt.step_counter()) <= 6 and all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------
# PyTorch Lightning


def test_lightning_lr_monitor_logs_true_values(tmp_path):
    pytest.importorskip("lightning")
    example = _example("lightning_example")
    steps = 12
    model, trainer = example.main(["--steps", str(steps)], log_dir=str(tmp_path))
    rows = list(csv.DictReader(open(glob.glob(os.path.join(trainer.logger.log_dir, "metrics.csv"))[0])))
    lr_key = next(k for k in rows[0] if k.startswith("lr-") and not k.endswith("-momentum"))
    logged = {int(r["step"]): (float(r[lr_key]), float(r[lr_key + "-momentum"])) for r in rows if r[lr_key]}
    # the monitor logs before each step: the values step k runs with
    fresh = example.TinyClassifier(steps)
    sched = fresh.configure_optimizers().schedule
    assert sorted(logged) == list(range(steps))
    for k, (lr, mom) in logged.items():
        assert lr == pytest.approx(sched.lr(k), rel=1e-12) and mom == pytest.approx(sched.momentum(k), rel=1e-12)

    # the weights equal the fused optimizer in a plain loop over the same batches
    torch.manual_seed(0)
    plain = example.TinyClassifier(steps)
    opt = plain.configure_optimizers()
    for i, (x, y) in enumerate(example.make_data()):
        if i == steps:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain.net(x), y).backward()
        opt.step()
    _assert_params_close(model, plain)


def test_lightning_checkpoint_resumes_the_schedule(tmp_path):
    """A Lightning checkpoint carries the step counter: the resumed run goes
    on at the saved position, and its LR monitor logs the schedule from there."""
    pytest.importorskip("lightning")
    example = _example("lightning_example")
    L, LearningRateMonitor, CSVLogger = example.L, example.LearningRateMonitor, example.CSVLogger
    steps, first = 12, 5

    def trainer(max_steps, name):
        return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name=name),
                         callbacks=[LearningRateMonitor(logging_interval="step")], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    torch.manual_seed(0)
    model = example.TinyClassifier(steps)
    t = trainer(first, "first")
    t.fit(model, example.make_data(n=32 * first))  # one epoch: the checkpoint is at its end
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)
    assert int(torch.load(ckpt, weights_only=False)["optimizer_states"][0]["step_counter"]) == first

    resumed = example.TinyClassifier(steps)
    t = trainer(steps, "resumed")
    t.fit(resumed, example.make_data(n=32 * first), ckpt_path=str(ckpt))
    assert int(t.optimizers[0].step_counter()) == steps
    rows = list(csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))))
    lr_key = next(k for k in rows[0] if k.startswith("lr-"))
    logged = {int(r["step"]): float(r[lr_key]) for r in rows if r[lr_key]}
    sched = t.optimizers[0].schedule
    assert sorted(logged) == list(range(first, steps))
    for k, lr in logged.items():
        assert lr == pytest.approx(sched.lr(k), rel=1e-12)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_clipping_and_accumulation(tmp_path, precision):
    """gradient_clip_val under mixed precision (Lightning refused it for an
    optimizer saying it unscales in step()), with accumulate_grad_batches=2:
    equals torch AdamW + LambdaLR on our schedule in a plain autocast loop
    (unscale_, clip, step), the schedule counting optimizer steps."""
    pytest.importorskip("lightning")
    example = _example("lightning_example")
    L = example.L
    from lightning.pytorch.plugins import MixedPrecision

    sched = OneCycle(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=2, cycle_momentum=False)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    steps, accumulate, clip = 5, 2, 0.05

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return {"optimizer": FusedOneCycleAdamW(self.parameters(), schedule=sched, weight_decay=0.01)}

    def scaler():  # fp16 on CPU: Lightning needs the plugin given its CPU GradScaler
        return torch.amp.GradScaler("cpu", init_scale=2.0**10) if dtype == torch.float16 else None

    model = Module()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                        accumulate_grad_batches=accumulate, plugins=[MixedPrecision(precision, "cpu", scaler())])
    trainer.fit(model, example.make_data(n=8 * accumulate * steps, batch_size=8))
    assert int(trainer.optimizers[0].step_counter()) == steps

    twin = net()
    ref = torch.optim.AdamW(twin.parameters(), lr=sched.lr(0), weight_decay=0.01, foreach=False)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(ref, lambda k: sched.lr(k) / sched.lr(0))
    ref_scaler = scaler()
    for i, (x, y) in enumerate(example.make_data(n=8 * accumulate * steps, batch_size=8)):
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(twin(x), y) / accumulate
        (ref_scaler.scale(loss) if ref_scaler else loss).backward()
        if (i + 1) % accumulate == 0:
            if ref_scaler:
                ref_scaler.unscale_(ref)
            torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
            if ref_scaler:
                ref_scaler.step(ref)
                ref_scaler.update()
            else:
                ref.step()
            lambda_lr.step()
            ref.zero_grad()
    assert trainer.optimizers[0].get_last_lr() == [sched.lr(steps)]
    _assert_params_close(model.net, twin)


# --------------------------------------------------------------------------
# Hugging Face Trainer


def _hf_run(example, optimizers_for, out_dir, steps=6, resume=None, **training_args):
    from transformers import Trainer, TrainingArguments

    model = example.tiny_gpt2()
    opt, sched = optimizers_for(model)
    args = TrainingArguments(**{**dict(output_dir=str(out_dir), per_device_train_batch_size=8, max_steps=steps,
                                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                       disable_tqdm=True), **training_args})
    trainer = Trainer(model=model, args=args, train_dataset=example.random_tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    return model, opt, lrs


def test_hf_trainer_matches_torch_adamw_with_the_schedule(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = _example("hf_trainer_example")
    sched = OneCycle(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=2, cycle_momentum=False)

    def ours(model):
        opt = FusedOneCycleAdamW(model.parameters(), schedule=sched, betas=(0.9, 0.999), weight_decay=0.01,
                                 backend="reference")
        return opt, None

    def ours_mirrored(model):
        opt, _ = ours(model)
        return opt, onecycle_fused.ScheduleMirror(opt)

    def torch_pair(model):  # the oracle: torch AdamW + the same lr values through LambdaLR
        opt = torch.optim.AdamW(model.parameters(), lr=sched.lr(0), betas=(0.9, 0.999), weight_decay=0.01,
                                foreach=False)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: sched.lr(k) / sched.lr(0))

    expected, _, expected_lrs = _hf_run(example, torch_pair, tmp_path)
    with pytest.warns(UserWarning, match="torch LR scheduler attached"):  # HF's own scheduler, which does nothing
        got, opt, _ = _hf_run(example, ours, tmp_path)  # (ours, None): HF adds its own scheduler, the math is ours
    _assert_params_close(got, expected)
    assert int(opt.step_counter()) == 6
    got, opt, lrs = _hf_run(example, ours_mirrored, tmp_path)  # and with the mirror the log is true
    _assert_params_close(got, expected)
    assert lrs == pytest.approx(expected_lrs, rel=1e-12)


def test_hf_trainer_resumes_from_a_checkpoint_with_the_mirror(tmp_path):
    """resume_from_checkpoint loads scheduler.pt with weights_only=True: the
    mirror's state must not pickle the optimizer into it. The resumed run
    ends where the uninterrupted one does, the schedule continuing at 3."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = _example("hf_trainer_example")

    def mirrored(model):
        opt = FusedOneCycleAdamW(model.parameters(), cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=2,
                                 weight_decay=0.01)
        return opt, onecycle_fused.ScheduleMirror(opt)

    saving = dict(save_strategy="steps", save_steps=3)
    expected, _, _ = _hf_run(example, mirrored, tmp_path / "whole", **saving)
    got, opt, lrs = _hf_run(example, mirrored, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"),
                            **saving)
    assert int(opt.step_counter()) == 6
    _assert_params_close(got, expected)
    # the log holds steps 1-3 from the checkpoint, then 4-6 of the resumed run
    assert lrs[3:] == pytest.approx([opt.schedule.lr(k) for k in (3, 4, 5)], rel=1e-12)


# --------------------------------------------------------------------------
# DeepSpeed client optimizer (a subprocess: deepspeed.initialize sets up a
# process group that must not leak into other tests)


def _run_deepspeed_worker(kind, tmp_path, *args, timeout=600):
    """The worker ``kind`` (the end of this file) as one rank in a
    subprocess; what it saved."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"{kind}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, __file__, kind, str(out), str(tmp_path / "rendezvous"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def _deepspeed_init(rendezvous, backend="gloo"):
    """A one-rank process group for DeepSpeed, in a worker."""
    import deepspeed
    import deepspeed.comm.torch

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce at
    # start-up (tens of seconds); one process never uses it
    deepspeed.comm.torch.build_shm_op = lambda: None
    # a file rendezvous: no TCP port to race for with other processes
    torch.distributed.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group above


def _zero_config(example, stage, dtype):
    config = dict(example.DS_CONFIG, zero_optimization={"stage": stage}, zero_allow_untested_optimizer=True)
    if dtype != "fp32":
        config[dtype] = {"enabled": True}
    return config


def _plain_loop(example, data, device="cpu"):
    """The oracle: the fused optimizer in a plain fp32 loop, 2 micro batches per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    schedule = onecycle_fused.schedule_from_config(example.DS_CONFIG["scheduler"])
    plain = FusedOneCycleAdamW(model.parameters(), schedule=schedule, weight_decay=0.01)
    for i, (x, y) in enumerate(data):
        (torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)) / 2).backward()
        if i % 2 == 1:
            plain.step()
            plain.zero_grad()
    return model


def test_deepspeed_client_optimizer(tmp_path):
    got = _run_deepspeed_worker("deepspeed", tmp_path, timeout=300)
    assert got["counter"] == 10  # 20 micro batches, 2 per optimizer step
    for name, (p, q) in got["params"].items():
        torch.testing.assert_close(p, q, msg=name)


# (ZeRO stage, dtype) cases; fp16 is refused by DeepSpeed's CPU accelerator
ZERO_CASES_CPU = [(1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")]
ZERO_CASES_GPU = [(0, "fp16"), (2, "fp16"), (3, "bf16")]


def _run_zero_cases(device, cases, tmp_path):
    spec = ",".join(f"{stage}:{dtype}" for stage, dtype in cases)
    return _run_deepspeed_worker("deepspeed-zero", tmp_path, device, spec)


def _check_zero_results(results):
    """Each DeepSpeed wrapper drives our step once per optimizer step with the
    schedule where it should be; fp32 ZeRO equals the plain loop (the update is
    element-wise, so flat partitions change nothing but the grad reduction
    order); 16-bit runs stay within a few 16-bit ulps of it."""
    sched = OneCycle(1e-4, 1e-3, cycle_first_step_size=5, cycle_min_mom=0.85, cycle_max_mom=0.95)
    for (stage, dtype), got in results.items():
        # 20 micro batches, 2 per step = 10 steps; at stage 0 DeepSpeed's 16-bit
        # wrapper runs one extra step on zero grads when it is built (README)
        extra = 1 if stage == 0 and dtype != "fp32" else 0
        assert got["counter"] == 10 + extra, (stage, dtype, got["counter"])
        assert got["last_lr"] == pytest.approx(sched.lr(10 + extra), rel=1e-12), (stage, dtype)
        for name, (p, q) in got["params"].items():
            if dtype == "fp32":
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{stage} {dtype} {name}")
            else:  # 16-bit forward/backward: a different trajectory, a bounded distance
                assert (p.float() - q).abs().max() < 5e-3, (stage, dtype, name)


def test_deepspeed_zero_and_bf16(tmp_path):
    _check_zero_results(_run_zero_cases("cpu", ZERO_CASES_CPU, tmp_path))


@pytest.mark.gpu
def test_deepspeed_zero_fp16_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_zero_results(_run_zero_cases("cuda", ZERO_CASES_GPU, tmp_path))


# (ZeRO stage, dtype, how the checkpoint is loaded): "native" is
# engine.load_checkpoint of what save_checkpoint wrote; "universal" converts it
# with ds_to_universal first and loads it with checkpoint.load_universal, which
# restores the per-parameter state without calling our load_state_dict (the
# step counter was lost there: the schedule restarted at 0); "weights" is
# load_checkpoint(load_optimizer_states=False)
RESUME_CASES_CPU = [(0, "fp32", "native"), (1, "fp32", "native"), (2, "fp32", "native"), (3, "fp32", "native"),
                    (0, "bf16", "native"), (1, "bf16", "native"), (2, "bf16", "native"), (3, "bf16", "native"),
                    (1, "fp32", "universal"), (2, "fp32", "universal"), (3, "fp32", "universal"),
                    (2, "bf16", "universal"), (2, "fp32", "weights")]


def test_deepspeed_checkpoint_resumes_the_schedule(tmp_path):
    """save_checkpoint after 8 of 20 micro batches (4 optimizer steps), a new
    engine and load_checkpoint, the other 12: the counter and the lr mirror
    continue where they stopped, and the weights equal the uninterrupted run
    (the oracle, the same config in one go: test_deepspeed_zero_and_bf16
    checks that one against the plain loop)."""
    spec = ",".join(":".join(map(str, case)) for case in RESUME_CASES_CPU)
    results = _run_deepspeed_worker("deepspeed-resume", tmp_path, tmp_path, spec)
    sched = OneCycle(1e-4, 1e-3, cycle_first_step_size=5, cycle_min_mom=0.85, cycle_max_mom=0.95)
    for (stage, dtype, load), got in results.items():
        case = (stage, dtype, load)
        extra = 1 if stage == 0 and dtype != "fp32" else 0  # DeepSpeed's step at build time (README)
        assert got["saved"] == 4 + extra, case
        if load == "weights":
            # a fresh optimizer state, so a fresh schedule; the engine's own
            # counts are loaded: set_step(global_steps - skipped_steps) resumes it
            assert got["loaded"] == (extra, sched.lr(extra), sched.momentum(extra)), case
            assert got["engine_steps"] == 4, case
            continue
        assert got["loaded"] == (4 + extra, sched.lr(4 + extra), sched.momentum(4 + extra)), case
        assert got["end"] == got["full_end"] == 10 + extra, case
        for name, (p, q) in got["params"].items():
            if dtype == "fp32":
                torch.testing.assert_close(p, q, msg=f"{case} {name}")
            else:  # the fp32 master weights are saved and loaded: nothing is rounded twice
                assert torch.equal(p, q), (case, name)


def _deepspeed_resume_worker(out, rendezvous, workdir, spec):
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    _deepspeed_init(rendezvous)
    example = _example("deepspeed_client_optimizer")
    data = example.batches(20)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def train(engine, batches, dtype):
        for x, y in batches:
            engine.backward(torch.nn.functional.mse_loss(engine(x.to(engine.device, dtypes[dtype])).float(), y))
            engine.step()

    def position(wrapper):
        ours = getattr(wrapper, "optimizer", wrapper)
        return int(ours.step_counter()), ours.get_last_lr()[0], ours.param_groups[0]["betas"][0]

    results = {}
    for case in spec.split(","):
        stage, dtype, load = int(case.split(":")[0]), *case.split(":")[1:]
        config = _zero_config(example, stage, dtype)
        engine, wrapper = example.build(config)  # the uninterrupted run
        train(engine, data, dtype)
        full = [p.detach().clone() for p in engine.module.parameters()]
        full_end = position(wrapper)[0]
        engine.destroy()

        ckpt = os.path.join(workdir, case.replace(":", "_"))
        engine, wrapper = example.build(config)
        train(engine, data[:8], dtype)
        saved = position(wrapper)[0]
        engine.save_checkpoint(ckpt)
        engine.destroy()
        if load == "universal":
            tag = open(os.path.join(ckpt, "latest")).read().strip()
            ds_to_universal.main(argparse.Namespace(
                input_folder=os.path.join(ckpt, tag), output_folder=os.path.join(ckpt, tag + "_universal"),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True))  # (universal_checkpoint_info, which Megatron-DeepSpeed writes)
            config = dict(config, checkpoint={"load_universal": True})

        engine, wrapper = example.build(config)  # as a new process would
        engine.load_checkpoint(ckpt, load_optimizer_states=load != "weights")
        loaded = position(wrapper)
        engine_steps = engine.global_steps - engine.skipped_steps
        train(engine, data[8:], dtype)
        results[(stage, dtype, load)] = {
            "full_end": full_end, "saved": saved, "loaded": loaded, "end": position(wrapper)[0],
            "engine_steps": engine_steps,
            "params": {name: (p.detach().clone(), q) for (name, p), q in zip(engine.module.named_parameters(), full)},
        }
        engine.destroy()
    torch.save(results, out)


def _deepspeed_zero_worker(out, rendezvous, device, spec):
    _deepspeed_init(rendezvous, "nccl" if device == "cuda" else "gloo")
    example = _example("deepspeed_client_optimizer")
    data = example.batches(20)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    results = {}
    for case in spec.split(","):
        stage, dtype = int(case.split(":")[0]), case.split(":")[1]
        engine, wrapper = example.build(_zero_config(example, stage, dtype))
        ours = getattr(wrapper, "optimizer", wrapper)  # DeepSpeed's wrapper holds ours
        for x, y in data:
            x, y = x.to(engine.device, dtypes[dtype]), y.to(engine.device)
            engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
            engine.step()
        model = _plain_loop(example, data, device)
        results[(stage, dtype)] = {
            "counter": int(ours.step_counter()),
            "last_lr": ours.get_last_lr()[0],
            "params": {name: (p.detach().cpu().clone(), q.detach().cpu().clone())
                       for (name, p), q in zip(engine.module.named_parameters(), model.parameters())},
        }
        engine.destroy()
    torch.save(results, out)


def _deepspeed_worker(out, rendezvous):
    _deepspeed_init(rendezvous)
    example = _example("deepspeed_client_optimizer")
    data = example.batches(20)
    engine, opt = example.build()
    example.train(engine, data)
    model = _plain_loop(example, data)
    params = {name: (p.detach().clone(), q.detach().clone())
              for (name, p), q in zip(engine.module.named_parameters(), model.parameters())}
    torch.save({"counter": int(opt.step_counter()), "params": params}, out)


if __name__ == "__main__":
    if sys.argv[1] == "deepspeed":
        _deepspeed_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "deepspeed-zero":
        _deepspeed_zero_worker(*sys.argv[2:6])
    elif sys.argv[1] == "deepspeed-resume":
        _deepspeed_resume_worker(*sys.argv[2:6])
