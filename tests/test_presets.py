"""The memory presets (configs/stable-diffusion/presets/): each merges after the SD 1.x and 2.x
fine-tune configs without an unknown key, and a model built with it stores, steps and
checkpoints as the preset says."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import load_config
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs/stable-diffusion/presets").glob("*.yaml"))
BASES = ["configs/stable-diffusion/v1-finetune_everydream.yaml", "configs/stable-diffusion/v2-finetune_everydream.yaml"]
# what each preset is for, as its file says: (batch size, text encoder trains, checkpointing, compile, optimizer)
EXPECTED = {"vram_6gb": (1, False, False, False, "adamw8bit_bf16"),
            "vram_12gb": (6, True, False, "reduce-overhead", "adamw_bf16")}


def test_every_preset_is_described_here():
    assert sorted(p.stem for p in PRESETS) == sorted(EXPECTED)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_merges_after_the_fine_tune_configs(base, preset):
    cfg = load_config([ROOT / base, preset])
    batch, text_encoder, checkpointing, compile_, optimizer = EXPECTED[preset.stem]
    params = cfg.model.params
    assert cfg.data.params.batch_size == batch
    assert params.unet_precision == "bf16" and params.optimizer.name == optimizer
    assert params.optimizer.fused_backward is True and params.use_ema is False
    assert params.cond_stage_trainable is text_encoder
    assert params.unet_config.params.use_checkpoint is checkpointing
    assert params.get("compile", False) == compile_
    assert cfg.lightning.trainer.precision == "bf16-mixed"  # the base's, which bf16 weights need


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_model_with_a_preset_keeps_bf16_weights_and_steps_in_the_backward_pass(preset):
    """The tiny model with the preset's model settings (compilation left out: it is tested on
    its own): bf16 UNet, the optimizer stepping each weight during the backward pass, so no
    UNet gradient is left afterwards, and bf16 UNet weights in the state dict."""
    tiny = OmegaConf.load(ROOT / "tests/configs/tiny.yaml")
    preset_cfg = OmegaConf.load(preset)
    preset_cfg.model.params.pop("compile", None)
    cfg = OmegaConf.merge(tiny, preset_cfg).model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    model.setup("fit")
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())
    model.learning_rate = 1e-4
    opt = model.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in model.model.parameters()]
    model.on_fit_start()
    batch = model.on_before_batch_transfer({"image": torch.rand(2, 3, 32, 32) * 2 - 1,
                                            "caption": ["a red circle", "a blue square"]}, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.shared_step(batch)
    loss.backward()
    opt.step()  # the steps taken in the backward pass; nothing is left to do
    assert all(p.grad is None for p in model.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.model.parameters()))
    assert all(v.dtype == torch.bfloat16 for k, v in model.state_dict().items()
               if k.startswith("model.diffusion_model."))
    opt.remove_hooks()
