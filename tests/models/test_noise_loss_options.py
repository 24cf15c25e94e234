"""The objective's options (model.params): each at its neutral value changes nothing, bitwise;
each on does what its definition says, checked against a formula written out here. Through
main.py with all of them on: test_noise_loss_options_runs.py."""
from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from ldm import checkpoint as ckpt_io
from ldm.models.diffusion import losses, schedule
from tiny_objective import build, stream

NEUTRAL = dict(noise_offset=0.0, noise_offset_random_strength=False, multires_noise_iterations=0,
               multires_noise_discount=0.3, ip_noise_gamma=0.0, min_snr_gamma=None, zero_terminal_snr=False,
               min_timestep=0, max_timestep=1000, loss_type="l2", huber_c=0.1)


def latents(b=2, seed=0):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def batch(b=2):
    return {"latent": latents(b), "caption": ["a red circle", "a blue square", "a dot", "a line"][:b]}


def sd_abar(T=1000, start=0.00085, end=0.0120):
    """alphas_cumprod of SD's schedule in plain Python floats."""
    out, abar = [], 1.0
    for i in range(T):
        beta = (start**0.5 + (end**0.5 - start**0.5) * i / (T - 1)) ** 2
        abar *= 1 - beta
        out.append(abar)
    return out


def plain_shared_step(model, b, g):
    """The training step before these options existed, verbatim."""
    z0, context = b["latent"], model.get_learned_conditioning(b["caption"])
    t = torch.randint(0, model.num_timesteps, (z0.shape[0],), device=z0.device, generator=g)
    noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=g)
    pred = model.apply_model(model.q_sample(z0, t, noise), t, context)
    loss = F.mse_loss(pred.float(), model.target(z0, t, noise).float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean()


def recording(model, out=lambda x_t: 0.5 * x_t):
    """Replace the UNet by `out` and record what it is called with."""
    calls = []

    def apply_model(x_t, t, context):
        calls.append((x_t, t))
        return out(x_t)

    model.apply_model = apply_model
    return calls


# ---- neutral values: bitwise what it was ---------------------------------------------------
@pytest.mark.parametrize("params", [{}, NEUTRAL], ids=["defaults", "explicit-neutral"])
def test_neutral_options_give_bitwise_the_plain_objective(params):
    model = build(**params)
    plain = build()
    b = batch()
    model.noise_rng, g = stream(), stream()
    with torch.no_grad():
        assert torch.equal(model.shared_step(b), plain_shared_step(plain, b, g))
    assert torch.equal(model.noise_rng.get_state(), g.get_state())  # no extra draws from the stream
    assert torch.equal(model.alphas_cumprod, plain.alphas_cumprod)
    assert model.kohya_fields() == plain.kohya_fields()


def test_neutral_options_keep_the_validation_loss_bitwise():
    model, plain = build(**NEUTRAL), build()
    b = {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1,
         "caption": ["a", "b"], "path": ["x/1.png", "x/2.png"]}
    z0 = plain.first_stage_model.encode(b["image"]).mode() * plain.scale_factor
    gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in b["path"]]
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens])
    context = plain.get_learned_conditioning(b["caption"])
    pred = plain.apply_model(plain.q_sample(z0, t, noise), t, context)
    expected = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    with torch.no_grad():
        assert torch.equal(model.fixed_noise_loss(b), expected)


def test_every_option_draws_from_the_noise_stream_only():
    model = build(noise_offset=0.06, noise_offset_random_strength=True, multires_noise_iterations=6,
                  ip_noise_gamma=0.1, min_timestep=10, max_timestep=990)
    z0 = latents(2)
    global_state = torch.get_rng_state()
    model.noise_rng = stream()
    first = model.training_noise(z0)
    model.noise_rng = stream()
    again = model.training_noise(z0)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---- 1. noise offset ----------------------------------------------------------------------
def test_noise_offset_adds_one_normal_draw_per_sample_and_channel():
    model = build(noise_offset=0.06)
    z0 = latents(3)
    model.noise_rng, g = stream(), stream()
    t, noise, input_noise = model.training_noise(z0)
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=g))  # timesteps as before
    eps = torch.randn(z0.shape, generator=g)
    n = torch.randn(3, 4, 1, 1, generator=g)
    assert torch.allclose(noise, eps + 0.06 * n, atol=0, rtol=1e-6)
    assert input_noise is noise  # x_t and the target share it
    shift = noise - eps
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-7)  # constant over H, W


