"""The progress bar: Lightning's per-epoch bar (loss, it/s, the epoch's ETA) plus the whole
run's position and ETA, e.g. `run=120/800 ETA 0:04:31`.

The run's ETA is the mean time per optimizer step since this process started training,
times the steps left (`trainer.estimated_stepping_batches`: max_steps, or epochs x steps).
It reads host clocks and counters only, so it costs no GPU sync. The bar itself refreshes
every `refresh_rate` (10) steps: each refresh reads the training loss back from the GPU (a host
sync), so refreshing every step would stall the GPU queue once per step.

The loss shown is not a progress-bar metric of Lightning's (`self.log(..., prog_bar=True)`):
Lightning converts those to Python numbers after every batch, refreshed or not, a host sync per
step. The training steps log it without `prog_bar`, and the bar reads the latest value from the
callback metrics when it refreshes (SHOWN).
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

# training metrics the bar shows, read at its refreshes (LatentDiffusion's, the VAE trainer's)
SHOWN = ("train/loss_step", "train/loss_epoch", "train/rec_loss")


def run_eta(done: int, total: float, elapsed_s: float, steps_timed: int) -> str:
    """`done/total ETA h:mm:ss`; the ETA is left out until a step has been timed."""
    if not math.isfinite(total):
        return f"{done}"
    text = f"{done}/{int(total)}"
    if steps_timed > 0:
        left = max(int(total) - done, 0) * elapsed_s / steps_timed
        text += f" ETA {_dt.timedelta(seconds=round(left))}"
    return text


class RunProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for key in SHOWN:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                metrics[key] = float(value)  # the one read-back of this refresh
        if self._t0 is not None and trainer.training:
            metrics["run"] = run_eta(trainer.global_step, trainer.estimated_stepping_batches,
                                     time.perf_counter() - self._t0, trainer.global_step - self._step0)
        return metrics
