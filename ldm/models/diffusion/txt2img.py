"""Text to images with a LatentDiffusion model: encode prompts, sample with classifier-free
guidance (DDIM or DPM-Solver++(2M)), decode. Used by the ImageLogger, the demo and the tiny
model's quality checks.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler

# name -> (sampler, its default number of steps). DPM-Solver++(2M) is second order where DDIM is
# first (tests/models/test_dpm_solver.py), so it needs fewer steps for the same error; how few
# depends on the model and the guidance (doc/PERFORMANCE.md: on the tiny model, 20 of its steps
# were not reliably nearer the ODE's solution than 40 of DDIM's).
SAMPLERS = {"ddim": (DDIMSampler, 40), "dpmpp_2m": (DPMSolverSampler, 20)}
ALIASES = {"dpmsolver++": "dpmpp_2m"}  # kohya's sample-prompt name

# Attention kernels for sampling: PyTorch's choice without cuDNN's. On an H100-class GPU PyTorch
# picks cuDNN's kernel, which builds a graph the first time it meets a shape: ~0.35-0.9 s in a
# sample grid's first UNet call at a new size or batch, and the ImageLogger's grids follow the
# latest batch's bucket, so a run's grids meet new shapes often. FlashAttention builds nothing;
# in a warm no-grad forward it is ~3.5 ms (10%) slower at the grid's batch (doc/PERFORMANCE.md,
# nineteenth session). GPUs without flash fall back to the memory-efficient kernel, then math.
SAMPLING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sampler_name(name: str) -> str:
    """The canonical name of a sampler (an alias resolved); ValueError naming the known ones."""
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        known = ", ".join(list(SAMPLERS) + [f"{a} (= {n})" for a, n in ALIASES.items()])
        raise ValueError(f"unknown sampler {name!r} (known: {known})")
    return name


def latent_factor(model: torch.nn.Module) -> int:
    """Pixels per latent pixel: 2 ** (number of VAE levels - 1), 8 for SD."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


@torch.no_grad()
def txt2img(model: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int], *, height: int, width: int,
            steps: int | None = None, guidance_scale: float = 7.5, negative_prompt: str = "",
            sampler: str = "ddim", autocast: ContextManager | None = None) -> list[Image.Image]:
    """One image per prompt, its start noise from a CPU generator seeded by its seed, so an
    image does not depend on the device or on what it is batched with. `sampler`: a name of
    SAMPLERS (or ALIASES); `steps` None: its default. `autocast` is the context for the text
    encoder and UNet (the VAE decodes in its own precision); their attention runs on
    SAMPLING_ATTENTION's kernels."""
    sampler_class, default_steps = SAMPLERS[sampler_name(sampler)]
    factor = latent_factor(model)
    shape = (len(prompts), model.channels, height // factor, width // factor)
    x_T = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with autocast or nullcontext(), sdpa_kernel(SAMPLING_ATTENTION):
        cond = model.get_learned_conditioning(list(prompts))               # [B,77,D]
        uncond = model.get_learned_conditioning([negative_prompt])         # [1,77,D]
        z = sampler_class(model).sample(cond, uncond, shape, steps=steps or default_steps,
                                        guidance_scale=guidance_scale, x_T=x_T)
    vae_dtype = next(model.first_stage_model.parameters()).dtype
    pixels = []
    for z_i in z:  # one at a time, in the VAE's own precision: the decoder is the memory peak
        x = model.decode_first_stage(z_i[None].to(vae_dtype))[0].float()  # [3,H,W] in ~[-1,1]
        pixels.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0))  # [H,W,3]
    # one copy to the host after the last decode: none of them waits for the one before
    return [Image.fromarray(p) for p in torch.stack(pixels).cpu().numpy()]
