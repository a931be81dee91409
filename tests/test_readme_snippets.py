"""The README's Python snippets run as written, one after another in one
namespace (a reader's session), on a small model, with the tutorial's
config as the README's ``ds_config.json``. What each leaves behind is
checked: against DeepSpeed's own OneCycle driving torch.optim, and against
the values the README prints. The snippet that needs a DeepSpeed engine
(distributed init) is not run here: tests/test_trainers.py runs that path
through examples/deepspeed_client_optimizer.py; nor is the ZeRO one
(tests/test_distributed.py runs it, in a process group)."""
import json
import os
import re
import shutil
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_CONFIG = os.path.join(ROOT, "tests", "data", "onecycle_tutorial.json")


def _snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _torch_with_deepspeed(opt_cls, steps, data, model, loss_fn, **schedule):
    """torch.optim ``opt_cls`` on ``model`` driven by DeepSpeed's OneCycle for
    ``steps`` steps of ``data``: (optimizer, scheduler)."""
    ds = pytest.importorskip("deepspeed.runtime.lr_schedules")
    opt = opt_cls(model.parameters(), lr=0.1)
    sched = ds.OneCycle(opt, **schedule)
    for x, y in data[:steps]:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()
    return opt, sched


def test_every_snippet_runs_as_written_and_gives_deepspeeds_numbers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # (the range-test snippet draws its plot)
    ds = pytest.importorskip("deepspeed.runtime.lr_schedules")
    monkeypatch.chdir(tmp_path)
    shutil.copy(SEED_CONFIG, "ds_config.json")
    loss_fn = torch.nn.functional.mse_loss

    def new_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(5)]
    # a torch.optim checkpoint for the migration snippet: AdamW + DeepSpeed's
    # OneCycle with the config's values, 3 steps
    with open(SEED_CONFIG) as f:
        seed = json.load(f)["scheduler"]["params"]
    torch_model = new_model()
    torch_opt, torch_sched = _torch_with_deepspeed(torch.optim.AdamW, 3, loader, torch_model, loss_fn, **seed)
    ckpt = {"optimizer": torch_opt.state_dict(), "lr_scheduler": torch_sched.state_dict()}

    model = new_model()
    ns = {"torch": torch, "model": model, "params": list(model.parameters()), "loader": loader,
          "loss_fn": loss_fn, "ckpt": ckpt}
    ran = []
    for i, code in enumerate(_snippets()):
        if "deepspeed.initialize" in code or "torch.distributed.all_reduce" in code:
            continue  # (a process group: tests/test_distributed.py runs the ZeRO snippet)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
        ours = [str(w.message) for w in caught if "onecycle_fused" in w.filename or "FusedOneCycle" in str(w.message)]
        assert not ours, (i, ours)  # a README example that our own code warns about
        ran.append(code)
        opt = ns.get("opt")
        if "for x, y in loader:" in code:
            # the first example: SGD over the loader, as torch.optim.SGD with DeepSpeed's OneCycle
            # (SGD has no betas, so DeepSpeed leaves its momentum alone; ours
            # is cycled, a documented difference: the momentum is DeepSpeed's
            # for an optimizer with betas, its cycle_max_mom before a step)
            twin = new_model()
            kw = dict(cycle_min_lr=1e-4, cycle_max_lr=1e-3, cycle_first_step_size=1000, cycle_first_stair_count=500,
                      decay_step_size=1000, decay_lr_rate=0.001, cycle_min_mom=0.85, cycle_max_mom=0.99)
            sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.99, weight_decay=5e-4, nesterov=True)
            sched = ds.OneCycle(sgd, **kw)
            with_betas = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
            momentum = ds.OneCycle(with_betas, **kw)
            for x, y in loader:
                sgd.zero_grad()
                loss_fn(twin(x), y).backward()
                sgd.step()
                sched.step()
                momentum.step()
                sgd.param_groups[0]["momentum"] = with_betas.param_groups[0]["betas"][0]
            assert int(opt.step_counter()) == len(loader)
            assert opt.get_last_lr() == [sgd.param_groups[0]["lr"]]
            assert opt.param_groups[0]["momentum"] == sgd.param_groups[0]["momentum"]
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            model.load_state_dict(new_model().state_dict())  # (the next snippets start afresh)
        elif "sched.lr(500), sched.momentum(500)" in code:
            # the values the README's comment prints, and DeepSpeed's (Adam: momentum cycled)
            printed = re.search(r"as DeepSpeed: ([0-9.e-]+), ([0-9.e-]+)", code).groups()
            adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
            deepspeed_sched = ds.OneCycle(adam, **seed)
            for _ in range(500):
                adam.step()
                deepspeed_sched.step()
            expected = (adam.param_groups[0]["lr"], adam.param_groups[0]["betas"][0])
            assert (ns["sched"].lr(500), ns["sched"].momentum(500)) == tuple(map(float, printed)) == expected
            assert ns["sched"].params()["cycle_max_lr"] == seed["cycle_max_lr"]
        elif "TorchOneCycle(" in code:
            torch_sched = torch.optim.lr_scheduler.OneCycleLR(
                torch.optim.SGD(ns["params"], lr=0.1, momentum=0.9), max_lr=0.1, total_steps=1000)
            assert opt.get_last_lr() == torch_sched.get_last_lr()
        elif "lr_range_test(" in code:
            result = ns["result"]
            assert 0 < result.cycle_min_lr < result.cycle_max_lr <= max(result.lrs)
            assert os.path.getsize("range_test.png") > 0
            assert opt.schedule.params()["cycle_max_lr"] == result.cycle_max_lr
        elif "load_torch_optimizer_state(" in code:
            # the position and lr are the torch run's
            assert int(opt.step_counter()) == 3 and opt.get_last_lr() == [torch_opt.param_groups[0]["lr"]]
        elif "def opt_step" in code:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            ns["opt_step"]()
            assert int(opt.step_counter()) == 4
    assert len(ran) == len(_snippets()) - 2 and len(ran) >= 6  # (all but the two that need a process group)
