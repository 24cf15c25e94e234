"""The progress bar: Lightning's per-epoch bar (loss, it/s, the epoch's ETA) plus the whole
run's position and ETA, e.g. `run=120/800 ETA 0:04:31`.

The run's ETA is the mean time per optimizer step since this process started training,
times the steps left (`trainer.estimated_stepping_batches`: max_steps, or epochs x steps).
It reads host clocks and counters only, so it costs no GPU sync. The bar itself refreshes
every `refresh_rate` (10) steps.

The loss shown is not a progress-bar metric of Lightning's (`self.log(..., prog_bar=True)`):
Lightning converts those to Python numbers after every batch, refreshed or not, a host sync per
step. The training steps log it without `prog_bar`, and the bar takes the latest value from the
callback metrics when it refreshes (SHOWN), without waiting for the GPU (LaggedRead): a refresh
during training starts the value's copy to the host and shows the last copy that has arrived,
so the loss shown is one refresh old. A sync there would empty the GPU's queue: with the UNet's
step replayed from CUDA graphs the GPU then idles while the host prepares the next step
(doc/performance/end-to-end.md). The refreshes at the epoch's end and after validation wait
for the current value.
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
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


class LaggedRead:
    """Scalars read without waiting for the GPU. Each call starts copies of the values on the GPU
    to the host (behind the work queued so far, marked by an event) and returns the values of the
    last copies that have arrived; values on the CPU are read at once. `wait=True` waits for the
    copies in flight and reads every value now."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self._pending: tuple[dict[str, torch.Tensor], Any] | None = None  # (host copies, event)

    @staticmethod
    def on_gpu(value: torch.Tensor) -> bool:
        return value.is_cuda

    @staticmethod
    def new_event() -> Any:
        return torch.cuda.Event()

    def __call__(self, values: dict[str, torch.Tensor], wait: bool = False) -> dict[str, float]:
        if self._pending is not None and (wait or self._pending[1].query()):
            self._pending[1].synchronize()
            self.values.update({k: float(v) for k, v in self._pending[0].items()})  # arrived: no sync
            self._pending = None
        later = {k: v.detach() for k, v in values.items() if self.on_gpu(v) and not wait}
        self.values.update({k: float(v) for k, v in values.items() if k not in later})
        if later and self._pending is None:
            copies = {k: v.to("cpu", non_blocking=True) for k, v in later.items()}  # into page-locked memory
            event = self.new_event()
            event.record()
            self._pending = (copies, event)
        return dict(self.values)


class RunProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self._t0: float | None = None
        self._step0 = 0
        self._read = LaggedRead()
        self._in_batch = False  # a refresh between training steps: read without waiting

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._in_batch = True
        try:
            super().on_train_batch_end(*args, **kwargs)
        finally:
            self._in_batch = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        values = {key: trainer.callback_metrics[key] for key in SHOWN if key in trainer.callback_metrics}
        metrics.update(self._read(values, wait=not self._in_batch))
        if self._t0 is not None and trainer.training:
            metrics["run"] = run_eta(trainer.global_step, trainer.estimated_stepping_batches,
                                     time.perf_counter() - self._t0, trainer.global_step - self._step0)
        return metrics
