"""EveryDreamBatch: the training dataset over an epoch plan (batches: ldm.data.batching).

    data:
      target: ldm.data.datamodule...            # passes batch_size; main.py passes data_root
      params:
        batch_size: 4
        train:
          target: ldm.data.every_dream.EveryDreamBatch
          params: {repeats: 20, resolution: 512, val_split: 0.1, seed: 555, conditional_dropout: 0.04}

With `reg_data_root` (kohya's regularisation folder) the epoch also holds as many
regularisation samples as training samples, in the same bucket batches; every item, and
so every batch, carries `loss_weight`: 1.0 for a training image, `prior_loss_weight` for a
regularisation image.

    loader = DataLoader(ds, batch_sampler=ds.batch_sampler(world_size, rank),
                        num_workers=8, collate_fn=ldm.data.batching.collate_batch)

The sampler yields batches of `(record index, sample seed)` keys, all from one bucket; the
seed makes flip, crop jitter, caption dropout, tag shuffle and tag dropout and a random
background reproducible for that (epoch, batch, position), whichever worker loads it.
Settings files in the folders (folder_settings.py) override flip_p, conditional_dropout and
the caption options per image, and their `loss_scale` multiplies the item's `loss_weight`.
Call `sampler.set_epoch(e)` each epoch (Lightning does, through `sampler.sampler`);
`state_dict()` / `load_state_dict()` carry (epoch, batches_done) for a mid-epoch resume.
"""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from ldm.data.batching import BucketBatchSampler, distributed_world
from ldm.data.buckets import make_buckets
from ldm.data.caption_ops import CaptionOptions, process_tags, training_caption
from ldm.data.captions import check_filename_mode
from ldm.data.images import BACKGROUNDS, RESAMPLE, check_choice, load_bucket_image
from ldm.data.plan import EpochPlanner, derive_seed, split_validation
from ldm.data.report import build_report, default_token_counter, render_report
from ldm.data.scan import DatasetError, ImageRecord, ScanResult, scan_folder
from ldm.util import launcher_rank

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # skipped files already reported by this process