def test_noise_offset_random_strength_scales_the_offset_by_one_uniform_draw():
    model = build(noise_offset=0.1, noise_offset_random_strength=True)
    z0 = latents(2)
    model.noise_rng, g = stream(5), stream(5)
    _, noise, _ = model.training_noise(z0)
    torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    u = torch.rand(1, generator=g).item()
    n = torch.randn(2, 4, 1, 1, generator=g)
    assert 0 <= u < 1
    assert torch.allclose(noise, eps + 0.1 * u * n, atol=1e-7)


# ---- 2. multi-resolution noise -------------------------------------------------------------
def pyramid_by_hand(eps, iterations, discount, g):
    B, C, H, W = eps.shape
    ratios = [2 + 2 * r for r in torch.rand(iterations, generator=g, dtype=torch.float64).tolist()]
    total = eps.clone()
    for i in range(iterations):
        size = (max(1, math.floor(H / ratios[i] ** i)), max(1, math.floor(W / ratios[i] ** i)))
        up = torch.nn.Upsample(size=(H, W), mode="bilinear")
        total += up(torch.randn(B, C, *size, generator=g)) * discount**i
        if 1 in size:
            break
    return total / total.std()


@pytest.mark.parametrize("iterations, discount", [(1, 0.3), (6, 0.3), (10, 0.8)])
def test_multires_noise_matches_the_pyramid_written_out(iterations, discount):
    model = build(multires_noise_iterations=iterations, multires_noise_discount=discount)
    z0 = latents(2)
    model.noise_rng, g = stream(), stream()
    t, noise, input_noise = model.training_noise(z0)
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=g))
    eps = torch.randn(z0.shape, generator=g)
    assert torch.allclose(noise, pyramid_by_hand(eps, iterations, discount, g), atol=1e-6)
    assert input_noise is noise
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    if iterations == 1:  # one full-resolution level: (eps + n) / std
        g2 = stream()
        torch.randint(0, 1000, (2,), generator=g2)
        e = torch.randn(z0.shape, generator=g2)
        torch.rand(1, generator=g2, dtype=torch.float64)
        s = e + torch.randn(z0.shape, generator=g2)
        assert torch.allclose(noise, s / s.std(), atol=1e-6)


def test_multires_noise_has_more_low_frequency_energy():
    eps = torch.randn(64, 4, 32, 32, generator=stream())
    # the variance of each sample-channel's spatial mean: about 1/1024 for white noise
    white = eps.mean(dim=(2, 3)).var().item()
    assert white < 2e-3
    assert losses.pyramid_noise(eps, 6, 0.3, stream(2)).mean(dim=(2, 3)).var().item() > 1.5 * white
    assert losses.pyramid_noise(eps, 6, 0.8, stream(2)).mean(dim=(2, 3)).var().item() > 50 * white


def test_multires_ratios_come_from_the_host_generator_when_given():
    """On a GPU the level ratios (they set tensor sizes) are drawn on the host, from the model's
    CPU stream, so nothing is read back from the device; the noise itself stays on `generator`."""
    eps = torch.randn(2, 4, 16, 16, generator=stream())
    with_host = losses.pyramid_noise(eps, 3, 0.3, stream(5), ratio_generator=stream(9))
    g, host = stream(5), stream(9)
    ratios = [2 + 2 * r for r in torch.rand(3, generator=host, dtype=torch.float64).tolist()]
    total = eps.clone()
    for i, r in enumerate(ratios):
        size = (max(1, math.floor(16 / r**i)), max(1, math.floor(16 / r**i)))
        total += torch.nn.Upsample(size=(16, 16), mode="bilinear")(torch.randn(2, 4, *size, generator=g)) * 0.3**i
        if 1 in size:
            break
    assert torch.allclose(with_host, total / total.std(), atol=1e-6)
    assert not torch.allclose(with_host, losses.pyramid_noise(eps, 3, 0.3, stream(5)), atol=1e-3)


