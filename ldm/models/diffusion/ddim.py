"""DDIM sampling (Song et al. 2021) with classifier-free guidance (Ho & Salimans 2022).

Notation as in schedule.py: abar_t = alphas_cumprod[t], x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

One step from timestep t to the previous timestep s of the subsequence:

    x0_hat  = the model's estimate of x_0          eps_hat = its estimate of eps
    sigma   = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
    x_s     = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,   z ~ N(0, I)

eta = 0 is the deterministic DDIM sampler, eta = 1 the ancestral DDPM one.

Timesteps: `steps` of the model's T training timesteps, uniformly spaced with stride
c = T // steps and offset +1 ("leading" spacing, as Stable Diffusion's reference sampler):
[1, 1 + c, ..., 1 + (steps - 1) c]; T = 1000, steps = 40 gives 1, 26, ..., 976. The final
step goes to abar = 1, i.e. returns x0_hat itself (the reference sampler stops at abar_0,
which adds sqrt(1 - abar_0) ~ 3% of eps_hat back).

All noise comes from a CPU torch.Generator and is then moved to the model's device, so a
seed gives the same image on any device, and the global RNG is never drawn from.
"""
from __future__ import annotations

import torch
from torch import nn


def ddim_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """The sampled timesteps in ascending order [steps] (long): 1, 1 + c, ..., c = T // steps."""
    if not isinstance(steps, int) or not 1 <= steps < num_timesteps:
        raise ValueError(f"DDIM steps must be an integer in [1, {num_timesteps - 1}] "
                         f"(the model has {num_timesteps} timesteps), got {steps!r}")
    stride = num_timesteps // steps
    return torch.arange(steps, dtype=torch.long) * stride + 1


def x0_and_eps(out: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor,
               parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model output at x_t -> (x0_hat, eps_hat). abar_t broadcasts against x_t."""
    sqrt_a, sqrt_1ma = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    if parameterization == "eps":
        eps = out
        x0 = (x_t - sqrt_1ma * eps) / sqrt_a
    elif parameterization == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x_0
        x0 = sqrt_a * x_t - sqrt_1ma * out
        eps = sqrt_a * out + sqrt_1ma * x_t
    else:
        raise ValueError(f"model.params.parameterization: expected 'eps' or 'v', got {parameterization!r}")
    return x0, eps


class DDIMSampler:
    """Samples latents from a LatentDiffusion-like model.

    The model needs `alphas_cumprod` [T], `num_timesteps`, `parameterization` and
    `apply_model(x_t, t, context)`. Call it under torch.no_grad() (and the model's
    ema_scope() to sample with the EMA weights).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def guided_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """Model output with classifier-free guidance, cond and uncond in one batched call:

            out = out_uncond + guidance_scale * (out_cond - out_uncond)

        The output is linear in eps (and in v) for a fixed x_t, so guiding it is the same as
        guiding eps_hat. x [B,C,h,w] float32; cond, uncond [B,77,D]; returns float32.
        """
        x_in = x.to(cond.dtype)
        if uncond is None:
            return self.model.apply_model(x_in, t, cond).float()
        out = self.model.apply_model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond]))
        out_uncond, out_cond = out.float().chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    @staticmethod
    def start(cond: torch.Tensor, uncond: torch.Tensor | None, shape: tuple[int, ...],
              generator: torch.Generator | None, x_T: torch.Tensor | None,
              name: str) -> tuple[torch.Tensor | None, torch.Generator, torch.Tensor]:
        """What every sampler starts from: uncond broadcast to cond's batch, the generator (a
        fresh one seeded from system entropy if none, never the global RNG), and x_T (drawn
        from it on the CPU unless given) as float32 on cond's device. `name` leads errors."""
        if cond.shape[0] != shape[0]:
            raise ValueError(f"{name}: cond has batch size {cond.shape[0]} but shape asks for {shape[0]}")
        if uncond is not None:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:]).to(cond)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        if x_T is None:
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
        return uncond, generator, x_T.to(device=cond.device, dtype=torch.float32)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None, shape: tuple[int, ...] | torch.Size,
               steps: int = 40, guidance_scale: float = 7.5, eta: float = 0.0,
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Draw z_0 [B,C,h,w] (float32) for contexts `cond` [B,77,D].

        uncond: the negative/empty-prompt context, [B,77,D] or [1,77,D]; None samples from the
        conditional model alone (no guidance). shape: the full latent shape (B, C, h, w).
        generator: a CPU generator for x_T and the eta noise; without one, a fresh generator
        seeded from system entropy. x_T: the starting noise, instead of drawing it.
        """
        shape = tuple(shape)
        uncond, generator, x = self.start(cond, uncond, shape, generator, x_T, "DDIM")
        device = cond.device

        def noise() -> torch.Tensor:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

        abar = self.model.alphas_cumprod.to(device=device, dtype=torch.float64)
        timesteps = ddim_timesteps(self.model.num_timesteps, steps).tolist()
        for i in reversed(range(len(timesteps))):
            t = timesteps[i]
            abar_t = abar[t].float()
            abar_s = abar[timesteps[i - 1]].float() if i > 0 else abar.new_ones(()).float()

            out = self.guided_output(x, torch.full((shape[0],), t, device=device, dtype=torch.long),
                                     cond, uncond, guidance_scale)
            x0, eps = x0_and_eps(out, x, abar_t, self.model.parameterization)

            sigma = eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()
            x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i > 0:
                x = x + sigma * noise()
        return x
