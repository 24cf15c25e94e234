"""Adapter files: kohya-format .safetensors with the `ss_*` and `modelspec.*` header.

    write_adapter(path, tensors, metadata)   atomic; adds the sshs_* hashes kohya precomputes
    read_adapter(path) -> (tensors, metadata)

The header fields (all strings, as kohya writes them; research notes §2) come from
`kohya_metadata`, a pure function of what the run knows: the network config, the base
model, the optimizer, the trainer's counters and the data plan.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch

from ldm.modules.adapters.config import NetworkConfig


class AdapterFileError(ValueError):
    """An adapter file cannot be read; the message names the file."""


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: adapter files are .safetensors (kohya/LyCORIS format)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise AdapterFileError(f"{path}: not a readable .safetensors file ({e})") from e
    if not tensors:
        raise AdapterFileError(f"{path}: contains no tensors")
    return tensors, metadata


def write_adapter(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically, with kohya's precomputed `sshs_model_hash`/`sshs_legacy_hash`."""
    from ldm.checkpoint import _write_atomically

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(safetensors_hashes(tensors, meta))
    _write_atomically(Path(path), lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's header hashes: the sha256 of the tensor bytes of the file written with only the
    `ss_*` metadata (what AUTOMATIC1111 shows as the adapter hash), and the legacy hash
    (sha256 of 64 KiB at offset 1 MiB, first 8 hex digits)."""
    data = safetensors.torch.save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(), "sshs_legacy_hash": legacy}


def model_hashes(path: str | os.PathLike) -> dict[str, str]:
    """The base checkpoint's hashes as kohya records them: the old 8-hex model hash (sha256 of
    64 KiB at offset 1 MiB) and the sha256 of the whole file."""
    old, new = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        old.update(f.read(0x10000))
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            new.update(chunk)
    return {"ss_sd_model_hash": old.hexdigest()[:8], "ss_new_sd_model_hash": new.hexdigest()}


def base_model_version(v2: bool, v_prediction: bool) -> str:
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")


def modelspec_architecture(v2: bool, v_prediction: bool, resolution: int) -> str:
    """ModelSpec 1.0.1's architecture; kohya writes `/lora` for every network type."""
    if not v2:
        return "stable-diffusion-v1/lora"
    return ("stable-diffusion-v2-768-v" if v_prediction and resolution >= 768 else "stable-diffusion-v2-512") + "/lora"


def kohya_metadata(cfg: NetworkConfig, run: Mapping[str, Any]) -> dict[str, str]:
    """The header of an adapter file, every value a string.

    `run` holds what the trainer knows (missing entries are left out): output_name, v2,
    v_prediction, resolution, clip_skip, base_model (path), base_hashes, vae_name, seed,
    session_id, started_at / finished_at (datetimes), steps, epoch, max_steps, num_epochs,
    batches_per_epoch, batch_size, world_size, accumulate, precision, gradient_checkpointing,
    max_grad_norm, learning_rate, unet_lr, text_encoder_lr, optimizer, scheduler, warmup,
    plan (the data plan dict; its "kohya" entry gives the folders and tag frequency, and its
    "fields" further ss_* keys), model_fields (further ss_* keys from the model).
    """
    module, args = cfg.kohya_module_and_args()
    v2, vpred = bool(run.get("v2")), bool(run.get("v_prediction"))
    res = int(run.get("resolution") or (768 if v2 and vpred else 512))
    kohya = (run.get("plan") or {}).get("kohya") or {}
    steps_info = (run.get("plan") or {}).get("steps") or {}
    batch = run.get("batch_size", steps_info.get("batch_size"))
    started, finished = run.get("started_at"), run.get("finished_at")
    meta: dict[str, Any] = {
        "ss_session_id": run.get("session_id"),
        "ss_training_started_at": started.timestamp() if started else None,
        "ss_training_finished_at": finished.timestamp() if finished else None,
        "ss_output_name": run.get("output_name"),
        "ss_training_comment": cfg.training_comment or None,
        "ss_sd_scripts_commit_hash": None,
        "ss_sd_model_name": Path(str(run["base_model"])).name if run.get("base_model") else None,
        "ss_vae_name": run.get("vae_name"),
        "ss_v2": v2,
        "ss_base_model_version": base_model_version(v2, vpred),
        "ss_clip_skip": run.get("clip_skip"),
        "ss_max_token_length": run.get("max_token_length"),
        "ss_network_module": module,
        "ss_network_dim": cfg.dim,
        "ss_network_alpha": _num(cfg.alpha),
        "ss_network_args": json.dumps(args) if args else None,
        "ss_network_dropout": _num(cfg.dropout) if cfg.dropout else None,
        "ss_learning_rate": run.get("learning_rate"),
        "ss_unet_lr": run.get("unet_lr"),
        "ss_text_encoder_lr": run.get("text_encoder_lr") if "text_encoder" in cfg.targets else None,
        "ss_network_train_unet_only": cfg.targets == ("unet",),
        "ss_network_train_text_encoder_only": cfg.targets == ("text_encoder",),
        "ss_optimizer": run.get("optimizer"),
        "ss_lr_scheduler": run.get("scheduler"),
        "ss_lr_warmup_steps": run.get("warmup"),
        "ss_steps": run.get("steps"),
        "ss_epoch": run.get("epoch"),
        "ss_max_train_steps": run.get("max_steps"),
        "ss_num_epochs": run.get("num_epochs"),
        "ss_num_batches_per_epoch": run.get("batches_per_epoch", steps_info.get("batches_per_rank")),
        "ss_gradient_accumulation_steps": run.get("accumulate", 1),
        "ss_gradient_checkpointing": run.get("gradient_checkpointing"),
        "ss_mixed_precision": run.get("precision"),
        "ss_full_fp16": False,
        "ss_max_grad_norm": run.get("max_grad_norm"),
        "ss_seed": run.get("seed"),
        "ss_resolution": f"({res}, {res})",
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * int(run.get("world_size", 1)) * int(run.get("accumulate", 1)) if batch else None,
        "ss_enable_bucket": True,
        "ss_num_train_images": kohya.get("num_train_images"),
        "ss_num_reg_images": kohya.get("num_reg_images"),
        "ss_dataset_dirs": json.dumps(kohya["dataset_dirs"]) if "dataset_dirs" in kohya else None,
        "ss_reg_dataset_dirs": json.dumps(kohya["reg_dataset_dirs"]) if "reg_dataset_dirs" in kohya else None,
        "ss_tag_frequency": json.dumps(kohya["tag_frequency"]) if "tag_frequency" in kohya else None,
        "ss_prior_loss_weight": run.get("prior_loss_weight"),
        **{k: v for k, v in (run.get("base_hashes") or {}).items()},
        **dict(kohya.get("fields") or {}),   # data options as ss_* keys (flip, caption handling ...)
        **dict(run.get("model_fields") or {}),  # loss and noise options (LatentDiffusion.kohya_fields)
    }
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(v2, vpred, res),
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.get("output_name"),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": (finished or started or _dt.datetime.now()).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if vpred else "epsilon",
        "modelspec.encoder_layer": run.get("clip_skip"),
        "modelspec.description": cfg.training_comment or None,
    }
    return {k: _str(v) for k, v in {**meta, **spec}.items() if v is not None}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"  # Python's str(), as kohya writes booleans
    return str(v)
