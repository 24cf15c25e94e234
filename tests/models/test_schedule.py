import math

import pytest
import torch

from ldm.models.diffusion import schedule


def sd_buffers():
    betas = schedule.make_beta_schedule("linear", 1000, 0.00085, 0.0120)
    return betas, schedule.schedule_buffers(betas)


def test_scaled_linear_betas_hit_both_ends():
    betas, _ = sd_buffers()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.0120, rel=1e-12)
    # linear in sqrt(beta)
    root = betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), atol=1e-12)


def test_buffers_match_closed_forms_in_plain_python():
    betas, b = sd_buffers()
    assert list(b) == list(schedule.BUFFER_NAMES) and len(b) == 12
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in b.values())
    abar = 1.0
    for t in range(1000):
        beta = betas[t].item()
        abar_prev = abar
        abar *= 1.0 - beta
        if t not in (0, 1, 10, 500, 999):
            continue
        expected = {
            "betas": beta,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": math.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - abar),
            "log_one_minus_alphas_cumprod": math.log(1 - abar),
            "sqrt_recip_alphas_cumprod": math.sqrt(1 / abar),
            "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / abar - 1),
            "posterior_variance": beta * (1 - abar_prev) / (1 - abar),
            "posterior_log_variance_clipped": math.log(max(beta * (1 - abar_prev) / (1 - abar), 1e-20)),
            "posterior_mean_coef1": beta * math.sqrt(abar_prev) / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar),
        }
        for name, value in expected.items():
            assert b[name][t].item() == pytest.approx(value, rel=1e-6, abs=1e-30), (name, t)
    # SD 1.x's well-known end points
    assert b["alphas_cumprod"][-1].item() == pytest.approx(0.0047, abs=1e-4)


def test_q_sample_and_v_target():
    _, b = sd_buffers()
    x0 = torch.randn(3, 4, 2, 2)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 400, 999])
    xt = schedule.q_sample(b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"], x0, t, eps)
    v = schedule.v_target(b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"], x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        a = b["alphas_cumprod"][ti]
        assert torch.allclose(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i], atol=1e-6)
        assert torch.allclose(v[i], a.sqrt() * eps[i] - (1 - a).sqrt() * x0[i], atol=1e-6)
    # x0 is recoverable from (x_t, v): x0 = sqrt(abar) x_t - sqrt(1-abar) v
    sa = schedule.extract(b["sqrt_alphas_cumprod"], t, 4)
    s1 = schedule.extract(b["sqrt_one_minus_alphas_cumprod"], t, 4)
    assert torch.allclose(sa * xt - s1 * v, x0, atol=1e-5)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        schedule.make_beta_schedule("cosine-ish", 10, 0.1, 0.2)
