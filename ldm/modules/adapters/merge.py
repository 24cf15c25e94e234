"""Merge adapter files into a Stable Diffusion checkpoint: W <- W + weight · ΔW.

    merge_adapters("sd15.safetensors", [("meebs.safetensors", 0.8)], "sd15-meebs.safetensors")

The result is a normal SD checkpoint (same keys, each weight in its own dtype) that any
tool loads. The module layout comes from a model config built on the meta device (no
memory, no weights): configs/stable-diffusion/v1-inference.yaml or v2-inference.yaml,
picked from the checkpoint's text-encoder keys unless `config` is given. Adapters in
our files, kohya's, or with CompVis-named keys all merge; each ΔW is computed in fp32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.modules.adapters.config import NetworkConfig
from ldm.modules.adapters.files import read_adapter
from ldm.modules.adapters.network import AdapterError, AdapterNetwork
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[3]
SD_CONFIGS = {"sd1": ROOT / "configs/stable-diffusion/v1-inference.yaml",
              "sd2": ROOT / "configs/stable-diffusion/v2-inference.yaml"}


def detect_config(state_dict: dict[str, torch.Tensor], source: str) -> Path:
    if any(k.startswith("cond_stage_model.transformer.") for k in state_dict):
        return SD_CONFIGS["sd1"]
    if any(k.startswith("cond_stage_model.model.") for k in state_dict):
        return SD_CONFIGS["sd2"]
    raise AdapterError(f"{source}: no SD 1.x or 2.x text encoder keys; pass --config with the model's YAML")


def build_meta_model(config: Path) -> torch.nn.Module:
    cfg = OmegaConf.load(config).model
    with torch.device("meta"):
        return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def merge_adapters(ckpt: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike, float]],
                   out: str | os.PathLike, config: str | os.PathLike | None = None) -> list[str]:
    """Write `ckpt` with every (adapter file, weight) merged in to `out`; returns report lines."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and os.path.samefile(out, ckpt):
        raise AdapterError(f"{out}: is the input checkpoint; write the merged model to a new file")
    state_dict = dict(ckpt_io.load_state_dict(ckpt))
    config = Path(config) if config else detect_config(state_dict, str(ckpt))
    model = build_meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    misfits = [k for k, v in state_dict.items() if k.startswith(("model.diffusion_model.", "cond_stage_model."))
               and k in shapes and tuple(v.shape) != shapes[k]]
    absent = [k for k in shapes if k.startswith("model.diffusion_model.") and k not in state_dict]
    if misfits or absent:
        first = misfits[0] if misfits else absent[0]
        raise AdapterError(f"{ckpt}: does not fit {config} ({len(misfits)} weight(s) of another size, {len(absent)} "
                           f"missing, e.g. {first}); pass --config with the checkpoint's model YAML")
    lines = []
    for path, weight in adapters:
        tensors, meta = read_adapter(path)
        net = AdapterNetwork(model, NetworkConfig(), tensors, str(path), fresh=False)
        n = net.merge_into(state_dict, weight)
        counts = net.counts()
        lines.append(f"{path}: merged {n} modules ({counts['unet']} UNet, {counts['text_encoder']} text encoder) "
                     f"at weight {weight:g}" + (f"; trained on {meta['ss_sd_model_name']}"
                                                 if meta.get("ss_sd_model_name") else ""))
    ckpt_io.save_checkpoint(state_dict, out)
    lines.append(f"wrote {out}")
    return lines
