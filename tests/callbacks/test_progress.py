"""The progress bar: the run's ETA, and no read-back of GPU metrics at every step."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.progress import RunProgressBar, run_eta


def test_run_eta_text():
    assert run_eta(10, 100, 20.0, 10) == "10/100 ETA 0:03:00"
    assert run_eta(0, 100, 0.0, 0) == "0/100"
    assert run_eta(5, float("inf"), 1.0, 5) == "5"


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_bar_reads_metrics_every_refresh_not_every_step(tmp_path):
    bar = RunProgressBar()
    calls = []
    original = bar.get_metrics
    bar.get_metrics = lambda trainer, module: calls.append(trainer.global_step) or original(trainer, module)
    trainer = pl.Trainer(max_steps=40, callbacks=[bar], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, log_every_n_steps=1000, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(80, 4)), batch_size=2))
    training_reads = [s for s in calls if s > 0]
    assert 3 <= len(training_reads) <= 6, calls  # every 10th step, plus the epoch's end
