"""Exponential moving average of a model's weights, stored the way SD checkpoints store it.

Released checkpoints keep the EMA of the UNet wrapper as buffers of a module named
`model_ema`: one buffer per trainable parameter, named after the parameter's path
with its dots removed (`diffusion_model.input_blocks.0.0.weight` ->
`diffusion_modelinput_blocks00weight`), plus `decay` and `num_updates`.

Update rule (with the usual warm-up of the decay):
    d_n     = min(decay, (1 + n) / (10 + n))
    shadow <- shadow + (1 - d_n) (param - shadow)
It runs on the device without reading anything back to the host.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def shadow_name(param_name: str) -> str:
    return param_name.replace(".", "")


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.param_names: list[str] = []  # model parameter names, in order
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.param_names.append(name)
                self.register_buffer(shadow_name(name), p.detach().clone().float())

    def _shadows(self) -> list[torch.Tensor]:
        buffers = dict(self.named_buffers())
        return [buffers[shadow_name(n)] for n in self.param_names]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.param_names]

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights."""
        n = self.num_updates.float()  # -1 disables the warm-up
        warm = torch.where(self.num_updates >= 0, (1 + n) / (10 + n), torch.ones_like(n))
        decay = torch.minimum(self.decay, warm)
        self.num_updates.add_((self.num_updates >= 0).to(torch.int32))
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self._shadows(), params, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, s in zip(self._params(model), self._shadows()):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Run a block with the EMA weights in `model`, restoring the trained weights after."""
        saved = [p.detach().clone() for p in self._params(model)]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params(model), saved):
                    p.copy_(s)
