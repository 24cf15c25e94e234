"""Trainer options through main.py: accumulation, clipping and the seed change what they
should, are recorded in an adapter's header, and leave the rest alone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.modules.adapters.files import read_adapter
from ldm.train import main
from ldm.util import instantiate_from_config
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--base", str(ROOT / "tests/configs/tiny.yaml"), str(ROOT / "tests/configs/tiny_run.yaml"),
        str(ROOT / "tests/configs/tiny_lora.yaml")]
QUIET = ["lightning.trainer.max_epochs=1", "lightning.callbacks.image_logger.params.disabled=true",
         "data.params.validation=null", "data.params.train.params.val_split=0.0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_options")
    make_shapes(out / "shapes", count=8, size=64, seed=0)
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    with torch.no_grad():  # zero-initialised output layers would pass no gradient back
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    ckpt_io.save_checkpoint(model.state_dict(), out / "base.safetensors")
    return out


def train(inputs: Path, tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict]:
    logs = tmp_path / name
    assert main([*BASE, "-t", "--actual_resume", str(inputs / "base.safetensors"), "--data_root",
                 str(inputs / "shapes"), "-l", str(logs), *QUIET, *extra]) == 0
    (run,) = list(logs.iterdir())
    return read_adapter(run / "adapters" / "adapter.safetensors")


def change(tensors: dict) -> float:
    """How far the adapter moved from its start (lora_up starts at zero)."""
    return sum(float(v.float().norm()) for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_accumulation_clipping_and_seed(inputs, tmp_path):
    plain, meta = train(inputs, tmp_path, "plain")
    steps = int(meta["ss_steps"])
    assert steps > 2 and meta["ss_gradient_accumulation_steps"] == "1"
    again, _ = train(inputs, tmp_path, "again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the same seed: the same adapter

    other, meta = train(inputs, tmp_path, "seed", "--seed", "5")
    assert meta["ss_seed"] == "5" and not all(torch.equal(plain[k], other[k]) for k in plain)

    accumulated, meta = train(inputs, tmp_path, "accumulate", "lightning.trainer.accumulate_grad_batches=2")
    assert (meta["ss_steps"], meta["ss_gradient_accumulation_steps"]) == (str(-(-steps // 2)), "2")
    assert 0 < change(accumulated) < change(plain)  # half the optimizer steps

    clipped, meta = train(inputs, tmp_path, "clip", "lightning.trainer.gradient_clip_val=1e-7")
    assert meta["ss_max_grad_norm"] == "1e-07"
    assert {k: v.shape for k, v in clipped.items()} == {k: v.shape for k, v in plain.items()}
    # gradients clipped to a norm of 1e-7 fall below AdamW's eps (1e-8 per element): tiny steps
    assert 0 < change(clipped) < 0.2 * change(plain)
