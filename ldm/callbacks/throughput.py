"""Images per second and peak GPU memory, logged without per-step host syncs.

Batch sizes come from the host-side caption lists; the clock is read every
`every_n_steps` steps and at each epoch's end, so the GPU queue is never drained to
measure it (the figure is the host's pace, which the GPU's sets once the queue is full).
"""
from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch


class Throughput(pl.Callback):
    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError("lightning.callbacks.throughput.params.every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self._images = 0
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._t0 = 0, time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch["caption"]) * trainer.world_size
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images:
            self._log(trainer, pl_module)  # the epoch's tail, and short epochs

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is None:
            return
        now = time.perf_counter()
        metrics = {"perf/images_per_sec": self._images / max(now - self._t0, 1e-9)}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":  # the window's peak
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._images, self._t0 = 0, now