def _is_rank_zero() -> bool:
    """Before the process group exists, the launcher's RANK variable tells (Lightning DDP sets it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return launcher_rank() == 0


class BucketDataset(Dataset):
    """Shared by EveryDreamBatch and EDValidateBatch: records, buckets, loading with fallback."""

    augment = True
    reg_data_root: str | None = None  # the regularisation folder (EveryDreamBatch only)
    reg_scan: ScanResult | None = None
    prior_loss_weight = 1.0
    cache_latents = False  # items carry cached VAE moments instead of images (ldm.data.latent_cache)
    cache_dir: Path | None = None
    _latent_entries: dict[tuple[int, bool], str] | None = None  # (index, flip) -> entry file, once filled

    def _setup_cache(self, cache_latents: bool, cache_dir: str | None, *, crop_jitter: float, background: str) -> None:
        """Check the cache keys; the cache is filled at the start of training (LatentCacheFiller)."""
        from ldm.data.latent_cache import resolve_cache_dir

        if not cache_latents:
            return
        if crop_jitter > 0:
            raise ValueError(f"cache_latents: cannot be used with crop_jitter {crop_jitter}: every sample is "
                             "cropped differently, so no latent can be reused; set crop_jitter: 0 or "
                             "cache_latents: false")
        if background == "random":
            raise ValueError("cache_latents: cannot be used with background: random (a new colour every sample); "
                             "use white or black, or cache_latents: false")
        self.cache_latents = True
        self.cache_dir = resolve_cache_dir(cache_dir, [self.data_root, self.reg_data_root])

    def cache_entries(self) -> list[tuple[int, bool]]:
        """Every (record index, flip) that this dataset's samples can show: both flips of an image
        whose flip_p (config or flip_p.txt) is strictly between 0 and 1."""
        out = []
        for i, record in enumerate(self.records):
            p = _pick(record.settings.flip_p, self.flip_p) if self.augment else 0.0
            out += [(i, False)] * (p < 1) + [(i, True)] * (p > 0)
        return out

    def attach_latent_cache(self, entries: Mapping[tuple[int, bool], str]) -> None:
        self._latent_entries = dict(entries)

    def _setup(self, data_root: str, scan: ScanResult, planner: EpochPlanner, *,
               resample: str, background: str, crop_jitter: float, flip_p: float, conditional_dropout: float,
               debug_level: int, captions: CaptionOptions = CaptionOptions()) -> None:
        if not planner.n_train:
            raise DatasetError(_nothing_found(data_root, scan, len(scan.images)))
        self.data_root, self.scan, self.planner = data_root, scan, planner
        self.records = planner.records  # training images, then regularisation images
        self.resample, self.background = resample, background
        self.crop_jitter, self.flip_p, self.conditional_dropout = crop_jitter, flip_p, conditional_dropout
        self.captions = captions  # the config's caption options; a folder's settings files override them
        self.debug_level = debug_level
        self._broken: set[int] = set()
        if _is_rank_zero():
            scans = [(data_root, scan)] + ([(self.reg_data_root, self.reg_scan)] if self.reg_scan else [])
            for root, sc in scans:
                for s in sc.skipped:
                    path = os.path.join(root, s.path)
                    if path not in _WARNED:  # train and validation may scan the same folder
                        _WARNED.add(path)
                        logger.warning("skipped %s: %s", path, s.reason)

    def __len__(self) -> int:
        return len(self.records)

    def batch_sampler(self, world_size: int | None = None, rank: int | None = None) -> BucketBatchSampler:
        """The sampler for this rank; world_size/rank default to the running process group."""
        ws, rk = distributed_world()
        return BucketBatchSampler(self.planner, ws if world_size is None else world_size,
                                  rk if rank is None else rank, fixed_epoch=not self.augment)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, derive_seed(self.planner.seed, "item", key))
        rng = random.Random(seed)
        bucket = self.planner.bucket_of[index]
        folder = self.records[index].settings
        flip = self.augment and rng.random() < _pick(folder.flip_p, self.flip_p)
        drop_caption = self.augment and rng.random() < _pick(folder.cond_dropout, self.conditional_dropout)
        if self.cache_latents:  # the same draws as loading the image, so both paths train alike
            image_key, (image, index) = "moments", self._cached_with_fallback(index, rng, flip)
        else:
            image_key, (image, index) = "image", self._load_with_fallback(index, rng, flip)
        record = self.records[index]
        if self.augment:  # the caption options draw from a stream of their own
            caption = training_caption(record.caption, drop_caption, self.caption_options(index),
                                       random.Random(derive_seed(seed, "caption")))
        else:  # validation: the separator is removed, nothing is drawn
            caption = process_tags(record.caption, CaptionOptions(
                keep_tokens_separator=self.captions.keep_tokens_separator), None)
        weight = self.prior_loss_weight if self.planner.is_reg(index) else 1.0
        return {image_key: image, "caption": caption, "path": record.path, "bucket": (bucket.width, bucket.height),
                "loss_weight": weight * record.settings.loss_scale if self.augment else weight}

    def caption_options(self, index: int) -> CaptionOptions:
        """The caption options of record `index`: the config's, overridden by its folder's files."""
        folder, base = self.records[index].settings, self.captions
        return CaptionOptions(shuffle_tags=_pick(folder.shuffle_tags, base.shuffle_tags),
                              keep_tokens=_pick(folder.keep_tokens, base.keep_tokens),
                              keep_tokens_separator=base.keep_tokens_separator,
                              tag_dropout=_pick(folder.tag_dropout, base.tag_dropout))

    def _file(self, index: int) -> str:
        root = self.reg_data_root if self.planner.is_reg(index) else self.data_root
        return os.path.join(root, self.records[index].path)

    def _load_with_fallback(self, index: int, rng: random.Random, flip: bool) -> tuple[torch.Tensor, int]:
        """Load `index`; if it fails, log it and load another image of the same bucket instead."""
        bucket = self.planner.bucket_of[index]
        others = [i for i in self.planner.members[bucket] if i != index and i not in self._broken]
        rng.shuffle(others)
        for i in ([index] if index not in self._broken else []) + others:
            path = self._file(i)
            try:
                return load_bucket_image(path, bucket, resample=self.resample, background=self.background,
                                         jitter=self.crop_jitter if self.augment else 0.0, flip=flip,
                                         rng=rng), i
            except (OSError, ValueError, SyntaxError) as e:  # deleted, unreadable or corrupt since the scan
                self._broken.add(i)
                logger.warning("cannot load %s (%s); using another %s image in its place", path, e, bucket)
        raise DatasetError(f"data_root {self.data_root!r}: no image of bucket {bucket} can be loaded any more "
                           f"({len(self.planner.members[bucket])} were found at the scan)")

    def _cached_with_fallback(self, index: int, rng: random.Random, flip: bool) -> tuple[torch.Tensor, int]:
        """The cached moments of `index` (an image that could not be encoded: another of its bucket)."""
        from ldm.data.latent_cache import load_moments

        if self._latent_entries is None:
            raise DatasetError("cache_latents: the latent cache has not been filled; it is filled when training "
                               "starts (ldm.callbacks.latent_cache.LatentCacheFiller)")
        bucket = self.planner.bucket_of[index]
        others = [i for i in self.planner.members[bucket] if i != index]
        rng.shuffle(others)  # as _load_with_fallback draws
        for i in [index] + others:
            entry = self._latent_entries.get((i, flip))
            if entry is not None:
                try:
                    return load_moments(entry), i
                except (OSError, ValueError) as e:  # removed or damaged since the fill
                    logger.warning("cannot read the cached latent %s (%s); using another %s image", entry, e, bucket)
        raise DatasetError(f"cache_latents: no cached latent of bucket {bucket} can be read (data_root "
                           f"{self.data_root!r}); delete the cache folder {str(self.cache_dir)!r} and start again")

    def plan_report(self, world_size: int = 1, epochs: int | None = None, accumulate_grad_batches: int = 1,
                    token_counter: Callable[[str], int] | None = None,
                    validation: "BucketDataset | None" = None) -> tuple[str, dict]:
        """(text, dict) of the data plan; the dict is what `dataset_plan.json` holds.
        `token_counter` defaults to the SD 1.x CLIP tokenizer's count."""
        warnings = []
        if validation is not None:
            report_val = {"images": len(validation.records), "data_root": validation.data_root}
            if os.path.realpath(validation.data_root) == os.path.realpath(self.data_root):
                training = self.records[:self.planner.n_train]
                overlap = {r.path for r in validation.records} & {r.path for r in training}
                report_val["also_in_training"] = len(overlap)
                if overlap:
                    warnings.append(f"{len(overlap)} of the {len(validation.records)} validation images are also "
                                    "training images; set the same val_split and seed in train and validation")
        d = build_report(self.scan, self.planner, held_out=self.held_out, world_size=world_size,
                         epochs=epochs, accumulate_grad_batches=accumulate_grad_batches,
                         token_counter=token_counter or default_token_counter(),
                         settings=self.settings, warnings=warnings, reg_scan=self.reg_scan,
                         prior_loss_weight=self.prior_loss_weight, caption_options=self.caption_options)
        if validation is not None:
            d["validation"] = report_val
        return render_report(d), d


