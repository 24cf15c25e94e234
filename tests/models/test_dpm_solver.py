import math

import pytest
import torch

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import DDIMSampler, ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.txt2img import sampler_name
from tests.models.test_ddim import SHAPE, T, FakeDenoiser, contexts


class GaussianData(torch.nn.Module):
    """The exact eps-prediction for data x_0 ~ N(mu, std^2) per element: for it the
    probability-flow ODE has a closed-form solution, to measure a sampler's error against."""

    def __init__(self, mu: float, std: float):
        super().__init__()
        betas = schedule.make_beta_schedule("linear", T, 0.00085, 0.0120)
        self.register_buffer("alphas_cumprod", schedule.schedule_buffers(betas)["alphas_cumprod"])
        self.num_timesteps, self.parameterization = T, "eps"
        self.mu, self.var = mu, std**2

    def eps(self, x_t, t):
        a = self.alphas_cumprod.double()[t]
        return (1 - a).sqrt() * (x_t.double() - a.sqrt() * self.mu) / (a * self.var + 1 - a)

    def apply_model(self, x_t, t, context):
        return self.eps(x_t, t[:, None, None, None]).float()

    def solution(self, x_T, t_T):
        """What a perfect solver returns from x_T at t_T: the ODE's x_1 (the flow keeps
        (x_t - sqrt(abar) mu) / sqrt(abar var + 1 - abar)), then x0_hat there, as the
        samplers' last step does."""
        a0, a1 = self.alphas_cumprod.double()[t_T], self.alphas_cumprod.double()[1]
        x_1 = a1.sqrt() * self.mu + (a1 * self.var + 1 - a1).sqrt() * (x_T.double() - a0.sqrt() * self.mu) \
            / (a0 * self.var + 1 - a0).sqrt()
        return (x_1 - (1 - a1).sqrt() * self.eps(x_1, 1)) / a1.sqrt()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_oracle_denoiser_recovers_x0_in_one_call_per_step(parameterization):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = FakeDenoiser(x0, parameterization)
    cond, _ = contexts(0.0, 0.0)
    z = DPMSolverSampler(model).sample(cond, None, SHAPE, steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, x0, atol=1e-4, rtol=1e-4)
    assert model.calls == [2] * 5


def test_guidance_extrapolates_from_uncond_to_cond_in_one_batched_call():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = FakeDenoiser(x0)
    cond, uncond = contexts(0.2, -0.1)
    z = DPMSolverSampler(model).sample(cond, uncond, SHAPE, steps=3, guidance_scale=7.5,
                                       generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, x0 + (-0.1) + 7.5 * (0.2 - (-0.1)), atol=1e-3, rtol=1e-4)
    assert model.calls == [4, 4, 4]


@pytest.mark.parametrize("mu, std", [(0.0, 0.5), (1.0, 1.0), (0.3, 2.0)])
def test_second_order_where_ddim_is_first_order(mu, std):
    """Error against the exact solution: from 40 to 200 steps DDIM's falls ~5x (order 1),
    DPM-Solver++(2M)'s ~15-16x (order ~1.7: the first step and the last are first order)."""
    model = GaussianData(mu, std)
    cond = torch.zeros(SHAPE[0], 77, 16)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def error(sampler, steps):
        exact = model.solution(x_T, int(ddim_timesteps(T, steps)[-1]))
        return (sampler(model).sample(cond, None, SHAPE, steps=steps, x_T=x_T) - exact).abs().max().item()

    ddim, dpm = [{n: error(s, n) for n in (20, 40, 200)} for s in (DDIMSampler, DPMSolverSampler)]
    order = {name: math.log(e[40] / e[200]) / math.log(5) for name, e in (("ddim", ddim), ("dpm", dpm))}
    assert order["ddim"] < 1.1 and order["dpm"] > 1.5
    assert all(dpm[n] < ddim[n] for n in ddim)


def test_seeded_noise_and_the_global_rng_untouched():
    model = FakeDenoiser(torch.zeros(SHAPE), oracle=False)
    cond, uncond = contexts(0.2, -0.1)
    sampler = DPMSolverSampler(model)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sampler.sample(cond, uncond, SHAPE, steps=4, generator=torch.Generator().manual_seed(7))
    b = sampler.sample(cond, uncond, SHAPE, steps=4, x_T=torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)))
    c = sampler.sample(cond, uncond, SHAPE, steps=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_batch_size_mismatch_is_named():
    cond, uncond = contexts(0.0, 0.0, batch=3)
    with pytest.raises(ValueError, match="DPM-Solver\\+\\+: cond has batch size 3"):
        DPMSolverSampler(FakeDenoiser(torch.zeros(SHAPE))).sample(cond, uncond, SHAPE, steps=2)


def test_sampler_names():
    assert sampler_name("ddim") == "ddim" and sampler_name("dpmsolver++") == "dpmpp_2m"
    with pytest.raises(ValueError, match=r"unknown sampler 'k_euler' \(known: ddim, dpmpp_2m, dpmsolver\+\+"):
        sampler_name("k_euler")
