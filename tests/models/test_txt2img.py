"""txt2img's attention kernels (ldm/models/diffusion/txt2img.py: SAMPLING_ATTENTION)."""
from __future__ import annotations

import torch

from ldm.models.diffusion.txt2img import txt2img
from scripts.demo import BASE_WEIGHTS, load_model


def _sdp_flags() -> dict[str, bool]:
    b = torch.backends.cuda
    return {"cudnn": b.cudnn_sdp_enabled(), "flash": b.flash_sdp_enabled(),
            "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}


def test_sampling_leaves_out_cudnn_attention_and_restores_the_choice():
    """cuDNN's kernel builds a graph at each new shape (~0.35-0.9 s in a grid's first call on
    an H200): the text encoder and the UNet sample with the others; training keeps them all."""
    model = load_model(BASE_WEIGHTS)
    seen = []
    for name in ("apply_model", "get_learned_conditioning"):
        original = getattr(model, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, _sdp_flags()))
            return _original(*args, **kwargs)
        setattr(model, name, spy)
    before = _sdp_flags()
    assert before["cudnn"]  # PyTorch's default, which training keeps
    images = txt2img(model, ["a red circle on a white background"], [1], height=32, width=32, steps=2)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert {name for name, _ in seen} == {"apply_model", "get_learned_conditioning"}
    for _, flags in seen:
        assert flags == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert _sdp_flags() == before
