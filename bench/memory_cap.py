"""Does a run fit a card of `cap_gib`? (issue: performance, target 3: "batch 1 in 6 GiB").

    lightning: {callbacks: {memory_cap: {target: bench.memory_cap.MemoryCap, params: {cap_gib: 6.0}}}}
    bash bench/main_preset.sh configs/stable-diffusion/presets/vram_6gb.yaml /tmp/p6 \
        lightning.callbacks.memory_cap.target=bench.memory_cap.MemoryCap \
        lightning.callbacks.memory_cap.params.cap_gib=5.6

The target's figure is PyTorch's peak of allocated memory. A card also holds what the caching
allocator keeps reserved beyond that (free blocks of the wrong size) and the CUDA context,
which no allocator counts. At setup this caps the allocator's reserved memory at `cap_gib`
(torch.cuda.set_per_process_memory_fraction: past it the allocator frees its cache and
retries, then raises out-of-memory, as on a card that size); at the end it prints the peaks
and the memory the process holds outside the allocator (the context), so that cap plus
context is the card the run needs.
"""
from __future__ import annotations

import json

import pytorch_lightning as pl
import torch


class MemoryCap(pl.Callback):
    def __init__(self, cap_gib: float = 6.0):
        self.cap_gib = cap_gib

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(self.cap_gib * 2**30 / total)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not torch.cuda.is_available():
            return
        free, total = torch.cuda.mem_get_info()
        gib = 2**30
        print("memory cap: " + json.dumps({
            "cap_GiB": self.cap_gib, "peak_allocated_GiB": round(torch.cuda.max_memory_allocated() / gib, 3),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / gib, 3),
            "outside_allocator_GiB": round((total - free - torch.cuda.memory_reserved()) / gib, 3)}), flush=True)
