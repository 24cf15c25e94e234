"""kohya key names for our CompVis-layout model, checked against the loaders' own mapping."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.modules.adapters.names import block_names, compvis_key, default_targets, kohya_key
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
          "conv_shortcut": "skip_connection"}


def a1111_to_compvis(key: str) -> str:
    """The SD 1.x diffusers -> CompVis rules AUTOMATIC1111 applies to a kohya UNet key
    (written from the published table, independently of ldm.modules.adapters.names)."""
    def resnet(rest: str) -> str:
        for d, c in RESNET.items():
            if rest.startswith(d):
                return c + rest[len(d):]
        return rest

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d)(.*)", lambda m: f"time_embed_{2 * int(m[1]) - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d)_(attentions|resnets)_(\d)_(.+)",
         lambda m: f"input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   + (m[4] if m[2] == "attentions" else resnet(m[4]))),
        (r"lora_unet_down_blocks_(\d)_downsamplers_0_conv(.*)",
         lambda m: f"input_blocks_{3 + 3 * int(m[1])}_0_op{m[2]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d)_(.+)",
         lambda m: f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
                   + (m[3] if m[1] == "attentions" else resnet(m[3]))),
        (r"lora_unet_up_blocks_(\d)_(attentions|resnets)_(\d)_(.+)",
         lambda m: f"output_blocks_{3 * int(m[1]) + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   + (m[4] if m[2] == "attentions" else resnet(m[4]))),
        (r"lora_unet_up_blocks_(\d)_upsamplers_0_conv(.*)",
         lambda m: f"output_blocks_{3 * int(m[1]) + 2}_{1 if m[1] == '0' else 2}_conv{m[2]}"),
    ]
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return "diffusion_model_" + repl(m)
    raise AssertionError(f"no A1111 rule for {key}")


@pytest.fixture(scope="module")
def sd1():
    cfg = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model
    with torch.device("meta"):
        return instantiate_from_config({"target": cfg.target, "params": cfg.params})


def modules_by_underscored_path(model) -> dict[str, nn.Module]:
    """How A1111 indexes the model: `diffusion_model_...` / `transformer_text_model_...`."""
    out = {}
    for name, module in model.model.named_modules():
        out[name.replace(".", "_")] = module
    for name, module in model.cond_stage_model.named_modules():
        out[name.replace(".", "_")] = module
    return out


@pytest.mark.parametrize("conv, unet_count", [(False, 192), (True, 278)])
def test_sd15_default_targets_are_kohya_s_module_sets(sd1, conv, unet_count):
    targets = list(default_targets(sd1, conv=conv))
    blocks = block_names(sd1.model.diffusion_model)
    keys = [kohya_key(path, blocks) for path, _ in targets]
    assert len(set(keys)) == len(keys)
    assert sum(k.startswith("lora_unet_") for k in keys) == unet_count
    assert sum(k.startswith("lora_te_text_model_encoder_layers_") for k in keys) == 72
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in" in keys
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in keys
    if conv:
        assert {"lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_1_resnets_0_conv_shortcut",
                "lora_unet_down_blocks_2_downsamplers_0_conv",
                "lora_unet_mid_block_resnets_1_time_emb_proj"} <= set(keys)


def test_every_key_reaches_its_module_through_both_loader_routes(sd1):
    index = modules_by_underscored_path(sd1)
    blocks = block_names(sd1.model.diffusion_model)
    for path, module in default_targets(sd1, conv=True):
        key = kohya_key(path, blocks)
        if key.startswith("lora_unet_"):
            assert index[a1111_to_compvis(key)] is module, key                              # diffusers names
            assert index[compvis_key(path).replace("lora_unet_", "diffusion_model_")] is module  # CompVis fallback
        else:
            assert index[key.replace("lora_te_", "transformer_")] is module, key


def test_the_tiny_model_maps_too():
    cfg = OmegaConf.load(ROOT / "configs/tiny/model.yaml").model
    with torch.device("meta"):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    blocks = block_names(model.model.diffusion_model)
    keys = {kohya_key(p, blocks) for p, _ in default_targets(model, conv=True)}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in keys
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in keys and "lora_unet_up_blocks_0_upsamplers_0_conv" in keys


@pytest.mark.parametrize("network, unet_count", [({"algo": "lora"}, 192), ({"algo": "locon"}, 278),
                                                 ({"algo": "loha", "conv_dim": 4}, 278),
                                                 ({"algo": "lokr", "conv_dim": 4}, 278)])
def test_every_written_key_fits_its_module_through_both_routes(sd1, network, unet_count):
    """The SD 1.5 network's file tensors, as the UIs resolve them: each key reaches a module
    of the CompVis model through the diffusers names and through the CompVis fallback, and
    the ΔW its tensors rebuild has that module's weight shape."""
    from ldm.modules.adapters.config import NetworkConfig
    from ldm.modules.adapters.network import AdapterNetwork

    net = AdapterNetwork(sd1, NetworkConfig.from_mapping({"dim": 4, "alpha": 2, **network}))
    try:
        tensors = net.tensors()
        paths = dict(net.paths)
    finally:
        net.remove()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, _, rest = name.partition(".")
        by_module.setdefault(key, {})[rest] = t
    assert sum(k.startswith("lora_unet_") for k in by_module) == unet_count
    assert sum(k.startswith("lora_te_text_model_encoder_layers_") for k in by_module) == 72
    index = modules_by_underscored_path(sd1)
    for key, t in by_module.items():
        assert "alpha" in t and t["alpha"].dim() == 0, key
        if key.startswith("lora_unet_"):
            module = index[a1111_to_compvis(key)]
            assert index[compvis_key(paths[key]).replace("lora_unet_", "diffusion_model_")] is module
        else:
            module = index[key.replace("lora_te_", "transformer_")]
        shape = module.weight.shape
        if "lora_down.weight" in t:
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            assert up.shape[0] == shape[0] and down.shape[1:] == shape[1:], key
            assert up.shape[2:] in ((), (1, 1)), key  # ComfyUI multiplies flattened factors: up is 1x1
        elif "hada_w1_a" in t:
            assert (t["hada_w1_a"] @ t["hada_w1_b"]).numel() == shape.numel(), key
            assert t["hada_w1_a"].shape[0] == shape[0], key
        else:
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            assert torch.kron(t["lokr_w1"], w2.flatten(1)).numel() == shape.numel(), key
            assert t["lokr_w1"].shape[0] * w2.shape[0] == shape[0], key