def _pick(folder_value: Any, default: Any) -> Any:
    """A folder's settings-file value, or the config's when the folder sets none."""
    return default if folder_value is None else folder_value


def _nothing_found(data_root: str, scan: ScanResult, usable: int, key: str = "data_root") -> str:
    msg = f"{key} {data_root!r}: no usable images"
    if usable:
        return f"{msg} left for this dataset ({usable} found, all held out or excluded by multiply.txt = 0)"
    found = f"{len(scan.skipped)} image file(s) skipped" if scan.skipped else "no image files"
    other = sum(scan.ignored.values())
    msg += f": {found}" + (f", {other} other file(s) ignored" if other else "")
    if scan.skipped:
        msg += "; first: " + "; ".join(f"{s.path}: {s.reason}" for s in scan.skipped[:3])
    return msg + ". Images need one of the extensions .jpg .jpeg .jfif .png .webp .bmp .tif .tiff .avif."


class EveryDreamBatch(BucketDataset):
    """Training images of `data_root` in same-bucket batches; see doc/DATA.md for every key."""

    def __init__(self, data_root: str, batch_size: int, repeats: float = 1.0, resolution: int = 512,
                 flip_p: float = 0.0, seed: int = 555, conditional_dropout: float = 0.04, debug_level: int = 0,
                 val_split: float = 0.0, drop_incomplete: bool = False,
                 caption_from_filename: str = "first_underscore", background: str = "white",
                 resample: str = "bicubic", crop_jitter: float = 0.0, bucket_step: int = 64,
                 max_aspect: float = 4.0, min_side: int = 64, caption_extension: str | None = None,
                 caption_fallback: str = "filename", reg_data_root: str | None = None,
                 prior_loss_weight: float = 1.0, shuffle_tags: bool = False, keep_tokens: int = 0,
                 keep_tokens_separator: str = "", tag_dropout: float = 0.0, cache_latents: bool = False,
                 cache_dir: str | None = None):
        _check_common(seed=seed, background=background, resample=resample,
                      caption_from_filename=caption_from_filename)
        caption_ops = CaptionOptions(shuffle_tags, keep_tokens, keep_tokens_separator, tag_dropout)
        if not 0.0 <= prior_loss_weight < math.inf:
            raise ValueError(f"prior_loss_weight: expected a number >= 0, got {prior_loss_weight}")
        for key, value in (("flip_p", flip_p), ("conditional_dropout", conditional_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: expected a probability in [0, 1], got {value}")
        if not 0.0 <= crop_jitter <= 0.25:
            raise ValueError(f"crop_jitter: expected a fraction of the side in [0, 0.25], got {crop_jitter}")
        buckets = make_buckets(resolution, bucket_step, max_aspect)
        captions = {"caption_extension": caption_extension, "caption_fallback": caption_fallback}
        scan = scan_folder(data_root, caption_from_filename, min_side, **captions)
        train, self.held_out = split_validation(scan.images, val_split, seed)
        train = [r for r in train if r.folder_repeats * r.multiply > 0]
        reg: list[ImageRecord] = []
        if reg_data_root is not None:
            self.reg_data_root, self.prior_loss_weight = str(reg_data_root), float(prior_loss_weight)
            self.reg_scan = _scan_regularisation(self.reg_data_root, str(data_root), caption_from_filename,
                                                 min_side, captions)
            reg = [r for r in self.reg_scan.images if r.folder_repeats * r.multiply > 0]
        planner = EpochPlanner(train, buckets, batch_size, repeats, seed,
                               incomplete="drop" if drop_incomplete else "fill", reg_records=reg)
        if reg and not sum(planner.own_counts(0)[planner.n_train:]):
            raise DatasetError(f"reg_data_root {reg_data_root!r}: its multiply.txt values leave no "
                               f"regularisation copy per epoch ({len(reg)} images)")
        self.settings = {"batch_size": batch_size, "repeats": repeats, "resolution": resolution, "seed": seed,
                         "val_split": val_split, "drop_incomplete": drop_incomplete, "flip_p": flip_p,
                         "conditional_dropout": conditional_dropout, "caption_from_filename": caption_from_filename,
                         "background": background, "resample": resample, "crop_jitter": crop_jitter,
                         "bucket_step": bucket_step, "max_aspect": max_aspect, "min_side": min_side, **captions,
                         "reg_data_root": reg_data_root, "prior_loss_weight": prior_loss_weight,
                         "shuffle_tags": shuffle_tags, "keep_tokens": keep_tokens,
                         "keep_tokens_separator": keep_tokens_separator, "tag_dropout": tag_dropout,
                         "cache_latents": cache_latents, "cache_dir": cache_dir}
        self._setup(str(data_root), scan, planner, resample=resample, background=background,
                    crop_jitter=crop_jitter, flip_p=flip_p, conditional_dropout=conditional_dropout,
                    debug_level=debug_level, captions=caption_ops)
        self._setup_cache(cache_latents, cache_dir, crop_jitter=crop_jitter, background=background)
        if planner.plan(0).steps == 0:
            raise DatasetError(f"data_root {data_root!r}: drop_incomplete leaves no full batch of {batch_size} "
                               f"in any bucket ({len(train)} images); lower batch_size or set drop_incomplete: false")


def _scan_regularisation(reg_data_root: str, data_root: str, caption_from_filename: str, min_side: int,
                         captions: Mapping[str, Any]) -> ScanResult:
    """The regularisation folder, scanned with the training folder's rules; refused when it
    lies inside data_root or holds it (its images would also be training images)."""
    reg, root = Path(os.path.realpath(reg_data_root)), Path(os.path.realpath(data_root))
    if reg.is_relative_to(root) or root.is_relative_to(reg):
        raise DatasetError(f"reg_data_root {reg_data_root!r} and data_root {data_root!r} overlap: keep the "
                           "regularisation images in a folder of their own, next to data_root")
    scan = scan_folder(reg_data_root, caption_from_filename, min_side, key="reg_data_root", **captions)
    if not any(r.folder_repeats * r.multiply > 0 for r in scan.images):
        raise DatasetError(_nothing_found(reg_data_root, scan, len(scan.images), key="reg_data_root"))
    return scan


def _check_common(*, seed: int, background: str, resample: str, caption_from_filename: str) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0 (every rank must plan the same epochs), got {seed!r}")
    check_choice(background, BACKGROUNDS, "background")
    check_choice(resample, tuple(RESAMPLE), "resample")
    check_filename_mode(caption_from_filename)


def dry_run_report(train_params: Mapping[str, Any], data_root: str | None = None, *,
                   batch_size: int | None = None, world_size: int = 1, epochs: int | None = None,
                   accumulate_grad_batches: int = 1, validation: Mapping[str, Any] | None = None,
                   token_counter: Callable[[str], int] | None = None) -> tuple[str, dict]:
    """The data plan from config nodes alone: scans headers, builds no model, needs no GPU.

    `train_params` is `data.params.train.params`; `validation` is the whole
    `data.params.validation` node ({target, params}) or None.
    """
    from ldm.util import instantiate_from_config

    def params(node_params: Mapping[str, Any] | None) -> dict[str, Any]:
        out = dict(node_params or {})
        if data_root is not None and out.get("data_root") is None:
            out["data_root"] = str(data_root)  # a validation node may name its own folder
        if batch_size is not None:
            out["batch_size"] = batch_size
        return out

    train = instantiate_from_config({"target": f"{__name__}.EveryDreamBatch", "params": params(train_params)},
                                    path="data.params.train")
    val = None
    if validation is not None:
        val = instantiate_from_config({"target": validation["target"], "params": params(validation.get("params"))},
                                      path="data.params.validation")
    return train.plan_report(world_size, epochs, accumulate_grad_batches, token_counter, val)
