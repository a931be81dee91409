"""PyTorch Lightning: ``configure_optimizers`` returns the fused optimizer,
with no lr scheduler (the schedule runs inside ``optimizer.step()``).

``LearningRateMonitor`` reads ``param_groups[i]['lr']`` (and ``'betas'`` /
``'momentum'``), which the optimizer keeps equal to the values of the next
step, so it logs the true schedule.

    pip install lightning
    python examples/lightning_example.py --steps 40   # writes lightning_logs/ in the current directory
"""
import argparse

import torch

try:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # the older package name
    import pytorch_lightning as L
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

from onecycle_fused import FusedOneCycleSGD


class TinyClassifier(L.LightningModule):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # 1-Cycle over the run: up for 40%, down for 40%, then decay
        up = max(1, int(0.4 * self.steps))
        return FusedOneCycleSGD(self.parameters(), cycle_min_lr=0.01, cycle_max_lr=0.1,
                                cycle_first_step_size=up, decay_step_size=max(1, up // 4), decay_lr_rate=0.5,
                                cycle_min_mom=0.85, cycle_max_mom=0.95, nesterov=True)


def make_data(n=512, batch_size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = centers[y] + torch.randn(n, 16, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def main(argv=None, log_dir="."):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.manual_seed(0)
    model = TinyClassifier(args.steps)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=CSVLogger(log_dir),
        callbacks=[LearningRateMonitor(logging_interval="step", log_momentum=True)],
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, make_data())
    print("logged to", trainer.logger.log_dir)
    return model, trainer


if __name__ == "__main__":
    main()
