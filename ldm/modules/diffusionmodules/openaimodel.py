"""The Stable Diffusion denoising UNet (SD 1.x and 2.x), in the released checkpoints' layout.

Shape of the network for channel_mult=[1, 2, 4, 4], num_res_blocks=2 (SD):

    input_blocks:  conv_in, then per level `num_res_blocks` x (ResBlock [+ SpatialTransformer])
                   and, except on the last level, a stride-2 Downsample
    middle_block:  ResBlock, SpatialTransformer, ResBlock
    output_blocks: per level (deepest first) `num_res_blocks + 1` x (ResBlock on the
                   concatenation with the matching input block's output [+ SpatialTransformer])
                   and, except on the first level, a 2x Upsample
    out:           GroupNorm, SiLU, conv to out_channels

Every input block's output is kept and consumed by exactly one output block (the
U-Net skip connections). Parameter names (time_embed.0, input_blocks.1.1.proj_in, ...)
are an external contract: released weights and other tools load them by name.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.nhwc import cat_channels, upsample_nearest2x
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip path.

    skip_connection is a 1x1 conv when the channel count changes, else the identity
    (and then has no parameters). in_layers and out_layers keep the released layout (norm, SiLU,
    [dropout,] conv); the forward calls the norm with its SiLU (GroupNorm32's `silu`): the Triton
    norm applies it in its own kernels, and the result is the Sequential's on every path.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_checkpoint: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W], emb: [B, emb_channels] -> [B, out_channels, H, W]
        norm, _, conv = self.in_layers
        h = conv(norm(x, silu=True))
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, _, dropout, conv = self.out_layers
        h = conv(dropout(norm(h, silu=True)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (`op`), or 2x2 average pooling without conv_resample."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv (`conv`) if use_conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest2x(x))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also get the timestep embedding, transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The SD 1.x / 2.x UNet: (noisy latents, timesteps, text context) -> eps or v prediction.

    Keys are those of the released `unet_config.params` (errors name them as such):

    in_channels, out_channels: latent channels in and out (4 for SD).
    model_channels: width of the first level (320); every width is a multiple of it
        and must be a multiple of 32 for the 32-group GroupNorms.
    attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get a
        SpatialTransformer after each ResBlock; SD uses [4, 2, 1].
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    channel_mult: per-level width multipliers; len(channel_mult) - 1 downsamplings,
        so latent H and W must be multiples of 2 ** (len(channel_mult) - 1).
    num_heads / num_head_channels: set one of them. num_heads fixes the head count
        on every level (SD 1.x: 8, head width grows with the level); num_head_channels
        fixes the head width (SD 2.x: 64, head count grows). If both are set,
        num_head_channels wins.
    use_spatial_transformer: must be true (every SD UNet uses cross-attention).
    transformer_depth: BasicTransformerBlocks per SpatialTransformer.
    context_dim: width of the text encoder's hidden states (768 SD 1.x, 1024 SD 2.x).
    use_checkpoint: recompute ResBlock and transformer-block activations in backward
        to save memory (only while gradients are recorded).
    legacy: accepted for released configs; with spatial transformers both values
        give the same head split, so it changes nothing.
    use_linear_in_transformer: proj_in/proj_out are nn.Linear (SD 2.x) instead of
        1x1 convolutions (SD 1.x).
    dropout: dropout inside ResBlocks (the transformers use none, as in SD).
    conv_resample: convolutions in Downsample/Upsample (true in every SD config).
    dims: must be 2.
    image_size: unused (any latent size with sides divisible by 2 ** (len(channel_mult) - 1)
        works, i.e. multiples of 8 for SD).
    use_fp16: ignored; precision comes from the trainer's autocast setting.
    """

    def __init__(self, in_channels: int, out_channels: int, model_channels: int,
                 attention_resolutions: Sequence[int], num_res_blocks: int, context_dim: int,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), num_heads: int = -1,
                 num_head_channels: int = -1, use_spatial_transformer: bool = True,
                 transformer_depth: int = 1, use_checkpoint: bool = False, legacy: bool = False,
                 use_linear_in_transformer: bool = False, dropout: float = 0.0,
                 conv_resample: bool = True, dims: int = 2, image_size: Optional[int] = None,
                 use_fp16: bool = False):
        super().__init__()
        where = "unet_config.params"
        if dims != 2:
            raise ValueError(f"{where}.dims: only 2-D UNets are supported, got {dims}")
        if not use_spatial_transformer:
            raise ValueError(f"{where}.use_spatial_transformer: must be true (the SD UNet's "
                             f"attention is the cross-attention SpatialTransformer)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError(f"{where}: set num_heads or num_head_channels")
        if model_channels % 32:
            raise ValueError(f"{where}.model_channels: must be a multiple of 32 (GroupNorm groups), "
                             f"got {model_channels}")
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)

        def transformer(ch: int) -> SpatialTransformer:
            # SD 2.x fixes the head width, SD 1.x the head count.
            key, value = (("num_head_channels", num_head_channels) if num_head_channels != -1
                          else ("num_heads", num_heads))
            if value <= 0 or ch % value:
                raise ValueError(f"{where}.{key}={value}: a level with {ch} channels cannot be split "
                                 f"into equal attention heads")
            heads = ch // num_head_channels if key == "num_head_channels" else num_heads
            return SpatialTransformer(ch, heads, ch // heads, context_dim, depth=transformer_depth,
                                      use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, use_checkpoint)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim))

        # Down path; skip_chans records each input block's output width for the up path.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        ch, ds = model_channels, 1
        skip_chans = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch), resblock(ch, ch))

        # Up path: each block eats one skip (last in, first out) and ends a level with an Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W], timesteps: [B], context: [B, L, context_dim]
        -> [B, out_channels, H, W]."""
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UNetModel: latent size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {factor} "
                f"(2 ** (len(unet_config.params.channel_mult) - 1)); pick image sizes / aspect "
                f"buckets whose sides are multiples of {factor} * the autoencoder's downscale factor")
        t_emb = timestep_embedding(timesteps, self.model_channels)  # [B, mc] float32
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # [B, 4*mc]

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(cat_channels(h, skips.pop()), emb, context)
        norm, _, conv = self.out  # norm and SiLU as in ResBlock
        return conv(norm(h, silu=True))