# ---- 3. input perturbation ------------------------------------------------------------------
def test_ip_noise_gamma_perturbs_x_t_and_keeps_the_target():
    model = build(ip_noise_gamma=0.1)
    b = batch(2)
    model.noise_rng, g = stream(), stream()
    calls = recording(model)
    loss = model.shared_step(b)
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(b["latent"].shape, generator=g)
    n = torch.randn(b["latent"].shape, generator=g)
    (x_t, t_seen), = calls
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(t_seen, t)
    assert torch.allclose(x_t, a.sqrt() * b["latent"] + (1 - a).sqrt() * (eps + 0.1 * n), atol=1e-6)
    expected = ((0.5 * x_t - eps) ** 2).mean()  # the target is eps, not eps + 0.1 n
    assert torch.allclose(loss, expected, rtol=1e-6)


# ---- 4. min-SNR-gamma -----------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_gamma_weights_each_sample(parameterization):
    plain = build(parameterization=parameterization)
    model = build(parameterization=parameterization, min_snr_gamma=5.0)
    z0, t = latents(4), torch.tensor([0, 30, 400, 999])
    noise = torch.randn(z0.shape, generator=stream())
    context = plain.get_learned_conditioning(["a"] * 4)
    with torch.no_grad():
        ratio = model.p_losses(z0, context, t, noise) / plain.p_losses(z0, context, t, noise)
    abar = sd_abar()
    for i, ti in enumerate(t.tolist()):
        snr = abar[ti] / (1 - abar[ti])
        w = min(snr, 5.0) / (snr if parameterization == "eps" else snr + 1)
        assert ratio[i].item() == pytest.approx(w, rel=1e-4), ti
    assert ratio[0] < 0.01 and (ratio[3] == 1 if parameterization == "eps" else ratio[3] < 1)


def test_min_snr_weight_formula_and_the_zero_snr_limit():
    snr = torch.tensor([0.0, 0.5, 5.0, 100.0])
    assert losses.min_snr_weight(snr, 5.0, "eps").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.05])
    assert losses.min_snr_weight(snr, 5.0, "v").tolist() == pytest.approx([0.0, 0.5 / 1.5, 5 / 6, 5 / 101])


