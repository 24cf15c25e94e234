"""Training an AutoencoderKL from scratch (the first stage of a new latent diffusion model).

    x [B,3,H,W] --encode--> q(z|x) --sample--> z --decode--> x_rec
    loss = |x - x_rec|_1  +  kl_weight * KL(q(z|x) || N(0, I)) / (H*W)

L1 reconstruction plus a small KL pull (SD's first stage adds a perceptual loss and a
patch discriminator; for the flat colours of the tiny model L1 is enough). The network
sits under `first_stage_model`, so a checkpoint of this module has exactly the keys a
LatentDiffusion model reads (`first_stage_config.params.ckpt_path` takes it as it is).
"""
from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from ldm.models.autoencoder import AutoencoderKL


class AutoencoderKLTraining(pl.LightningModule):
    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, kl_weight: float = 1.0e-6,
                 weight_decay: float = 0.0):
        super().__init__()
        self.first_stage_model = AutoencoderKL(ddconfig, embed_dim)
        self.kl_weight, self.weight_decay = kl_weight, weight_decay
        self.learning_rate = 1.0e-4  # set by the trainer from model.base_learning_rate

    def losses(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1 reconstruction, KL per latent element), each averaged over the batch."""
        x_rec, posterior = self.first_stage_model(x, sample_posterior=sample)
        rec = (x - x_rec).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return rec, kl

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        rec, kl = self.losses(batch["image"])
        loss = rec + self.kl_weight * kl
        n = batch["image"].shape[0]
        self.log("train/rec_loss", rec, batch_size=n)  # shown by the bar at its refreshes, not read every step
        self.log("train/kl", kl, batch_size=n)
        self.log("train/loss", loss, batch_size=n)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rec, kl = self.losses(batch["image"], sample=False)  # the posterior mean: deterministic
        n = batch["image"].shape[0]
        self.log("val/rec_loss", rec, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/loss", rec + self.kl_weight * kl, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.first_stage_model.parameters(), lr=self.learning_rate,
                                 betas=(0.5, 0.9), weight_decay=self.weight_decay)
