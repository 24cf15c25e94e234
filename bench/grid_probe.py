"""What a sample grid's time is made of, part by part (issue: performance, target 2).

    E2E_OVERRIDES="bench/configs/end_to_end.yaml bench/configs/grid_probe.yaml" bash bench/end_to_end.sh

The epoch end's grid took ~0.7 s longer than the grid 100 steps later (the pause probe: 1.6 s
against 0.9 s). This wraps the parts of `txt2img` (the text encoder, the sampler's loop, each
image's VAE decode) and the ImageLogger's `log_samples` in a host clock with a CUDA sync on
both sides: inside a grid, which is a pause already, a sync moves no time between the parts.
Prints one line per grid: its global step, latent shape, total seconds and, per part, the
seconds of each call; and for the UNet calls inside the sampler (no sync added there), the
median milliseconds the host spent in each call and the GPU's timeline advanced over it:
the host's far shorter than the GPU's means the sampler is bound by the GPU.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable

import pytorch_lightning as pl
import statistics

import torch

from ldm.callbacks.image_logger import ImageLogger
from ldm.models.diffusion.txt2img import SAMPLERS


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GridProbe(pl.Callback):
    def __init__(self) -> None:
        self._parts: dict[str, list[float]] | None = None  # within a grid: part -> seconds of each call
        self._shape: list[int] | None = None
        self._unet: list[tuple[float, Any, Any]] = []  # per UNet call in a grid: host seconds, CUDA events

    def _timed(self, original: Callable, name: str) -> Callable:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._parts is None:
                return original(*args, **kwargs)
            _sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync()
                self._parts.setdefault(name, []).append(round(time.perf_counter() - start, 4))
        return timed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for attr in ("get_learned_conditioning", "decode_first_stage"):  # instance attributes
            setattr(pl_module, attr, self._timed(getattr(pl_module, attr), attr))
        apply_model = pl_module.apply_model

        def unet_call(*args: Any, **kwargs: Any) -> Any:
            if self._parts is None or not torch.cuda.is_available():
                return apply_model(*args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            out = apply_model(*args, **kwargs)
            end.record()
            self._unet.append((time.perf_counter() - t0, start, end))
            return out
        pl_module.apply_model = unet_call
        for sampler_class, _ in SAMPLERS.values():  # the classes: a bench process only
            probe = self

            def sample(this: Any, cond: Any, uncond: Any, shape: Any, *args: Any,
                       _original: Callable = sampler_class.sample, **kwargs: Any) -> Any:
                probe._shape = list(shape)
                return _original(this, cond, uncond, shape, *args, **kwargs)
            sampler_class.sample = self._timed(sample, f"{sampler_class.__name__}.sample")
        for cb in trainer.callbacks:
            if isinstance(cb, ImageLogger):
                original = cb.log_samples

                def log_samples(trainer: pl.Trainer, pl_module: pl.LightningModule,
                                _original: Callable = original) -> None:
                    self._parts, self._shape, self._unet = {}, None, []
                    _sync()
                    start = time.perf_counter()
                    try:
                        _original(trainer, pl_module)
                    finally:
                        _sync()
                        total = time.perf_counter() - start
                        parts, self._parts = self._parts, None
                        unet = {}
                        if self._unet:
                            unet = {"unet_calls": len(self._unet),
                                    "unet_host_ms": round(1000 * statistics.median(h for h, _, _ in self._unet), 2),
                                    "unet_gpu_ms": round(statistics.median(
                                        a.elapsed_time(b) for _, a, b in self._unet), 2)}
                        if parts:
                            print("grid probe: " + json.dumps({
                                "step": trainer.global_step, "latent_shape": self._shape,
                                "seconds": round(total, 3), "parts": parts, **unet}), flush=True)
                cb.log_samples = log_samples