# ---- 5. zero terminal SNR -------------------------------------------------------------------
def test_zero_terminal_snr_rescales_the_schedule_as_lin_et_al():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning with v
        model = build(zero_terminal_snr=True, parameterization="v")
    root = [a**0.5 for a in sd_abar()]
    r0, rT = root[0], root[-1]
    expected = [((r - rT) * r0 / (r0 - rT)) ** 2 for r in root]
    got = model.alphas_cumprod.double()
    assert got[-1].item() == 0.0 and model.betas[-1].item() == 1.0
    assert got[0].item() == pytest.approx(sd_abar()[0], rel=1e-6)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert model.sqrt_alphas_cumprod[-1].item() == 0.0 and model.sqrt_one_minus_alphas_cumprod[-1].item() == 1.0
    # v at the last step is -x_0, and its loss is finite (min-SNR weight for v is 0 there, 1 for eps)
    z0, t = latents(1), torch.tensor([999])
    noise = torch.randn(z0.shape, generator=stream())
    assert torch.allclose(model.target(z0, t, noise), -z0)
    for param in ("v", "eps"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = build(zero_terminal_snr=True, parameterization=param, min_snr_gamma=5.0)
        with torch.no_grad():
            assert torch.isfinite(m.p_losses(z0, m.get_learned_conditioning(["a"]), t, noise)).all()


def test_zero_terminal_snr_with_eps_warns_but_builds():
    with pytest.warns(UserWarning, match=r"zero_terminal_snr.*parameterization: v"):
        model = build(zero_terminal_snr=True)
    assert model.alphas_cumprod[-1].item() == 0.0


def test_the_config_schedule_replaces_a_loaded_files():
    """--actual_resume copies a released file's schedule buffers; setup() puts the config's back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(zero_terminal_snr=True, parameterization="v")
    ztsnr = {k: getattr(model, k).clone() for k in schedule.BUFFER_NAMES}
    released = build().state_dict()
    ckpt_io.load_into_model(model, released)
    assert model.alphas_cumprod[-1].item() > 0  # the file's schedule
    model.setup("fit")
    for k, v in ztsnr.items():
        assert torch.equal(getattr(model, k), v), k
    plain = build()
    ckpt_io.load_into_model(plain, released)
    before = plain.alphas_cumprod.clone()
    plain.setup("fit")  # the same schedule: nothing to do
    assert torch.equal(plain.alphas_cumprod, before)


# ---- 6. timestep range -----------------------------------------------------------------------
def test_timesteps_are_drawn_in_min_max_for_training_and_validation():
    model = build(min_timestep=200, max_timestep=300)
    z0 = torch.zeros(4000, 4, 1, 1)
    model.noise_rng, g = stream(), stream()
    t, _, _ = model.training_noise(z0)
    assert torch.equal(t, torch.randint(200, 300, (4000,), generator=g))
    assert t.min().item() == 200 and t.max().item() == 299
    calls = recording(model)
    b = {"image": torch.zeros(8, 3, 32, 32), "caption": ["a"] * 8, "path": [f"{i}.png" for i in range(8)]}
    model.fixed_noise_loss(b)
    (_, t_val), = calls
    assert ((t_val >= 200) & (t_val < 300)).all()


# ---- 7. loss types ----------------------------------------------------------------------------
def by_hand(pred, target, loss_type, c):
    d = (pred - target).flatten(1).tolist()
    f = {"l2": lambda x: x * x, "l1": abs,
         "huber": lambda x: 2 * c * (math.sqrt(x * x + c * c) - c),
         "smooth_l1": lambda x: 2 * (math.sqrt(x * x + c * c) - c)}[loss_type]
    return [sum(f(x) for x in row) / len(row) for row in d]


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("c", [0.1, 1.0])
def test_loss_types_follow_kohyas_definitions(loss_type, c):
    pred, target = torch.randn(3, 4, 2, 2, generator=stream()), torch.randn(3, 4, 2, 2, generator=stream(2))
    got = losses.per_sample_loss(pred, target, loss_type, c)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(by_hand(pred, target, loss_type, c), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_the_model_uses_the_loss_type_and_keeps_per_sample_weights(loss_type):
    model = build(loss_type=loss_type, huber_c=0.5)
    b = batch(2)
    model.noise_rng, g = stream(), stream()
    calls = recording(model)
    loss = model.shared_step({**b, "loss_weight": torch.tensor([1.0, 0.25])})
    torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(b["latent"].shape, generator=g)
    per = by_hand(0.5 * calls[0][0], eps, loss_type, 0.5)
    assert loss.item() == pytest.approx((per[0] + 0.25 * per[1]) / 2, rel=1e-5)


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("noise_offset", -0.1), ("noise_offset", "0.1"), ("noise_offset_random_strength", True),
    ("multires_noise_iterations", -1), ("multires_noise_iterations", 1.5), ("multires_noise_discount", 0.0),
    ("multires_noise_discount", 1.5), ("ip_noise_gamma", -1.0), ("min_snr_gamma", 0.0),
    ("min_snr_gamma", float("inf")), ("zero_terminal_snr", "yes"), ("min_timestep", -1), ("min_timestep", 1000),
    ("max_timestep", 0), ("max_timestep", 1001), ("loss_type", "mse"), ("huber_c", 0.0),
])
def test_bad_values_are_named(key, value):
    with pytest.raises(ValueError, match=rf"model\.params\.{key}\b"):
        build(**{key: value})


def test_min_must_be_below_max():
    with pytest.raises(ValueError, match=r"model\.params\.max_timestep"):
        build(min_timestep=500, max_timestep=500)
    build(min_timestep=999)  # [999, 1000): one timestep


# ---- kohya's header fields ----------------------------------------------------------------------
def test_kohya_fields_as_kohya_writes_them():
    assert build().kohya_fields() == {
        "ss_noise_offset": "None", "ss_noise_offset_random_strength": "False",
        "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3", "ss_ip_noise_gamma": "None",
        "ss_min_snr_gamma": "None", "ss_zero_terminal_snr": "False", "ss_loss_type": "l2",
        "ss_huber_schedule": "constant", "ss_huber_c": "0.1"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fields = build(noise_offset=0.06, multires_noise_iterations=6, multires_noise_discount=0.4,
                       ip_noise_gamma=0.1, min_snr_gamma=5, zero_terminal_snr=True, loss_type="huber",
                       huber_c=0.2, min_timestep=100, max_timestep=900).kohya_fields()
    assert fields == {
        "ss_noise_offset": "0.06", "ss_noise_offset_random_strength": "False",
        "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.4", "ss_ip_noise_gamma": "0.1",
        "ss_min_snr_gamma": "5.0", "ss_zero_terminal_snr": "True", "ss_loss_type": "huber",
        "ss_huber_schedule": "constant", "ss_huber_c": "0.2", "modelspec.timestep_range": "100,900"}
