import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.models.diffusion import schedule
from ldm.models.diffusion.ddim import DDIMSampler, ddim_timesteps, x0_and_eps
from ldm.util import instantiate_from_config

T = 1000
SHAPE = (2, 4, 8, 8)


class FakeDenoiser(nn.Module):
    """Knows x_0. For x_t it returns the exact eps (or v) that would have produced x_t from
    x_0 + shift(context), shift = the context's mean, so guidance has an exact expected result.
    With oracle=False it returns a noise-dependent guess instead."""

    def __init__(self, x0: torch.Tensor, parameterization: str = "eps", oracle: bool = True):
        super().__init__()
        betas = schedule.make_beta_schedule("linear", T, 0.00085, 0.0120)
        self.register_buffer("alphas_cumprod", schedule.schedule_buffers(betas)["alphas_cumprod"])
        self.num_timesteps = T
        self.parameterization = parameterization
        self.x0, self.oracle = x0, oracle
        self.calls: list[int] = []

    def apply_model(self, x_t, t, context):
        self.calls.append(x_t.shape[0])
        if not self.oracle:
            return 0.5 * x_t + context.mean(dim=(1, 2))[:, None, None, None]
        a = self.alphas_cumprod[t].double()[:, None, None, None]
        x0 = self.x0.double().repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1)  # [uncond; cond] halves
        x0 = x0 + context.double().mean(dim=(1, 2))[:, None, None, None]
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()


def contexts(shift_c: float, shift_u: float, batch: int = SHAPE[0]):
    return torch.full((batch, 77, 16), shift_c), torch.full((batch, 77, 16), shift_u)


def test_timesteps_are_uniform_leading_with_offset_one():
    ts = ddim_timesteps(T, 40)
    assert ts.dtype == torch.long and len(ts) == 40
    assert ts[0] == 1 and ts[-1] == 976
    assert torch.all(ts.diff() == 25)
    ts = ddim_timesteps(T, 30)  # 1000 is not a multiple of 30: still exactly 30 steps, stride 33
    assert len(ts) == 30 and torch.all(ts.diff() == 33) and ts[-1] == 1 + 29 * 33
    assert ddim_timesteps(T, 999)[-1] == 999 and ddim_timesteps(T, 1).tolist() == [1]
    for bad in (0, T, 2.5):
        with pytest.raises(ValueError, match="DDIM steps"):
            ddim_timesteps(T, bad)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_x0_and_eps_invert_the_forward_process(parameterization):
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = torch.tensor(0.3)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = eps if parameterization == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    x0_hat, eps_hat = x0_and_eps(out, x_t, abar, parameterization)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_denoiser_recovers_x0(parameterization, eta):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = FakeDenoiser(x0, parameterization)
    cond, _ = contexts(0.0, 0.0)
    z = DDIMSampler(model).sample(cond, None, SHAPE, steps=4, eta=eta, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, x0, atol=1e-4, rtol=1e-4)
    assert model.calls == [2, 2, 2, 2]


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_guidance_extrapolates_from_uncond_to_cond_in_one_batched_call(parameterization):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = FakeDenoiser(x0, parameterization)
    cond, uncond = contexts(0.2, -0.1)
    z = DDIMSampler(model).sample(cond, uncond, SHAPE, steps=3, guidance_scale=7.5,
                                  generator=torch.Generator().manual_seed(1))
    expected = x0 + (-0.1) + 7.5 * (0.2 - (-0.1))
    torch.testing.assert_close(z, expected, atol=1e-3, rtol=1e-4)
    assert model.calls == [4, 4, 4]  # [uncond; cond] batched: one model call per step


def test_guidance_scale_one_equals_cond_only_and_uncond_broadcasts():
    model = FakeDenoiser(torch.zeros(SHAPE), oracle=False)
    cond, uncond = contexts(0.2, -0.1)
    sampler = DDIMSampler(model)
    kw = dict(steps=5, eta=0.5)
    cond_only = sampler.sample(cond, None, SHAPE, guidance_scale=7.5, generator=torch.Generator().manual_seed(3), **kw)
    scale_one = sampler.sample(cond, uncond[:1], SHAPE, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(scale_one, cond_only, atol=1e-5, rtol=1e-5)
    guided = sampler.sample(cond, uncond[:1], SHAPE, guidance_scale=7.5,
                            generator=torch.Generator().manual_seed(3), **kw)
    assert (guided - cond_only).abs().max() > 1e-2


def test_seeds_are_reproducible_and_the_global_rng_untouched():
    model = FakeDenoiser(torch.zeros(SHAPE), oracle=False)
    cond, uncond = contexts(0.2, -0.1)
    sampler = DDIMSampler(model)

    def run(seed=None):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return sampler.sample(cond, uncond, SHAPE, steps=4, eta=0.5, generator=g)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b, c = run(7), run(7), run(8)
    unseeded_1, unseeded_2 = run(), run()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(unseeded_1, unseeded_2)


def test_noise_is_drawn_on_cpu_from_the_generator():
    model = FakeDenoiser(torch.zeros(SHAPE), oracle=False)
    cond, uncond = contexts(0.2, -0.1)
    sampler = DDIMSampler(model)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    from_seed = sampler.sample(cond, uncond, SHAPE, steps=3, generator=torch.Generator().manual_seed(5))
    from_x_T = sampler.sample(cond, uncond, SHAPE, steps=3, x_T=x_T)
    assert torch.equal(from_seed, from_x_T)


def test_batch_size_mismatch_is_named():
    model = FakeDenoiser(torch.zeros(SHAPE))
    cond, uncond = contexts(0.0, 0.0, batch=3)
    with pytest.raises(ValueError, match="batch size 3"):
        DDIMSampler(model).sample(cond, uncond, SHAPE, steps=2)


def test_tiny_latent_diffusion_samples_and_decodes():
    cfg = OmegaConf.load("tests/configs/tiny.yaml").model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model").eval()
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red square", "a blue circle"])
        uncond = model.get_learned_conditioning([""])
        shape = (2, model.channels, 8, 12)  # non-square latent
        z = DDIMSampler(model).sample(cond, uncond, shape, steps=2, generator=torch.Generator().manual_seed(0))
        again = DDIMSampler(model).sample(cond, uncond, shape, steps=2, generator=torch.Generator().manual_seed(0))
        image = model.decode_first_stage(z)
    assert z.shape == shape and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert torch.equal(z, again)
    assert image.shape == (2, 3, 32, 48)
