"""Hugging Face ``Trainer`` with the fused optimizer: ``optimizers=(ours, ...)``.

The schedule runs inside ``optimizer.step()``, so the Trainer needs no lr
scheduler. With ``optimizers=(ours, None)`` the Trainer still builds its own
(``lr_scheduler_type``, linear by default): the training math is unaffected
(the fused step ignores ``param_groups[i]['lr']``), but the logged
``learning_rate`` is that scheduler's, not the true one. Pass
``ScheduleMirror(ours)`` instead of ``None`` to log the true values.

A tiny GPT-2 built from a config (no download) on random tokens:

    pip install transformers accelerate
    python examples/hf_trainer_example.py --steps 20
"""
import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from onecycle_fused import FusedOneCycleAdamW, ScheduleMirror


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def random_tokens(n=64, length=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv=None, output_dir=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    model = tiny_gpt2()
    opt = FusedOneCycleAdamW(model.parameters(), cycle_min_lr=1e-4, cycle_max_lr=1e-3,
                             cycle_first_step_size=max(1, args.steps // 2), weight_decay=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=output_dir or tmp, per_device_train_batch_size=8, max_steps=args.steps,
                                  logging_steps=5, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                                  seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=random_tokens(),
                          optimizers=(opt, ScheduleMirror(opt)))
        trainer.train()
    for entry in trainer.state.log_history:
        if "learning_rate" in entry:
            print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.3e}")
    return model, opt, trainer


if __name__ == "__main__":
    main()
