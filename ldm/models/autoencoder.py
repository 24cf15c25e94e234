"""AutoencoderKL: Stable Diffusion's first stage, mapping images to latents and back.

    x [B, 3, H, W] in [-1, 1] --encoder, quant_conv--> q(z|x) over z [B, embed_dim, H/f, W/f]
    z --post_quant_conv, decoder--> x_rec [B, 3, H, W]

State-dict keys match released SD checkpoints (`first_stage_model.` prefix in the full model):
encoder.*, decoder.*, quant_conv.*, post_quant_conv.*.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def split_ddconfig(ddconfig: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check ddconfig's keys against Encoder's and Decoder's keyword arguments; return each one's share."""
    enc_params = inspect.signature(Encoder).parameters
    dec_params = inspect.signature(Decoder).parameters
    accepted = set(enc_params) | set(dec_params)
    unknown = sorted(set(ddconfig) - accepted)
    if unknown:
        raise ValueError(
            f"{', '.join('ddconfig.' + k for k in unknown)}: unknown key(s); "
            f"ddconfig accepts {', '.join(sorted(accepted))}"
        )
    required = {k for params in (enc_params, dec_params)
                for k, p in params.items() if p.default is inspect.Parameter.empty}
    missing = sorted(required - set(ddconfig))
    if missing:
        raise ValueError(f"{', '.join('ddconfig.' + k for k in missing)}: missing required key(s)")
    return ({k: v for k, v in ddconfig.items() if k in enc_params},
            {k: v for k, v in ddconfig.items() if k in dec_params})


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. `lossconfig` and `monitor` are accepted because released
    YAMLs carry them; with no lossconfig (or torch.nn.Identity) it adds no state-dict keys."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any] | None = None,
        monitor: str | None = None,
        image_key: str = "image",
        ckpt_path: str | None = None,
    ):
        super().__init__()
        encoder_kwargs, decoder_kwargs = split_ddconfig(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("ddconfig.double_z: must be true; the encoder has to predict a mean and a log-variance")
        self.encoder = Encoder(**encoder_kwargs)
        self.decoder = Decoder(**decoder_kwargs)
        if lossconfig is None:
            self.loss = nn.Identity()
        else:
            self.loss = instantiate_from_config(lossconfig, path="lossconfig")
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.image_key = image_key
        self.monitor = monitor
        if ckpt_path is not None:
            self.load_weights(ckpt_path)

    def load_weights(self, path: str) -> None:
        """Weights from a file holding this VAE: its own keys, or the `first_stage_model.*`
        keys of a full SD checkpoint or of an autoencoder training run (CompVis `ckpt_path`)."""
        from ldm.checkpoint import CheckpointError, load_state_dict

        state = load_state_dict(path)
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        wrong = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or wrong:
            raise CheckpointError(f"first_stage_config.params.ckpt_path {path}: not this autoencoder's weights ("
                                  + "; ".join(([f"missing {len(missing)} key(s), e.g. {missing[0]}"] if missing else [])
                                              + wrong[:3]) + ")")
        self.load_state_dict({k: state[k] for k in own})

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x [B, 3, H, W] in [-1, 1] -> posterior over z [B, embed_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(x))  # [B, 2*embed_dim, H/f, W/f]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] -> image [B, 3, h*f, w*f] (roughly in [-1, 1], not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
