"""The shipped tiny shapes model (models/tiny/tiny-shapes.safetensors; doc/TINY_BASE.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.data.batching import collate_batch
from ldm.util import instantiate_from_config
from scripts.demo import BASE_WEIGHTS, colour_accuracy, load_model
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return load_model(BASE_WEIGHTS)


def test_the_file_is_a_small_compvis_layout_checkpoint_of_the_tiny_config():
    assert BASE_WEIGHTS.stat().st_size <= 25 * 2**20
    cfg = OmegaConf.load(ROOT / "configs/tiny/model.yaml").model
    with torch.device("meta"):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    sd = ckpt_io.load_state_dict(BASE_WEIGHTS)
    assert set(sd) == set(model.state_dict())  # every key, CompVis names, nothing else
    assert all(sd[k].shape == v.shape for k, v in model.state_dict().items())


@pytest.mark.parametrize("size", ["large", "small"])
def test_prompts_get_their_colour(base, size):
    """The base-quality check: the dominant non-background colour is the prompt's, >= 80%."""
    from ldm.models.diffusion.txt2img import txt2img

    prompts = [f"a {size} {c} {s} on a {bg} background" for c, s, bg in [
        ("red", "circle", "white"), ("green", "square", "black"), ("blue", "triangle", "white"),
        ("yellow", "ring", "black"), ("purple", "circle", "gray"), ("orange", "square", "white")]]
    images = txt2img(base, prompts, list(range(100, 106)), height=64, width=64, steps=25, guidance_scale=4.0)
    assert colour_accuracy(images, prompts) >= 0.8


def test_vae_reconstructs_held_out_images(base, tmp_path):
    make_shapes(tmp_path, count=32, size=64, seed=3)  # the base model was trained on seed 1
    ds = instantiate_from_config({"target": "ldm.data.ed_validate.EDValidateBatch",
                                  "params": {"data_root": str(tmp_path), "batch_size": 16, "resolution": 64,
                                             "bucket_step": 16, "min_side": 32}})
    errors = []
    with torch.no_grad():
        for keys in ds.batch_sampler():
            x = collate_batch([ds[k] for k in keys])["image"]
            vae = base.first_stage_model
            x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
            errors.append((x_rec - x).abs().mean(dim=(1, 2, 3)) / 2)  # mean |error| in [0, 1] units
    errors = torch.cat(errors)
    # recorded when the model was trained (doc/TINY_BASE.md): mean 0.0185, max 0.046 over 64 images
    assert errors.mean() < 0.03 and errors.max() < 0.08
