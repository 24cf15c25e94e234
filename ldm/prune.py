"""Turning a training checkpoint into a small Stable Diffusion checkpoint for inference.

A Lightning checkpoint carries, besides the model weights, the optimizer state (twice
the UNet's size for AdamW), the loops, callbacks and hyper-parameters, and with EMA a
second copy of the UNet under `model_ema.*`. Pruning keeps the model weights only:

    {"state_dict": {model.diffusion_model.*, first_stage_model.*, cond_stage_model.*,
                    schedule buffers}}        (.ckpt; a .safetensors file holds the dict itself)

with the EMA weights as the UNet weights when the file has them, stored in fp16 by
default. The CLI is prune_ckpt.py.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import (EMA_PREFIX, GROUPS, SAFETENSORS_SUFFIX, UNET_PREFIX, CheckpointError, group_of,
                            load_checkpoint_file, save_checkpoint, use_ema_weights)

OUTPUT_SUFFIXES = (".ckpt", SAFETENSORS_SUFFIX)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def user_path(text: str | os.PathLike) -> Path:
    """A path typed by a user with either slash: on POSIX a backslash is read as a separator
    unless a file by the literal name exists."""
    text = os.fspath(text)
    if os.sep == "/" and "\\" in text and not os.path.exists(text):
        text = text.replace("\\", "/")
    return Path(text)


def format_size(num_bytes: int) -> str:
    """Decimal units, one decimal place: 11_300_000_000 -> '11.3 GB'."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if round(size, 1) < 1000:
            break
        size /= 1000.0
    else:
        unit = "TB"
    return f"{num_bytes} B" if unit == "B" else f"{size:.1f} {unit}"


def default_output(src: Path, safetensors: bool = False) -> Path:
    """`dir/last.ckpt` -> `dir/last-pruned.ckpt` (or `.safetensors`)."""
    return src.with_name(f"{src.stem}-pruned{SAFETENSORS_SUFFIX if safetensors else '.ckpt'}")


def output_path(src: Path, out: Path | None, safetensors: bool) -> Path:
    """Where to write: `out` (a file, or a directory for the default name) or beside `src`."""
    if out is None:
        return default_output(src, safetensors)
    if out.is_dir():
        return out / default_output(src, safetensors).name
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CheckpointError(f"{out}: unknown output extension {out.suffix!r}, expected .ckpt or .safetensors")
    if safetensors and out.suffix.lower() != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{out}: --safetensors asks for a .safetensors file but the output is named "
                              f"{out.suffix!r}; drop --safetensors or rename the output")
    return out


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


@dataclass
class PruneReport:
    src: Path
    dst: Path
    dtype: torch.dtype                                        # of the floating-point network weights
    size_before: int = 0
    size_after: int = 0
    ema: str = "none"                                         # "used", "dropped" (--no-ema) or "none" in the file
    kept: dict[str, int] = field(default_factory=dict)        # state-dict keys written, per group
    dropped: dict[str, int] = field(default_factory=dict)     # state-dict keys left out, per group
    dropped_entries: list[str] = field(default_factory=list)  # Lightning entries left out (optimizer_states, ...)
    terminal_snr_fixed: bool = False                          # a zero-terminal-SNR schedule made finite

    def summary(self) -> str:
        def counts(c: Mapping[str, int]) -> str:
            return ", ".join(f"{g} {c[g]}" for g in GROUPS if c.get(g)) or "none"

        ema = {
            "used": f"EMA weights used as the UNet weights (all {self.kept.get('unet', 0)} UNet tensors)",
            "dropped": "EMA weights dropped (--no-ema): kept the trained UNet weights",
            "none": "no EMA weights in the file: kept the trained UNet weights",
        }[self.ema]
        precision = DTYPE_NAMES.get(self.dtype, str(self.dtype))
        return "\n".join([
            f"read  {self.src}",
            f"wrote {self.dst} ({precision}; schedule buffers and integer tensors keep their dtype)",
            ema,
            f"kept keys:    {counts(self.kept)}",
            f"dropped keys: {counts(self.dropped)}",
            f"dropped Lightning state: {', '.join(self.dropped_entries) or 'none'}",
            *([f"zero-terminal-SNR schedule: the last alphas_cumprod 0 -> {A1111_TERMINAL_ABAR:.3g} "
               f"(as AUTOMATIC1111's own zero-terminal-SNR mode), so tools that derive noise levels from the "
               f"file get finite ones"]
              if self.terminal_snr_fixed else []),
            f"size: {format_size(self.size_before)} -> {format_size(self.size_after)}",
        ])


