"""Same-bucket batches for one rank, in the epoch plan's order, and their collation.

`BucketBatchSampler` yields `(record index, sample seed)` keys; it is resumable
(`state_dict` / `load_state_dict`: epoch and batches done) and is its own `.sampler`, so
Lightning's per-epoch `set_epoch` reaches it.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from ldm.data.plan import EpochPlanner, derive_seed

logger = logging.getLogger(__name__)


def distributed_world() -> tuple[int, int]:
    """(world_size, rank) of the running process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def collate_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images into [B, 3, H, W] (or cached VAE moments into [B, 2*C, h, w]) and loss
    weights into float32 [B]; captions and paths stay lists of str."""
    key = "moments" if "moments" in items[0] else "image"
    return {key: torch.stack([it[key] for it in items]),
            "caption": [it["caption"] for it in items],
            "path": [it["path"] for it in items],
            "loss_weight": torch.tensor([float(it["loss_weight"]) for it in items], dtype=torch.float32)}


class BucketBatchSampler:
    """Batches of one bucket each for one rank, in the order of the epoch plan."""

    def __init__(self, planner: EpochPlanner, world_size: int = 1, rank: int = 0, fixed_epoch: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.planner, self.world_size, self.rank = planner, world_size, rank
        self.fixed_epoch = fixed_epoch  # validation: the same batches every time
        self.epoch = 0
        self.batches_done = 0  # batches handed out in the current epoch (counts prefetching)
        self._resume: tuple[int, int] | None = None  # (epoch, first batch) from load_state_dict
        self._len = planner.plan(0, world_size).steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = 0 if self.fixed_epoch else int(epoch)

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning calls `set_epoch` on `loader.sampler` and on `loader.batch_sampler.sampler`,
        never on the batch sampler itself; this batch sampler is its own sampler, so each
        epoch gets its own plan."""
        return self

    def __len__(self) -> int:
        return self._len  # the same every epoch: the plan's sizes do not depend on the epoch

    def __iter__(self):
        epoch = self.epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
            self._resume = None
        self.batches_done = start
        plan = self.planner.plan(epoch, self.world_size)
        for k in range(start, plan.steps):
            g = self.rank + k * self.world_size  # index in the global batch order
            self.batches_done = k + 1
            yield [(i, derive_seed(self.planner.seed, "sample", epoch, g, p))
                   for p, i in enumerate(plan.batches[g].items)]

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """The position to save. The training loop should pass the number of batches it
        finished: `batches_done` counted here runs ahead by the DataLoader's prefetch."""
        return {"epoch": self.epoch, "batches_done": self.batches_done if batches_done is None else batches_done,
                "world_size": self.world_size, "steps_per_epoch": self._len}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """The next iteration of epoch `state["epoch"]` starts at batch `batches_done`."""
        done = int(state["batches_done"])
        if state.get("world_size", self.world_size) != self.world_size:
            done = done * int(state["world_size"]) // self.world_size  # same share of the epoch
            logger.warning("resuming on %d rank(s) from a run on %d: the epoch plan differs, resuming at "
                           "batch %d of %d", self.world_size, state["world_size"], done, self._len)
        self.epoch = 0 if self.fixed_epoch else int(state["epoch"])
        self.batches_done = min(done, self._len)
        self._resume = (self.epoch, self.batches_done)
