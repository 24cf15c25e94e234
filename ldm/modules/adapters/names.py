"""Adapter (LoRA/LoCon/LoHA) key names: our CompVis module paths <-> kohya's diffusers names.

kohya sd-scripts names an SD 1.x/2.x adapter module after the diffusers UNet path, with
dots turned into underscores:
    model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q
        -> diffusers  down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
        -> kohya key  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
and the CLIP text encoder after transformers' path from `text_model`:
    cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1
        -> lora_te_text_model_encoder_layers_3_mlp_fc1
(SD 2.x's OpenCLIP encoder gets the same transformers-style names: openclip.py).
AUTOMATIC1111 and ComfyUI map diffusers names back to CompVis, and also accept the CompVis
path itself (`lora_unet_input_blocks_1_1_...`) as a fallback; `compvis_key` gives that form.

The block correspondence is read off the UNet's own structure (levels, ResBlocks per
level), so it holds for SD 1.x, SD 2.x and the tiny model alike.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ldm.modules.adapters import openclip

UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model.transformer."  # SD 1.x (transformers CLIP text model)

# inside a ResBlock: CompVis child -> diffusers ResnetBlock2D child
RESNET_CHILDREN = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP_LEVEL = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


def block_names(unet: nn.Module) -> dict[str, str]:
    """CompVis block path (under diffusion_model) -> diffusers block path, for every block."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    n = len(unet.input_blocks) // unet.num_levels - 1  # ResBlocks per level on the way down
    names = dict(TOP_LEVEL)
    for k, block in enumerate(unet.input_blocks):
        if k == 0:
            continue
        level, pos = divmod(k - 1, n + 1)
        if pos == n:  # the level's downsampler
            assert isinstance(block[0], Downsample), f"input_blocks.{k}"
            names[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            continue
        names[f"input_blocks.{k}.0"] = f"down_blocks.{level}.resnets.{pos}"
        if len(block) > 1:
            names[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{pos}"
    names.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                  "middle_block.2": "mid_block.resnets.1"})
    for k, block in enumerate(unet.output_blocks):
        level, pos = divmod(k, n + 1)
        names[f"output_blocks.{k}.0"] = f"up_blocks.{level}.resnets.{pos}"
        for i, child in enumerate(block):
            if i > 0 and isinstance(child, Upsample):
                names[f"output_blocks.{k}.{i}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            elif i == 1:
                names[f"output_blocks.{k}.1"] = f"up_blocks.{level}.attentions.{pos}"
    return names


def diffusers_path(compvis_path: str, blocks: dict[str, str]) -> str:
    """`input_blocks.1.0.in_layers.2` -> `down_blocks.0.resnets.0.conv1` (paths under the UNet)."""
    for prefix in sorted(blocks, key=len, reverse=True):  # longest block prefix first
        if compvis_path == prefix or compvis_path.startswith(prefix + "."):
            rest = compvis_path[len(prefix) + 1:]
            if ".resnets." in blocks[prefix] and rest:
                rest = RESNET_CHILDREN.get(rest, rest)
            return blocks[prefix] + ("." + rest if rest else "")
    raise KeyError(f"{compvis_path}: no diffusers name")


def kohya_key(module_path: str, blocks: dict[str, str]) -> str:
    """Full CompVis module path -> the kohya key (diffusers-named), as A1111/ComfyUI read it."""
    if module_path.startswith(UNET_PREFIX):
        return "lora_unet_" + diffusers_path(module_path[len(UNET_PREFIX):], blocks).replace(".", "_")
    if module_path.startswith(TE_PREFIX):
        return "lora_te_" + module_path[len(TE_PREFIX):].replace(".", "_")
    if module_path.startswith(openclip.PREFIX):
        return openclip.kohya_key(module_path)
    raise KeyError(f"{module_path}: not a UNet or text-encoder module")


def compvis_key(module_path: str) -> str:
    """The CompVis-named fallback key (`lora_unet_input_blocks_1_1_...`)."""
    if module_path.startswith(UNET_PREFIX):
        return "lora_unet_" + module_path[len(UNET_PREFIX):].replace(".", "_")
    return kohya_key(module_path, {})


def default_targets(model: nn.Module, conv: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """The modules kohya wraps: every Linear/Conv2d inside the UNet's transformers
    (SpatialTransformer = diffusers Transformer2DModel) and the text encoder's attention and
    MLP; with `conv` (LoCon/LoHA conv_dim) also those of ResBlocks, Downsample and Upsample."""
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    parents = (SpatialTransformer, ResBlock, Downsample, Upsample) if conv else (SpatialTransformer,)
    unet = model.model.diffusion_model
    for name, parent in unet.named_modules():
        if isinstance(parent, parents):
            for child_name, child in parent.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    yield f"{UNET_PREFIX}{name}.{child_name}", child
    te = getattr(model.cond_stage_model, "transformer", None)
    if te is None:  # SD 2.x: OpenCLIP
        yield from openclip.targets(model)
        return
    for name, parent in te.named_modules():
        if isinstance(parent, (CLIPAttention, CLIPMLP)):  # by type: class names changed across versions
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    yield f"{TE_PREFIX}{name}.{child_name}", child


def all_unet_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every Linear/Conv2d of the UNet: what a file may name beyond kohya's sets (LyCORIS'
    `full` preset adds conv_in, conv_out and the time embedding)."""
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield f"{UNET_PREFIX}{name}", module
