"""The autoencoder's posterior q(z|x): a Gaussian with diagonal covariance over latents."""
from __future__ import annotations

import math
from typing import Sequence

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) built from encoder moments [B, 2*C, h, w] (mean first, then logvar).

    Works in the dtype of the moments; `kl` and `nll` sum over all non-batch dims -> [B].
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # each [B, C, h, w]
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I); `generator` must live on the moments' device."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch item; `other=None` is the standard normal N(0, I)."""
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mean, var), summed over `dims`."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, dim=list(dims)
        )
