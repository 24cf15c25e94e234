"""Training a VAE from scratch, and handing it to a LatentDiffusion config through ckpt_path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.autoencoder_training import AutoencoderKLTraining

DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def test_reconstruction_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    module = AutoencoderKLTraining(DDCONFIG, embed_dim=4)
    module.learning_rate = 1e-3
    opt = module.configure_optimizers()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    first = None
    for _ in range(30):
        rec, kl = module.losses(x)
        loss = rec + module.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = rec.item() if first is None else first
    assert torch.isfinite(kl) and rec.item() < 0.7 * first


def test_a_training_checkpoint_loads_through_ckpt_path(tmp_path):
    trained = AutoencoderKLTraining(DDCONFIG, embed_dim=4)
    torch.save({"state_dict": trained.state_dict(), "global_step": 3}, tmp_path / "vae.ckpt")
    vae = AutoencoderKL(DDCONFIG, embed_dim=4, ckpt_path=str(tmp_path / "vae.ckpt"))
    for k, v in trained.first_stage_model.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v)
    # a LatentDiffusion config takes it the CompVis way
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").model
    cfg.params.first_stage_config.params.ddconfig = DDCONFIG
    cfg.params.first_stage_config.params.ckpt_path = str(tmp_path / "vae.ckpt")
    from ldm.util import instantiate_from_config
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    key = "encoder.conv_in.weight"
    assert torch.equal(model.first_stage_model.state_dict()[key], trained.first_stage_model.state_dict()[key])


def test_ckpt_path_of_another_autoencoder_is_refused_by_name(tmp_path):
    other = AutoencoderKL({**DDCONFIG, "ch": 64}, embed_dim=4)
    torch.save(other.state_dict(), tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt_path .*other.ckpt: not this autoencoder's weights"):
        AutoencoderKL(DDCONFIG, embed_dim=4, ckpt_path=str(tmp_path / "other.ckpt"))
