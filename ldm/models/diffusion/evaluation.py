"""Evaluation for LatentDiffusion: the validation loss and the scopes that validation and
sampling run in. A mixin of LatentDiffusion (ddpm.py), which provides the model parts it
uses (`batch_latents`, `batch_conditioning`, `p_losses`, `objective`, `model_ema`).

    val/loss = mean over images of loss(UNet(z_t, t, c), target), with z_0 the posterior mean
               and t, eps drawn from a generator seeded by the image's path
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import torch


class Evaluation:
    def fixed_noise_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-image loss [B] with the latent (posterior mean), timestep and noise fixed per
        image (seeded by its path): the same number for the same weights, every time.

        The same objective as training where it is a definition of the task: the timestep range,
        loss_type and min-SNR weighting (and the schedule), so val/loss compares with train/loss.
        The noise is plain N(0, I): offset, multi-resolution noise and input perturbation are
        random perturbations of training, left out so that val/loss measures the model on the
        forward process itself, comparably across runs with different noise settings."""
        z0 = self.batch_latents(batch, mode=True)
        context = self.batch_conditioning(batch)
        gens = [torch.Generator().manual_seed(zlib.crc32(str(p).encode())) for p in batch["path"]]
        lo, hi = self.objective.min_timestep, self.objective.max_timestep
        t = torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in gens]).to(self.device)
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(z0)
        return self.p_losses(z0, context, t, noise)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """`val/loss` (fixed_noise_loss, so epochs compare) with the EMA weights when EMA is on
        (what pruning exports), and `val/loss_no_ema` with the raw ones."""
        n = len(batch["caption"])
        with self.eval_scope():
            self.log("val/loss", self.fixed_noise_loss(batch).mean(), on_epoch=True, batch_size=n,
                     prog_bar=True, sync_dist=True)
        if self.use_ema:
            with self.eval_scope(ema=False):
                self.log("val/loss_no_ema", self.fixed_noise_loss(batch).mean(), on_epoch=True, batch_size=n,
                         sync_dist=True)

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """EMA weights in the UNet for the duration of the block (sampling, validation)."""
        with (self.model_ema.swapped_in(self.model) if self.use_ema else nullcontext()):
            yield

    @contextmanager
    def eval_scope(self, ema: bool = True) -> Iterator[None]:
        """Evaluation (validation, sampling): the EMA weights (ema_scope) and, with CUDA graphs
        (compile: reduce-overhead), the compiled blocks run uncompiled. A graph tree would take
        each no-grad block call for a new step and reuse the memory of the earlier blocks'
        outputs, which the UNet's skip connections still hold."""
        with (self.ema_scope() if ema else nullcontext()), \
                (torch.compiler.set_stance("force_eager") if self.cudagraphs else nullcontext()):
            yield
