"""The `data:` section as a LightningDataModule: train and validation datasets, their loaders,
and the position in the epoch that a checkpoint carries.

    data:
      target: ldm.data.datamodule.DataModuleFromConfig   # `main.DataModuleFromConfig` also works
      params:
        batch_size: 6
        num_workers: 4
        train:
          target: ldm.data.every_dream.EveryDreamBatch
          params: {repeats: 20, debug_level: 1}
        validation:
          target: ldm.data.ed_validate.EDValidateBatch
          params: {repeats: 0.4}

`batch_size` is passed to both datasets, and `--data_root` (main.py) to both unless the
validation node names a folder of its own.

Resume: every checkpoint records the data module's state, (epoch, batches trained in it),
and a resumed run's sampler starts its epoch at the next batch, the one the interrupted run
would have trained. It is the data module, not the loader, that carries the position:
Lightning restores data modules before it builds any loader, but it builds the training
loader (to count the run's steps) before it restores a loader's own state.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ldm.data.batching import collate_batch
from ldm.data.every_dream import BucketDataset
from ldm.util import instantiate_from_config


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size: int, train: Mapping[str, Any], validation: Mapping[str, Any] | None = None,
                 num_workers: int = 2, pin_memory: bool = True, prefetch_factor: int = 2,
                 wrap: bool = False):  # `wrap`: inert, the original configs carry it
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.params.batch_size: expected an integer >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.params.num_workers: expected an integer >= 0, got {num_workers!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.nodes = {"train": _plain(train), "validation": _plain(validation) if validation else None}
        self.resolution = int((self.nodes["train"].get("params") or {}).get("resolution", 512))
        self._datasets: dict[str, BucketDataset | None] | None = None
        self._position: Any = None  # () -> the training loader's position, once it exists
        self._resume_position: dict[str, int] | None = None

    # -- datasets ---------------------------------------------------------------------------
    def datasets(self) -> dict[str, BucketDataset | None]:
        """Scan the folders and plan (once); bad input raises here, before any model is built."""
        if self._datasets is None:
            self._datasets = {split: self._instantiate(split) for split in ("train", "validation")}
        return self._datasets

    def _instantiate(self, split: str) -> BucketDataset | None:
        node = self.nodes[split]
        if node is None:
            return None
        params = dict(node.get("params") or {})
        params["batch_size"] = self.batch_size
        return instantiate_from_config({"target": node["target"], "params": params}, path=f"data.params.{split}")

    def setup(self, stage: str | None = None) -> None:
        self.datasets()

    def plan_report(self, world_size: int = 1, epochs: int | None = None,
                    accumulate_grad_batches: int = 1) -> tuple[str, dict]:
        ds = self.datasets()
        return ds["train"].plan_report(world_size, epochs, accumulate_grad_batches, validation=ds["validation"])

    # -- loaders ----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.datasets()["train"]
        sampler = ds.batch_sampler()
        if self._resume_position:
            sampler.load_state_dict(self._resume_position)
            self._resume_position = None
        self._position = lambda: self._position_of(sampler)
        return DataLoader(ds, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        ds = self.datasets()["validation"]
        return [] if ds is None else DataLoader(ds, batch_sampler=ds.batch_sampler(), **self._loader_kwargs())

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        return {"num_workers": workers, "collate_fn": collate_batch, "pin_memory": self.pin_memory and _cuda(),
                "persistent_workers": workers > 0, "prefetch_factor": self.prefetch_factor if workers > 0 else None}

    def _position_of(self, sampler: Any) -> dict[str, int]:
        """(epoch, batches trained in it) from Lightning's loop counters: the sampler's own
        count runs ahead by what the DataLoader prefetched."""
        loop = self.trainer.fit_loop
        epoch = max(loop.epoch_progress.current.started - 1, 0)  # the epoch begun last
        done = loop.epoch_loop.batch_progress.current.processed
        if done >= len(sampler):  # saved at the epoch's end: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {**sampler.state_dict(batches_done=done), "epoch": epoch}

    def state_dict(self) -> dict[str, int]:
        return self._position() if self._position is not None else {}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume_position = dict(state) or None


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def plan_report(cfg: DictConfig, world_size: int = 1) -> tuple[str, dict]:
    """The data plan of a whole run config (`--dry_run`): no model, no GPU."""
    if "data" not in cfg:
        raise ValueError("data: the config has no data section to plan")
    data = instantiate_from_config(cfg.data, path="data")
    epochs = OmegaConf.select(cfg, "lightning.trainer.max_epochs", default=None)
    accumulate = OmegaConf.select(cfg, "lightning.trainer.accumulate_grad_batches", default=1) or 1
    return data.plan_report(world_size, epochs, int(accumulate))
