"""Helpers of the checkpoint tests: a module and state dicts named like a CompVis LatentDiffusion's,
a few hundred numbers in all, and a bit-exact comparison of state dicts."""
from __future__ import annotations

import torch
from torch import nn

from ldm.checkpoint import POSITION_IDS_KEY


class TinyLDM(nn.Module):
    """Parameter names shaped like a CompVis LatentDiffusion, a few hundred numbers in all."""

    def __init__(self, ema: bool = False, position_ids: bool = False):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Module()
        self.model.diffusion_model.input_blocks = nn.ModuleList([nn.Conv2d(4, 8, 3)])
        self.model.diffusion_model.out = nn.Linear(8, 4)
        self.first_stage_model = nn.Module()
        self.first_stage_model.encoder = nn.Conv2d(3, 4, 1)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = nn.Module()
        text = self.cond_stage_model.transformer.text_model = nn.Module()
        text.embeddings = nn.Module()
        text.embeddings.token_embedding = nn.Embedding(10, 8)
        if position_ids:  # as older transformers versions kept it: a persistent buffer
            text.embeddings.register_buffer("position_ids", torch.arange(77)[None])
        self.register_buffer("betas", torch.linspace(1e-4, 2e-2, 10))
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - self.betas, 0))
        if ema:  # LitEma-style buffers: UNet wrapper names without dots
            self.model_ema = nn.Module()
            for name, p in self.model.named_parameters():
                self.model_ema.register_buffer(name.replace(".", ""), p.detach().clone())
            self.model_ema.register_buffer("decay", torch.tensor(0.9999))
            self.model_ema.register_buffer("num_updates", torch.tensor(0, dtype=torch.int32))


def sd_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def random_sd(dtype=torch.float32, ema=False) -> dict:
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v, dtype=dtype) if v.is_floating_point() else v.clone()
          for k, v in TinyLDM(ema=ema).state_dict().items()}
    if ema:
        sd["model_ema.num_updates"] = torch.tensor(123, dtype=torch.int32)
    sd[POSITION_IDS_KEY] = torch.arange(77)[None]
    # values where "close" is not "equal": signed zero, infinities, subnormals, NaN
    sd["model.diffusion_model.out.bias"] = torch.tensor([-0.0, float("inf"), 1e-40, float("nan")]).to(dtype)
    return sd


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k