def _model_weights(top: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict (unwrapped from `state_dict`, at most twice) and the names of all else."""
    dropped: list[str] = []
    state_dict: Mapping[str, Any] = top
    for _ in range(2):
        if not isinstance(state_dict.get("state_dict"), Mapping):
            break
        dropped += [str(k) for k in state_dict if k != "state_dict"]
        state_dict = state_dict["state_dict"]
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped += [f"state_dict.{k}" for k in state_dict if k not in tensors]
    if top.get("adapter_only") or (tensors and all(k.startswith("network.") for k in tensors)):
        raise CheckpointError(f"{path}: the checkpoint of an adapter run holds the adapter alone; its files are in "
                              f"{path.parent.parent / 'adapters'} (merge one into a checkpoint with "
                              f"scripts/merge_lora.py)")
    if not any(k.startswith(UNET_PREFIX) for k in tensors):
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* weights")
    return tensors, dropped


# What AUTOMATIC1111's zero-terminal-SNR mode puts in place of alphas_cumprod[-1] = 0.
A1111_TERMINAL_ABAR = 4.8973451890853435e-08


def finite_terminal_schedule(state_dict: dict[str, torch.Tensor]) -> bool:
    """A run with zero_terminal_snr saves alphas_cumprod ending at 0, so sigma_T and
    sqrt_recip_alphas_cumprod are infinite for tools that read the schedule from the file
    (AUTOMATIC1111 does). Set that last value to AUTOMATIC1111's stand-in and recompute every
    schedule buffer from the betas; returns whether the schedule was changed."""
    from ldm.models.diffusion.schedule import schedule_buffers

    abar = state_dict.get("alphas_cumprod")
    if abar is None or "betas" not in state_dict or abar.numel() < 2 or abar[-1] != 0:
        return False
    betas = state_dict["betas"].to(torch.float64).clone()
    abar_before_last = torch.cumprod(1.0 - betas[:-1], dim=0)[-1]
    betas[-1] = 1.0 - A1111_TERMINAL_ABAR / abar_before_last
    for name, value in schedule_buffers(betas).items():
        if name in state_dict:
            state_dict[name] = value.to(state_dict[name].dtype)
    return True


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike | None = None, *, use_ema: bool = True,
                     dtype: torch.dtype = torch.float16, safetensors: bool = False,
                     force: bool = False) -> PruneReport:
    """Write the model weights of checkpoint `src` to a new file and report what changed.

    Never writes over `src`; refuses an existing output unless `force`. Every check that does
    not need the weights runs before the (possibly many-GB) input is read.
    """
    src = user_path(src)
    dst = output_path(src, None if out is None else user_path(out), safetensors)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {src}")
    if _same_file(src, dst):
        raise CheckpointError(f"{dst}: is the input checkpoint; the input is never overwritten, "
                              f"choose another --out")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: already exists; pass --force to overwrite it")

    report = PruneReport(src=src, dst=dst, dtype=dtype, size_before=src.stat().st_size)
    # The top-level dict (optimizer state included) is released when _model_weights returns.
    state_dict, report.dropped_entries = _model_weights(load_checkpoint_file(src), src)
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    report.dropped = dict(Counter(group_of(k) for k in state_dict if k.startswith(EMA_PREFIX)))
    if has_ema and use_ema:
        try:
            state_dict = use_ema_weights(state_dict, source=str(src))
        except CheckpointError as e:
            raise CheckpointError(f"{e}; pass --no-ema to keep the trained weights instead") from None
        report.ema = "used"
    else:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
        report.ema = "dropped" if has_ema else "none"

    report.terminal_snr_fixed = finite_terminal_schedule(state_dict)
    save_checkpoint(state_dict, dst, dtype=dtype)
    report.kept = dict(Counter(group_of(k) for k in state_dict))
    report.size_after = dst.stat().st_size
    return report
