"""Text to images with a LatentDiffusion model: encode prompts, DDIM with classifier-free
guidance, decode. Used by the ImageLogger, the demo and the tiny model's quality checks.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence

import torch
from PIL import Image

from ldm.models.diffusion.ddim import DDIMSampler


def latent_factor(model: torch.nn.Module) -> int:
    """Pixels per latent pixel: 2 ** (number of VAE levels - 1), 8 for SD."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


@torch.no_grad()
def txt2img(model: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int], *, height: int, width: int,
            steps: int = 40, guidance_scale: float = 7.5, negative_prompt: str = "",
            autocast: ContextManager | None = None) -> list[Image.Image]:
    """One image per prompt, its start noise from a CPU generator seeded by its seed, so an
    image does not depend on the device or on what it is batched with. `autocast` is the
    context for the text encoder and UNet (the VAE decodes in its own precision)."""
    factor = latent_factor(model)
    shape = (len(prompts), model.channels, height // factor, width // factor)
    x_T = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with autocast or nullcontext():
        cond = model.get_learned_conditioning(list(prompts))               # [B,77,D]
        uncond = model.get_learned_conditioning([negative_prompt])         # [1,77,D]
        z = DDIMSampler(model).sample(cond, uncond, shape, steps=steps, guidance_scale=guidance_scale, x_T=x_T)
    vae_dtype = next(model.first_stage_model.parameters()).dtype
    images = []
    for z_i in z:  # one at a time, in the VAE's own precision: the decoder is the memory peak
        x = model.decode_first_stage(z_i[None].to(vae_dtype))[0].float()  # [3,H,W] in ~[-1,1]
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(pixels))
    return images
