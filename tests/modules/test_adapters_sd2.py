"""Adapters on the SD 2.x (OpenCLIP) text encoder: kohya's names, and the fused attention."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ldm.modules.adapters import openclip
from ldm.modules.adapters.config import NetworkConfig
from ldm.modules.adapters.modules import LoHa, LoRA
from ldm.modules.adapters.network import AdapterNetwork
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


def test_patched_attention_equals_torch_s_attention_with_merged_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 7, 16)
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    before = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    stand_in = nn.Linear(16, 16, bias=False, device="meta")
    parts = {"q_proj": LoRA(stand_in, 2, 1.0), "v_proj": LoHa(stand_in, 2, 2.0), "out_proj": LoRA(mha.out_proj, 3, 3.0)}
    openclip.patch_attention(mha, parts)
    assert torch.allclose(mha(x, x, x, need_weights=False, attn_mask=mask)[0], before, atol=1e-6)  # ΔW starts at 0
    for a in parts.values():
        randomise(a)
        a.multiplier = 0.5
    adapted = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    openclip.unpatch_attention(mha)
    reference = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        reference.load_state_dict(mha.state_dict())
        reference.in_proj_weight[0:16] += 0.5 * parts["q_proj"].delta_weight()
        reference.in_proj_weight[32:48] += 0.5 * parts["v_proj"].delta_weight()
        reference.out_proj.weight += 0.5 * parts["out_proj"].delta_weight()
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert torch.allclose(adapted, expected, atol=1e-5)
    assert torch.equal(mha(x, x, x, need_weights=False, attn_mask=mask)[0], before)  # unpatched


def test_sd2_keys_are_kohya_s():
    cfg = OmegaConf.load(ROOT / "configs/stable-diffusion/v2-inference.yaml").model
    with torch.device("meta"):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    net = AdapterNetwork(model, NetworkConfig(dim=2))
    try:
        # the 23 blocks SD 2.x runs (penultimate layer) x (q, k, v, out, fc1, fc2), as kohya writes them
        assert net.counts() == {"unet": 192, "text_encoder": 138}
        assert "lora_te_text_model_encoder_layers_22_self_attn_k_proj" in net.paths
        assert "lora_te_text_model_encoder_layers_23_mlp_fc1" not in net.paths
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in net.paths  # Linear in SD 2.x
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert shapes["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] == (2, 1024)
        assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] == (4096, 2)
    finally:
        net.remove()


@pytest.fixture(scope="module")
def openclip_model():
    """The tiny test UNet conditioned by a real (small) OpenCLIP text tower."""
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    cfg.params.cond_stage_config = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                    "params": {"arch": "ViT-B-32", "layer": "penultimate"}}
    cfg.params.unet_config.params.context_dim = 512
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_an_sd2_text_encoder_adapter_trains_and_merges(openclip_model, algo):
    model = openclip_model
    prompts = ["a red ring", "meebs"]
    net = AdapterNetwork(model, NetworkConfig(algo=algo, dim=2, targets=["text_encoder"]))
    try:
        plain = model.get_learned_conditioning(prompts).detach()
        randomise(net)
        ctx = model.get_learned_conditioning(prompts)
        assert not torch.allclose(ctx, plain, atol=1e-4)
        ctx.square().mean().backward()
        grads = {k: p.grad for k, p in net.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
            [k for k, g in grads.items() if g is None or not g.abs().sum()][:3]
        merged = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("network.")}
        net.merge_into(merged)
    finally:
        net.remove()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(merged, strict=False)
        out = model.get_learned_conditioning(prompts)
        model.load_state_dict(saved, strict=False)
    assert (out - ctx.detach()).abs().max() < 1e-3 * ctx.abs().max(), (out - ctx.detach()).abs().max()
