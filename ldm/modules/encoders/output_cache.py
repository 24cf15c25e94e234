"""The frozen text encoder's output per caption, kept on the device (`cache_text_encoder_outputs`).

A frozen text encoder maps a caption to the same context c [L, D] every time it is seen, yet
a training step runs it on every batch. The cache keeps c per caption string the first time a
batch brings it and builds later batches from the kept rows: one stacking kernel, no
tokenizing, no encoder. A compiled SD 1.x step at batch 32 on an H200 ran 1.005-1.016x faster
with it (doc/PERFORMANCE.md). Smaller batches should gain a larger share, as the encoder's
kernel launches cost the host the same at any batch; that is not measured.

Values: a row is the encoder's output for that caption, cast to autocast's dtype when the
step runs under autocast. Every consumer of c is a product (the cross-attentions' to_k and
to_v, and adapters on them) that autocast would cast to that dtype anyway, so a cached step
computes what an uncached one does (tests/modules/test_output_cache.py).

Memory: SD 1.x's c is 77 x 768 values, 116 KiB per caption in bf16 (SD 2.x: 154 KiB). Rows are
kept until `max_bytes` (256 MiB: ~2,200 SD 1.x captions in bf16) is reached; captions seen
after that are encoded every step, as without the cache. Nothing is written to disk: the
cache lives as long as the run's process (a resumed run fills it again).
"""
from __future__ import annotations

from typing import Sequence

import torch

MAX_BYTES = 256 * 2**20


class TextEncoderOutputCache:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.rows: dict[str, torch.Tensor] = {}  # caption -> c [L, D] on the device
        self.bytes = 0
        self.full = False  # max_bytes reached: new captions are no longer kept

    def __len__(self) -> int:
        return len(self.rows)

    def has_all(self, captions: Sequence[str]) -> bool:
        return all(c in self.rows for c in captions)

    def lookup(self, captions: Sequence[str]) -> torch.Tensor | None:
        """c [B, L, D] for a batch whose every caption is kept, else None (encode the batch)."""
        if not captions or not self.has_all(captions):
            return None
        return torch.stack([self.rows[c] for c in captions])

    def store(self, captions: Sequence[str], context: torch.Tensor) -> torch.Tensor:
        """Keep row i of `context` [B, L, D] (the encoder's output for this batch) for captions[i]
        not yet kept, in autocast's dtype when autocast is on, while the cache has room. Returns
        the batch's context in that dtype, as `lookup` gives it: every training step then hands
        the UNet one dtype, so a shape is recorded once with `cuda_graphs` and compiled once with
        `compile` (the encoder's output is fp32 under autocast, its LayerNorm's dtype)."""
        device = context.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else context.dtype
        context = context.detach().to(dtype)
        for i, caption in enumerate(captions):
            if caption in self.rows or self.full:
                continue
            size = context[i].numel() * dtype.itemsize
            if self.bytes + size > self.max_bytes:
                self.full = True
                continue
            self.rows[caption] = context[i].clone()
            self.bytes += size
        return context


def text_encoder_output_cache(setting: bool | None, text_encoder_trains: bool,
                              key: str = "model.params.cache_text_encoder_outputs") -> TextEncoderOutputCache | None:
    """The cache for `cache_text_encoder_outputs`: null (the default) keeps one whenever the text
    encoder is frozen, true insists on it, false turns it off. A text encoder that trains (itself
    or through adapters) gives new outputs every step: nothing to keep."""
    if setting is not None and not isinstance(setting, bool):
        raise ValueError(f"{key}: expected true, false or null, got {setting!r}")
    if setting and text_encoder_trains:
        raise ValueError(f"{key}: the text encoder trains (cond_stage_trainable, or a network targeting "
                         f"text_encoder), so its outputs change every step; set it to false or null")
    return TextEncoderOutputCache() if setting is not False and not text_encoder_trains else None
