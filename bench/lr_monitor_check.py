"""Does the learning-rate monitor wait for the GPU at logging steps? (issue: performance, target 2)

    python bench/lr_monitor_check.py [--queued_ms 100]

A small model trains 30 steps on the GPU, the loggers writing every 5; each step ends by
queueing `--queued_ms` of GPU work (torch.cuda._sleep), as a step replayed from CUDA graphs
leaves the GPU busy while the host goes on. Prints, for Lightning's LearningRateMonitor and for
ldm.callbacks.lr_monitor's, the host milliseconds of the monitor's hook at the logging steps and
the rates logged (the same names and values for both).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from ldm.callbacks.lr_monitor import LearningRateMonitor


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rates: list[dict] = []

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("lr-") for k in metrics):
            self.rates.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


class Model(pl.LightningModule):
    def __init__(self, cycles: int):
        super().__init__()
        self.net = torch.nn.Linear(256, 256)
        self.cycles = cycles

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def on_train_batch_end(self, *args):
        torch.cuda._sleep(self.cycles)  # the GPU busy for ~queued_ms after the host moves on

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(60, 256))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": self.net.parameters(), "lr": 1e-4, "name": "unet"}])


def timed_hook(monitor: pl.callbacks.LearningRateMonitor, times: list[float]) -> None:
    original = monitor.on_train_batch_start

    def hook(trainer, *args, **kwargs):
        logs = trainer._logger_connector.should_update_logs
        start = time.perf_counter()
        original(trainer, *args, **kwargs)
        if logs:
            times.append(1000 * (time.perf_counter() - start))
    monitor.on_train_batch_start = hook


def run(monitor_class: type, cycles: int) -> dict:
    monitor, logger, times = monitor_class(logging_interval="step"), Recorder(), []
    timed_hook(monitor, times)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=30, log_every_n_steps=5, logger=logger,
                         callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Model(cycles))
    return {"hook_ms_at_logging_steps": [round(t, 2) for t in times],
            "median_ms": round(statistics.median(times), 2), "rates": logger.rates[:2]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queued_ms", type=float, default=100.0)
    args = p.parse_args()
    # cycles per ms from the GPU's clock: time a known sleep first
    torch.cuda._sleep(10**6)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(10**8)
    torch.cuda.synchronize()
    cycles = int(args.queued_ms * 10**8 / (1000 * (time.perf_counter() - start)))
    for name, cls in (("lightning", pl.callbacks.LearningRateMonitor), ("ours", LearningRateMonitor)):
        print(json.dumps({"monitor": name, "queued_ms": args.queued_ms, **run(cls, cycles)}), flush=True)


if __name__ == "__main__":
    main()
