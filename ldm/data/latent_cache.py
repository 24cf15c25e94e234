"""A cache of VAE posteriors, so images are encoded once rather than at every step.

    data.params.train.params: {cache_latents: true, cache_dir: null}

One entry per (image file, bucket, flip): the posterior moments [2*C, h, w] (mean, then
log-variance) that `DiagonalGaussianDistribution` is built from, as float32 .safetensors in
`cache_dir` (default `$XDG_CACHE_HOME/everydream-ldm/latents`, else
`~/.cache/everydream-ldm/latents`), written atomically. Training still draws
z = scale_factor * (mean + std * eps) with eps from the model's noise stream, as encoding
at each step does; only the encoder's forward pass is saved.

The key is the sha256 of the file's bytes, the bucket's size, the flip, the loader settings
that change pixels (resample, background) and the VAE's weights, so an edited image,
another bucket or another VAE misses, and the entry is shared by later runs. Nothing is
written next to the images.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Mapping

import safetensors.torch
import torch
from torch import nn

FORMAT = 1  # bump when what an entry means changes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "everydream-ldm" / "latents"


def resolve_cache_dir(cache_dir: str | None, roots: Iterable[str | None], key: str = "cache_dir") -> Path:
    """The cache folder; refused when it lies inside one of the image folders `roots`."""
    path = Path(os.path.realpath(os.path.expanduser(cache_dir))) if cache_dir else default_cache_dir()
    real = Path(os.path.realpath(path))
    for root in roots:
        if root is not None and real.is_relative_to(Path(os.path.realpath(root))):
            raise ValueError(f"{key}: {str(path)!r} lies inside the image folder {root!r}; the latent cache "
                             "must live outside your images (leave it null for the default cache folder)")
    return path


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vae_identity(vae: nn.Module) -> str:
    """sha256 over the VAE's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LatentCache:
    """Entries of one cache folder for one VAE and one set of loader settings."""

    def __init__(self, root: str | Path, vae_id: str, *, resample: str, background: str):
        self.root, self.vae_id = Path(root), vae_id
        self.resample, self.background = resample, background
        self._digests: dict[str, str] = {}

    def fields(self, path: str, bucket: tuple[int, int], flip: bool) -> dict[str, str]:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return {"format": str(FORMAT), "file_sha256": self._digests[path], "width": str(bucket[0]),
                "height": str(bucket[1]), "flip": str(bool(flip)), "resample": self.resample,
                "background": self.background, "vae_sha256": self.vae_id}

    def entry(self, path: str, bucket: tuple[int, int], flip: bool) -> Path:
        key = hashlib.sha256(json.dumps(self.fields(path, bucket, flip), sort_keys=True).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def save(self, entry: Path, moments: torch.Tensor, fields: Mapping[str, str]) -> None:
        from ldm.checkpoint import _write_atomically

        tensor = moments.detach().float().cpu().contiguous()
        _write_atomically(entry, lambda tmp: safetensors.torch.save_file({"moments": tensor}, str(tmp),
                                                                         metadata=dict(fields)))


def load_moments(entry: str | Path) -> torch.Tensor:
    """The moments [2*C, h, w] float32 of one entry."""
    return safetensors.torch.load_file(str(entry))["moments"]


def fill(datasets: Iterable, vae: nn.Module, device: torch.device, *, batch_size: int = 8, rank: int = 0,
         world_size: int = 1, barrier: Callable[[], None] = lambda: None,
         say: Callable[[str], None] = print) -> dict[str, int]:
    """Encode every missing entry of `datasets` (those with cache_latents on), this rank's share of
    them, then give each dataset its entries (`attach_latent_cache`). Returns the counts."""
    datasets = [ds for ds in datasets if ds is not None and getattr(ds, "cache_latents", False)]
    if not datasets:
        return {"cached": 0, "encoded": 0}
    vae_id = vae_identity(vae)
    todo: dict[Path, tuple] = {}  # entry -> (dataset, its LatentCache, index, flip, bucket (w, h))
    plans = []
    for ds in datasets:
        cache = LatentCache(ds.cache_dir, vae_id, resample=ds.resample, background=ds.background)
        entries = {}
        for index, flip in ds.cache_entries():
            path, bucket = ds._file(index), ds.planner.bucket_of[index]
            try:
                entry = cache.entry(path, (bucket.width, bucket.height), flip)
            except OSError:  # unreadable since the scan: the dataset uses another image of its bucket
                continue
            entries[(index, flip)] = entry
            if entry not in todo and not entry.exists():
                todo[entry] = (ds, cache, index, flip, (bucket.width, bucket.height))
        plans.append((ds, entries))
    total = len({e for _, entries in plans for e in entries.values()})
    missing = sorted(todo, key=lambda e: (todo[e][4], str(e)))  # same-bucket runs, batched below
    say(f"latents: {total - len(missing)} cached, {len(missing)} to encode"
        + (f" on {world_size} processes" if world_size > 1 and missing else "") + f" (in {datasets[0].cache_dir})")
    mine = missing[rank::world_size]
    start, shown = time.monotonic(), time.monotonic()
    done = 0
    for group in _same_bucket_batches(mine, todo, batch_size):
        _encode_group(group, todo, vae, device)
        done += len(group)
        if time.monotonic() - shown > 10:
            shown = time.monotonic()
            say(f"latents: {done} of {len(mine)} encoded")
    if world_size > 1:
        barrier()
    for ds, entries in plans:
        ds.attach_latent_cache({k: str(v) for k, v in entries.items() if v.exists()})
    if missing:
        say(f"latents: {total - len(missing)} cached, {len(missing)} encoded ({time.monotonic() - start:.1f} s)")
    return {"cached": total - len(missing), "encoded": len(missing)}


def _same_bucket_batches(entries: list[Path], todo: Mapping[Path, tuple], batch_size: int):
    group: list[Path] = []
    for e in entries:
        if group and todo[group[0]][4] != todo[e][4]:
            yield group
            group = []
        group.append(e)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


@torch.no_grad()
def _encode_group(group: list[Path], todo: Mapping[Path, tuple], vae: nn.Module, device: torch.device) -> None:
    from ldm.data.images import load_bucket_image

    images, kept = [], []
    for e in group:
        ds, _, index, flip, _ = todo[e]
        try:
            images.append(load_bucket_image(ds._file(index), ds.planner.bucket_of[index], resample=ds.resample,
                                            background=ds.background, flip=flip))
            kept.append(e)
        except (OSError, ValueError, SyntaxError):  # broken since the scan; its samples use another image
            continue
    if not kept:
        return
    dtype = next(vae.parameters()).dtype
    x = torch.stack(images).to(device=device, dtype=dtype)
    # uncompiled under model.params.compile: each bucket's batch shapes would compile for one use
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; before, it compiles
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext(), \
            set_stance("force_eager") if set_stance else nullcontext():
        moments = vae.encode(x).parameters  # [B, 2*C, h, w]
    for e, m in zip(kept, moments):
        ds, cache, index, flip, bucket = todo[e]
        cache.save(e, m, cache.fields(ds._file(index), bucket, flip))
