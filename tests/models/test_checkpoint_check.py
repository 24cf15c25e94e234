"""The checkpoint check: what a loaded file honestly shows about its prediction type and schedule."""
from __future__ import annotations

import warnings

import pytest
import torch

from ldm.models.diffusion.checkpoint_check import checkpoint_warnings
from tiny_objective import build, stream

# ---- the checkpoint's prediction type ---------------------------------------------------------------
CONTEXT = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def fake_sd(context_dim, in_channels=4, probe_std=None, **extra):
    sd = {CONTEXT: torch.zeros(320, context_dim), CONV_IN: torch.zeros(320, in_channels, 3, 3), **extra}
    if probe_std is not None:
        x = torch.randn(320, generator=stream())
        sd[PROBE] = (x - x.mean()) / x.std(correction=0) * probe_std
    return sd


@pytest.mark.parametrize("sd, parameterization, image_size, expect", [
    (fake_sd(768), "eps", 64, None),
    (fake_sd(768), "v", 64, "SD 1.x"),
    (fake_sd(768, v_pred=torch.tensor([])), "v", 64, None),            # a marked v fine-tune
    (fake_sd(768, v_pred=torch.tensor([])), "eps", 64, "'v_pred'"),
    (fake_sd(1024, probe_std=0.15), "v", 96, None),                    # 768-v as ComfyUI reads it
    (fake_sd(1024, probe_std=0.15), "eps", 96, "reads as v"),
    (fake_sd(1024, probe_std=0.15), "eps", 64, "reads as v"),
    (fake_sd(1024, probe_std=0.05), "eps", 64, None),                  # the 512 base
    (fake_sd(1024, probe_std=0.05), "v", 64, "reads as eps"),
    (fake_sd(1024, probe_std=0.05), "eps", 96, "768 px"),              # base at 768 px, or a 768-v
    (fake_sd(1024), "eps", 96, "768 px"),                              # no probe: shapes cannot tell
    (fake_sd(1024), "eps", 64, None),
    (fake_sd(1024, in_channels=9), "v", 64, "inpainting"),
    (fake_sd(1024, in_channels=9), "eps", 96, None),
])
def test_checkpoint_warnings_report_what_the_file_shows(sd, parameterization, image_size, expect):
    found = checkpoint_warnings(sd, parameterization, image_size=image_size, source="f.ckpt")
    if expect is None:
        assert found == []
    else:
        assert len(found) == 1 and expect in found[0] and found[0].startswith("f.ckpt: "), found


def test_checkpoint_warnings_about_a_zero_terminal_snr_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        file = build(zero_terminal_snr=True, parameterization="v").state_dict()
    assert any("zero-terminal-SNR" in m for m in checkpoint_warnings(file, "v"))
    assert checkpoint_warnings(file, "v", zero_terminal_snr=True) == []
    assert any("zero-terminal-SNR" in m for m in checkpoint_warnings({"ztsnr": torch.tensor([])}, "v"))


def test_the_model_warns_through_check_checkpoint():
    model = build(parameterization="v")
    assert model.check_checkpoint(build().state_dict()) == []  # the tiny model: nothing to tell
    with pytest.warns(UserWarning, match="SD 1.x"):
        assert model.check_checkpoint(fake_sd(768), source="sd15.ckpt")
