"""The DDPM noise schedule and training targets, as pure tensor functions.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):
    beta_t                 noise added at step t
    alpha_t = 1 - beta_t
    abar_t  = prod_{s<=t} alpha_s          ("alphas_cumprod")
    x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps          (q_sample)
    v_t     = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0          (v-prediction target)
    SNR_t   = abar_t / (1 - abar_t)                             (signal-to-noise ratio)

`schedule_buffers` returns the twelve tensors Stable Diffusion checkpoints carry,
under their CompVis names, computed in float64 and stored as float32.
"""
from __future__ import annotations

import torch

BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(kind: str, timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """Betas in float64. SD's "linear" is linear in sqrt(beta) ("scaled linear" in diffusers)."""
    if kind == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    raise ValueError(f"beta_schedule: unknown schedule {kind!r} (expected 'linear' or 'sqrt_linear')")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas [T] rescaled so that SNR_{T-1} = 0 (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1), in float64.

    sqrt(abar) is shifted so its last value is 0 and scaled so its first is unchanged:
        sqrt(abar)' = (sqrt(abar) - sqrt(abar_{T-1})) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1}))
    then betas are read back from abar' (the last beta becomes 1). The last step's x_t is
    then pure noise, as at sampling time; with eps-prediction x_0 cannot be recovered there,
    which is why the paper pairs it with v-prediction.
    """
    sqrt_abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """All CompVis schedule buffers for `betas` [T] (float64 in, float32 out)."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    out = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - abar).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # the first posterior variance is 0; clip before the log, as the original does
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
    }
    return {name: out[name].to(torch.float32) for name in BUFFER_NAMES}


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] reshaped to [B, 1, 1, ...] so it broadcasts over an ndim-dimensional batch."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for timesteps t [B] -> [B] (0 at a zero-terminal-SNR last step)."""
    abar = alphas_cumprod.gather(0, t)
    return abar / (1.0 - abar)


def q_sample(sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return extract(sqrt_abar, t, x0.ndim) * x0 + extract(sqrt_one_minus_abar, t, x0.ndim) * noise


def v_target(sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v_t = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    return extract(sqrt_abar, t, x0.ndim) * noise - extract(sqrt_one_minus_abar, t, x0.ndim) * x0
