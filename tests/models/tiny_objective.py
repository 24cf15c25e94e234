"""Helpers of the objective's tests: the tiny test model with model.params overrides, seeded streams."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

TINY = Path(__file__).resolve().parents[2] / "tests/configs/tiny.yaml"


def build(**overrides):
    """The tiny LatentDiffusion with `overrides` in model.params, the same weights every time."""
    cfg = OmegaConf.load(TINY).model
    for k, v in overrides.items():
        cfg.params[k] = v
    torch.manual_seed(0)
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def stream(seed=1):
    return torch.Generator().manual_seed(seed)
