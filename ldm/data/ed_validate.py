"""EDValidateBatch: the validation images, in fixed same-bucket batches.

Where the images come from:
- `val_split > 0` (recommended): the images EveryDreamBatch holds out of `data_root` with
  the same `val_split` and `seed`; give both datasets the same two values.
- `val_split: 0` and a `data_root` of its own: every image of that folder.
- `val_split: 0` and the training `data_root` (the original trainer's behaviour): the
  training images themselves; the plan report warns about the overlap.
`repeats` (a fraction in (0, 1]) keeps a seeded, stable subset of that pool.
Batches are the same at every validation (no flip, jitter, caption dropout, tag shuffle
or tag dropout; settings files other than multiply.txt are not applied, and the loss is not
scaled by loss_scale.txt); a bucket's last batch may be short. `keep_tokens_separator`
(use the train value) is removed from the captions, as in training.
"""
from __future__ import annotations

from ldm.data.buckets import make_buckets
from ldm.data.caption_ops import CaptionOptions
from ldm.data.every_dream import BucketDataset, _check_common
from ldm.data.plan import EpochPlanner, split_validation, take_fraction
from ldm.data.scan import scan_folder


class EDValidateBatch(BucketDataset):
    augment = False

    def __init__(self, data_root: str, batch_size: int, repeats: float = 1.0, val_split: float = 0.0,
                 seed: int = 555, resolution: int = 512, debug_level: int = 0,
                 caption_from_filename: str = "first_underscore", background: str = "white",
                 resample: str = "bicubic", bucket_step: int = 64, max_aspect: float = 4.0, min_side: int = 64,
                 caption_extension: str | None = None, caption_fallback: str = "filename",
                 keep_tokens_separator: str = "", cache_latents: bool = False, cache_dir: str | None = None):
        _check_common(seed=seed, background=background, resample=resample,
                      caption_from_filename=caption_from_filename)
        buckets = make_buckets(resolution, bucket_step, max_aspect)
        captions = {"caption_extension": caption_extension, "caption_fallback": caption_fallback}
        scan = scan_folder(data_root, caption_from_filename, min_side, **captions)
        _, held = split_validation(scan.images, val_split, seed)
        records = take_fraction(held if val_split > 0 else scan.images, repeats, seed)
        planner = EpochPlanner(records, buckets, batch_size, 1.0, seed, incomplete="keep", use_folder_weights=False)
        self.held_out = []
        self.settings = {"batch_size": batch_size, "repeats": repeats, "val_split": val_split, "seed": seed,
                         "resolution": resolution, "caption_from_filename": caption_from_filename,
                         "background": background, "resample": resample, "bucket_step": bucket_step,
                         "max_aspect": max_aspect, "min_side": min_side, **captions,
                         "keep_tokens_separator": keep_tokens_separator, "cache_latents": cache_latents,
                         "cache_dir": cache_dir}
        self._setup(str(data_root), scan, planner, resample=resample, background=background,
                    crop_jitter=0.0, flip_p=0.0, conditional_dropout=0.0, debug_level=debug_level,
                    captions=CaptionOptions(keep_tokens_separator=keep_tokens_separator))
        self._setup_cache(cache_latents, cache_dir, crop_jitter=0.0, background=background)
