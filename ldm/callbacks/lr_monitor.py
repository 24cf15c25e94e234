"""Lightning's LearningRateMonitor, without its wait for the GPU at each logging step.

At each step the loggers write (`log_every_n_steps`), Lightning's monitor also puts every
learning rate into `trainer.callback_metrics` as a tensor made on the training GPU from a
Python float. That copy from host memory runs on the current CUDA stream, and torch waits for
the stream to finish it: for every step queued before it. With the UNet's steps replayed from
CUDA graphs the host runs about a step ahead, so each logging step waited ~85 ms, 1.6% of a
50-step interval (doc/performance/end-to-end.md). Here the monitor's hook runs on a CUDA stream
of its own, where nothing else is queued: the copy waits for itself only. What is logged, and
what `callback_metrics` holds, is unchanged: the same names (`lr-AdamW/unet` ...) and values.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class LearningRateMonitor(pl.callbacks.LearningRateMonitor):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stream: torch.cuda.Stream | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            super().on_train_batch_start(trainer, *args, **kwargs)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(self._stream):  # the learning rates' copies wait for nothing queued before them
            super().on_train_batch_start(trainer, *args, **kwargs)
