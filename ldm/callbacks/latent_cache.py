"""LatentCacheFiller: encode the images missing from the latent cache before the first step.

Runs in `on_fit_start`: by then Lightning has moved the model to its device (and cast an
adapter run's frozen VAE), the data module has built its datasets and the process group
exists, and no loader worker has started yet, so every worker receives the filled entry
table. Each rank encodes its share of the missing entries, then all wait at a barrier.
See ldm.data.latent_cache.
"""
from __future__ import annotations

import pytorch_lightning as pl

from ldm.data.latent_cache import fill


class LatentCacheFiller(pl.Callback):
    def __init__(self, batch_size: int = 8):
        self.batch_size = batch_size
        self.counts: dict[str, int] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "datasets"):
            return
        datasets = list(datamodule.datasets().values())
        say = print if trainer.global_rank == 0 else (lambda text: None)
        self.counts = fill(datasets, pl_module.first_stage_model, pl_module.device, batch_size=self.batch_size,
                           rank=trainer.global_rank, world_size=trainer.world_size,
                           barrier=lambda: trainer.strategy.barrier("latent_cache"), say=say)


def wants_latent_cache(datamodule) -> bool:
    """Whether any dataset of the data module has cache_latents on."""
    if datamodule is None or not hasattr(datamodule, "datasets"):
        return False
    return any(getattr(ds, "cache_latents", False) for ds in datamodule.datasets().values() if ds is not None)
