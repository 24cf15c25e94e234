"""The UNet's transformer: cross-attention of image tokens on the text context.

SpatialTransformer flattens a feature map [B, C, H, W] into H*W tokens, runs
BasicTransformerBlocks over them (self-attention, cross-attention on the text
encoder's hidden states, GEGLU feed-forward; all pre-norm residual) and adds the
result back onto the feature map. Module and parameter names follow the released
Stable Diffusion checkpoints (attn1/attn2/ff/norm1..3, to_q/to_k/to_v/to_out.0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import autocast_dtype, checkpoint, normalization, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention of `x` on `context` (on `x` itself when context is None).

    heads * dim_head is the inner width; head i owns columns [i*dim_head, (i+1)*dim_head)
    of the q/k/v projections, which is how released weights are laid out.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, N, query_dim], context: [B, L, context_dim] -> [B, N, query_dim]
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B, N|L, h*d]
        b = x.shape[0]
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (q, k, v))  # [B, h, N|L, d]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: [B, h, N, d]
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])  # [B, N, h*d]
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear layer to 2*dim_out, gated: value * gelu(gate) (value is the first half).

    The value and gate halves are two products with the halves of `proj`'s weight rather than
    one product split in two: the backward then writes the two halves' gradients as they are,
    instead of gathering them into one [tokens, 2*dim_out] tensor (at 64x64 latents, 670 MB
    per block at batch 32; doc/PERFORMANCE.md). An adapter on `proj` patches its forward;
    then the layer runs whole.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _patched(self.proj):
            value, gate = self.proj(x).chunk(2, dim=-1)
        else:
            w_value, w_gate = self.proj.weight.chunk(2)  # [dim_out, dim_in] each
            b_value, b_gate = self.proj.bias.chunk(2)
            value, gate = F.linear(x, w_value, b_value), F.linear(x, w_gate, b_gate)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP dim -> mult*dim -> dim (keys ff.net.0.proj and ff.net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that under autocast runs in the input's bf16/fp16 (statistics in float32
    inside torch's kernel) instead of autocast's float32 round trip (`autocast_dtype`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context, feed-forward."""

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """proj_in/proj_out on tokens x [B, N, C_in] -> [B, N, C_out], contiguous.

    SD 1.x's are 1x1 convolutions, run here as the products they are: the transformer's
    tokens then stay contiguous, where the token view of an NCHW map ([B, C, N] in memory)
    made every LayerNorm copy its input, forward and backward, and every residual branch its
    gradient; cuDNN also transposed each NCHW map into and out of its 1x1 kernels. For SD 1.x
    at batch 32 that was ~9 copies of a [32, 4096, 320] map per block at 64x64
    (doc/PERFORMANCE.md). A convolution an adapter patched runs as a convolution (its tokens
    then keep the map's layout).
    """
    if not isinstance(layer, nn.Conv2d):
        return layer(x)
    if _patched(layer):
        return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # as a [B, C, N, 1] map
    return F.linear(x, layer.weight.flatten(1), layer.bias)


def _patched(layer: nn.Module) -> bool:
    """Whether an adapter patched the layer's forward (ldm.modules.adapters)."""
    return "forward" in vars(layer)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on `context`.

    proj_in/proj_out are 1x1 convolutions (SD 1.x) or, with use_linear=True, linear
    layers on the flattened tokens (SD 2.x). proj_out starts at zero, so a fresh
    block is the identity.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, context_dim: int,
                 depth: int = 1, dropout: float = 0.0, use_linear: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout, use_checkpoint)
            for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W], context: [B, L, context_dim] -> [B, C, H, W]
        b, c, h, w = x.shape
        x_in = x
        x = project(self.proj_in, self.norm(x).flatten(2).transpose(1, 2))  # [B, H*W, inner], contiguous
        for block in self.transformer_blocks:
            x = block(x, context)
        x = project(self.proj_out, x)  # [B, H*W, C]
        return x_in + x.transpose(1, 2).reshape(b, c, h, w)  # in x_in's memory format
