"""Convolutional encoder and decoder of the KL autoencoder (Stable Diffusion's "VAE").

Parameter names follow the released CompVis checkpoints exactly
(`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.bias`, ...):
AUTOMATIC1111, ComfyUI and every SD checkpoint read them, so they are a contract.

Shapes, with L = len(ch_mult) resolution levels and f = 2 ** (L - 1):
    image   x [B, in_channels, H, W]
    Encoder   -> [B, 2 * z_channels, H / f, W / f]   (mean and log-variance, if double_z)
    Decoder   z [B, z_channels, H / f, W / f] -> [B, out_ch, H, W]

Level i works at resolution `resolution / 2**i` with `ch * ch_mult[i]` channels.
The encoder runs levels 0..L-1 (downsampling after all but the last); the decoder
runs them L-1..0 (upsampling after all but level 0) but stores `up[i]` by level
index, so `decoder.up.0` is the full-resolution level.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32

# Both names mean the same exact attention, computed by scaled_dot_product_attention
# (SD 2.x YAMLs say "vanilla-xformers"; the parameters are identical).
ATTN_TYPES = ("vanilla", "vanilla-xformers")


def Normalize(in_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as in every SD autoencoder; under autocast it runs in the
    activations' dtype (statistics in float32) like the UNet's (`GroupNorm32`)."""
    return GroupNorm32(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then (if with_conv) a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv after padding right/bottom by one, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """x + F(x) with F = (norm, swish, conv3x3) twice; a 1x1 conv matches channels on the skip path."""

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(B, 1, C, H * W).transpose(2, 3).contiguous()

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


def make_attn(in_channels: int, attn_type: str) -> AttnBlock:
    if attn_type not in ATTN_TYPES:
        raise ValueError(
            f"ddconfig.attn_type: unsupported attention type {attn_type!r}; "
            f"expected one of {', '.join(repr(t) for t in ATTN_TYPES)}"
        )
    return AttnBlock(in_channels)


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: resnet, attention, resnet."""

    def __init__(self, channels: int, dropout: float, attn_type: str):
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _level(c_in: int, c_out: int, n_blocks: int, use_attn: bool, dropout: float, attn_type: str) -> nn.Module:
    """One resolution level: `block[j]` then `attn[j]` (Identity where the level has no attention)."""
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(in_channels=c_in if j == 0 else c_out, out_channels=c_out, dropout=dropout)
        for j in range(n_blocks)
    )
    level.attn = nn.ModuleList(
        make_attn(c_out, attn_type) if use_attn else nn.Identity() for _ in range(n_blocks)
    )
    return level


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> [B, 2*z_channels (or z_channels), H/f, W/f]."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        c_in, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            level = _level(c_in, c_out, num_res_blocks, res in attn_resolutions, dropout, attn_type)
            if i == len(ch_mult) - 1:
                level.downsample = nn.Identity()
            else:
                level.downsample = Downsample(c_out, resamp_with_conv)
                res //= 2
            self.down.append(level)
            c_in = c_out

        self.mid = MidBlock(c_in, dropout, attn_type)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; one more resnet per level than the encoder."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(c_in, dropout, attn_type)

        # Built from the lowest resolution up, stored by level index (up[0] = full resolution).
        levels: list[nn.Module | None] = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            level = _level(c_in, c_out, num_res_blocks + 1, res in attn_resolutions, dropout, attn_type)
            if i == 0:
                level.upsample = nn.Identity()
            else:
                level.upsample = Upsample(c_out, resamp_with_conv)
                res *= 2
            levels[i] = level
            c_in = c_out
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
