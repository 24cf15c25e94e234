"""The training objective's options: noise variants, timestep range, loss type and weighting.

Notation as in schedule.py; shapes: z_0, eps, pred, target [B,C,H,W], t [B], per-sample values [B].

Each option follows kohya sd-scripts' definition (`library/custom_train_functions.py`,
`train_util.get_noise_noisy_latents_and_timesteps`, `train_util.conditional_loss`):

    offset noise        eps <- eps + offset * n,  n ~ N(0, 1) of shape [B,C,1,1]
                        (Guttenberg 2023, "Diffusion with offset noise"); with random strength
                        offset <- offset * u, u ~ U[0,1), one u per batch
    multi-res noise     eps <- eps + sum_{i<k} discount^i * up(n_i),  n_i ~ N(0,1) at (H,W) / r_i^i,
                        r_i ~ U[2,4); then eps <- eps / std(eps)     (Whitaker 2023, "pyramid noise")
    input perturbation  x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) (eps + gamma * n), the target
                        keeps eps                                  (Ning et al. 2023)
    timestep range      t ~ U{min_timestep, ..., max_timestep - 1}
    loss type           l2: d^2   l1: |d|   huber: 2c (sqrt(d^2 + c^2) - c)   smooth_l1: 2 (sqrt(d^2 + c^2) - c)
                        with d = pred - target, averaged over C,H,W
    min-SNR-gamma       w_t = min(SNR_t, gamma) / SNR_t (eps), min(SNR_t, gamma) / (SNR_t + 1) (v)
                        (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting")

The noise functions draw from the `generator` they are given (the model's saved noise stream).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


# ---- noise ----------------------------------------------------------------------------
def offset_noise(noise: torch.Tensor, offset: float, random_strength: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """eps + offset * n with n ~ N(0, 1) per sample and channel [B,C,1,1]: shifts each channel's mean."""
    B, C = noise.shape[:2]
    strength: float | torch.Tensor = offset
    if random_strength:  # kohya: one U[0,1) draw for the whole batch
        strength = offset * torch.rand(1, generator=generator, device=noise.device, dtype=noise.dtype)
    n = torch.randn((B, C, 1, 1), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * n


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None,
                  ratio_generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: eps plus upsampled noise of ever lower resolution, rescaled to unit std.

    Level i (i = 0 .. iterations-1) draws n_i ~ N(0, 1) at (H, W) / r_i^i with r_i ~ U[2, 4)
    (sides floored, at least 1), upsamples it bilinearly to (H, W) and adds discount^i of it;
    level 0 is a second full-resolution draw. The levels stop after the first one that is 1
    pixel high or wide. The sum is divided by its std over the whole batch (as kohya does).
    Computed in float32, returned in eps's dtype. The ratios set tensor sizes, so they are
    needed on the host: `ratio_generator` (a CPU generator) draws them there without reading
    anything back from the GPU; without it they come from `generator`.
    """
    B, C, H, W = noise.shape
    if ratio_generator is not None:
        ratios = (2 + 2 * torch.rand(iterations, generator=ratio_generator, dtype=torch.float64)).tolist()
    else:
        draws = torch.rand(iterations, generator=generator, device=noise.device, dtype=torch.float64)
        ratios = (2 + 2 * draws).tolist()
    out = noise.float()
    for i, r in enumerate(ratios):
        h, w = max(1, int(H / r**i)), max(1, int(W / r**i))
        n = torch.randn((B, C, h, w), generator=generator, device=noise.device, dtype=torch.float32)
        out = out + F.interpolate(n, size=(H, W), mode="bilinear", align_corners=False) * discount**i
        if h == 1 or w == 1:
            break
    return (out / out.std()).to(noise.dtype)


def perturbed_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps + gamma * n, n ~ N(0, I): the noise that makes x_t under input perturbation."""
    n = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * n


# ---- loss -----------------------------------------------------------------------------
def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float = 0.1) -> torch.Tensor:
    """Elementwise loss of pred - target, averaged over every dimension but the batch: [B]."""
    dims = tuple(range(1, pred.ndim))
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none").mean(dim=dims)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none").mean(dim=dims)
    pseudo_huber = torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c  # ~ d^2 / 2c near 0, ~ |d| far
    if loss_type == "huber":
        return (2 * huber_c * pseudo_huber).mean(dim=dims)
    if loss_type == "smooth_l1":
        return (2 * pseudo_huber).mean(dim=dims)
    raise ValueError(f"model.params.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Per-sample weight [B] from SNR_t [B]: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v.

    For eps it is written as min(gamma / SNR, 1), which is 1 (its limit) at SNR = 0, the last
    step of a zero-terminal-SNR schedule, where the quotient itself is 0/0.
    """
    if parameterization == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    return (gamma / snr).clamp(max=1.0)


# ---- the options, checked -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective's options as given in model.params (validated against the schedule's T)."""

    num_timesteps: int = 1000
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    min_snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None  # None: num_timesteps
    loss_type: str = "l2"
    huber_c: float = 0.1

    def __post_init__(self) -> None:
        key = "model.params."
        T = self.num_timesteps
        if self.max_timestep is None:
            object.__setattr__(self, "max_timestep", T)

        def number(name: str, ok: Callable[[float], bool], expected: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{key}{name}: expected {expected}, got {value!r}")

        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{key}{name}: expected an integer in [{lo}, {hi}], got {value!r}")

        for name in ("noise_offset_random_strength", "zero_terminal_snr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{key}{name}: expected true or false, got {getattr(self, name)!r}")
        number("noise_offset", lambda x: x >= 0, "a number >= 0 (0 = off; 0.05-0.1 is usual)")
        if self.noise_offset_random_strength and not self.noise_offset:
            raise ValueError(f"{key}noise_offset_random_strength: scales noise_offset, which is 0 (off); "
                             f"set noise_offset too")
        integer("multires_noise_iterations", 0, 100)
        number("multires_noise_discount", lambda x: 0 < x <= 1, "a number in (0, 1]")
        number("ip_noise_gamma", lambda x: x >= 0, "a number >= 0 (0 = off; 0.1 is usual)")
        if self.min_snr_gamma is not None:
            number("min_snr_gamma", lambda x: x > 0, "a number > 0 (5 is usual) or null (off)")
        integer("min_timestep", 0, T - 1)
        integer("max_timestep", self.min_timestep + 1, T)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"{key}loss_type: expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        number("huber_c", lambda x: x > 0, "a number > 0")
        for name in ("noise_offset", "multires_noise_discount", "ip_noise_gamma", "huber_c", "min_snr_gamma"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def full_timestep_range(self) -> bool:
        return (self.min_timestep, self.max_timestep) == (0, self.num_timesteps)

    def kohya_fields(self) -> dict[str, str]:
        """The keys kohya's train_network.py writes for these options, with the strings it writes
        for the equivalent command line (`str(value)`; "None" for an option not given). kohya
        records the timestep range only as ModelSpec's `modelspec.timestep_range`, and only
        when it is not the full range; its Huber parameter is constant here (kohya's default
        schedule is "snr", hence `ss_huber_schedule`)."""
        def given(value: float | int | None) -> str:
            return str(value) if value else "None"

        fields = {
            "ss_noise_offset": given(self.noise_offset),
            "ss_noise_offset_random_strength": str(bool(self.noise_offset_random_strength)),
            "ss_multires_noise_iterations": given(self.multires_noise_iterations),
            "ss_multires_noise_discount": str(self.multires_noise_discount),
            "ss_ip_noise_gamma": given(self.ip_noise_gamma),
            "ss_min_snr_gamma": str(self.min_snr_gamma),
            "ss_zero_terminal_snr": str(bool(self.zero_terminal_snr)),
            "ss_loss_type": self.loss_type,
            "ss_huber_schedule": "constant",
            "ss_huber_c": str(self.huber_c),
        }
        if not self.full_timestep_range:
            fields["modelspec.timestep_range"] = f"{self.min_timestep},{self.max_timestep}"
        return fields
