"""adamw_bf16's fused multi-weight update (ldm/optim/triton_adamw.py), run on the CPU by
Triton's interpreter: AdamW's arithmetic, stochastic rounding of bf16 values, one launch per
step count, and which weights qualify."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from ldm.optim import triton_adamw
from ldm.optim.low_memory import AdamWBF16

pytest.importorskip("triton")


@pytest.fixture
def kernel(monkeypatch):
    """CPU tensors qualifying for the kernel, which Triton's interpreter runs (tests/conftest.py);
    counts the launches and the weights each updates."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on CPU tensors in Triton's interpreter only")
    monkeypatch.setattr(triton_adamw, "qualifies", triton_adamw.same_layout)
    launches, real = [], triton_adamw.adamw_
    monkeypatch.setattr(triton_adamw, "adamw_",
                        lambda weights, **kw: launches.append(len(weights)) or real(weights, **kw))
    return launches


def test_one_launch_per_step_count_is_adamw_on_fp32_weights(kernel):
    """fp32 weights, one above BLOCK elements and not a multiple of it, one channels-last;
    a weight that skips steps (no gradient) has its own bias correction, so its own launch."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(70, 60), nn.Conv2d(3, 5, 3), nn.Linear(4, 3))  # 4200 weights: several blocks
    a[1].to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    opt_a = AdamWBF16(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, img = torch.randn(2, 70, generator=g), torch.randn(2, 3, 6, 6, generator=g)
        for model, opt in ((a, opt_a), (b, opt_b)):
            loss = model[0](x).square().mean() + model[1](img).square().mean() + model[2](x[:, :4]).square().mean()
            loss.backward()
            if step % 2:
                model[2].bias.grad = None  # skips this step
            opt.step()
            opt.zero_grad()
    assert kernel == [6, 5, 5, 1, 5]  # all; all but the bias; the rest at step 3 and the bias at its 2; ...
    assert a[1].weight.is_contiguous(memory_format=torch.channels_last)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers at or below x and above it, as fp32."""
    down = x.bfloat16()
    down = torch.where(down.float() > x, torch.nextafter(down, torch.full_like(down, -1e30)), down)
    return down.float(), torch.nextafter(down, torch.full_like(down, 1e30)).float()


def test_bf16_values_land_on_the_neighbours_of_the_fp32_update_without_bias(kernel):
    """Weight, m and v each become one of the two bf16 numbers around AdamW's fp32 result,
    the upper one as often as the fraction cut off says (the mean error is ~0 bf16 steps)."""
    n = 50_000
    g = torch.Generator().manual_seed(0)
    w = (1 + torch.rand(n, generator=g)).bfloat16()  # in [1, 2]
    grad = torch.randn(n, generator=g).bfloat16()
    m, v = (0.1 * torch.randn(n, generator=g)).bfloat16(), (0.01 * torch.rand(n, generator=g)).bfloat16()
    lr, b1, b2, eps, wd, step = 3e-3, 0.9, 0.999, 1e-8, 0.01, 3
    m32 = m.float() + (1 - b1) * (grad.float() - m.float())
    v32 = b2 * v.float() + (1 - b2) * grad.float() ** 2
    w32 = w.float() * (1 - lr * wd) - lr / (1 - b1**step) * m32 / ((v32 / (1 - b2**step)).sqrt() + eps)
    # the kernel's fp32 arithmetic may round differently from torch's (fused multiply-adds):
    # a few fp32 steps of the terms, which matter where m's terms cancel
    tols = (1e-6 * w.float().abs(), 1e-6 * (m.float().abs() + grad.float().abs()), 1e-6 * v32)
    triton_adamw.adamw_([(w, grad, m, v)], lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, step=step, seed=7)
    for got, exact, tol in zip((w, m, v), (w32, m32, v32), tols):
        got = got.float()
        lowest, highest = neighbours(exact - tol)[0], neighbours(exact + tol)[1]  # tol 0: the two neighbours
        assert ((got >= lowest) & (got <= highest)).all()
        down, up = neighbours(exact)
        cut = (exact - down) / (up - down)  # the chance of rounding up
        assert cut.mean().item() == pytest.approx(((got == up) & (up != down)).float().mean().item(), abs=0.01)


def test_updates_smaller_than_a_bf16_step_add_up_and_each_launch_rounds_anew(kernel):
    """lr 1e-4 on weights of 1.0 (bf16 spacing 2^-8 above 1.0): a constant gradient moves each
    weight by lr per step; with the same random bits every step the roundings would not average."""
    steps, lr = 200, 1e-4
    p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AdamWBF16([p], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    assert kernel == [1] * steps
    assert (1.0 - p.float()).mean().item() == pytest.approx(steps * lr, rel=0.1)


def test_which_weights_qualify():
    w = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)
    assert triton_adamw.same_layout((w, torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)))
    assert not triton_adamw.same_layout((w, torch.zeros(4, 3, 2, 2), torch.zeros_like(w), torch.zeros_like(w)))
    assert not triton_adamw.same_layout((w, w.bfloat16(), w, w))  # one dtype
    s = torch.zeros(4, 6)[:, :3]  # not dense
    assert not triton_adamw.same_layout((s, s, s, s))
    h = torch.zeros(3, dtype=torch.float16)
    assert not triton_adamw.same_layout((h, h, h, h))
    assert not triton_adamw.qualifies((w, w, w, w))  # a CPU tensor: the other paths


def test_every_block_of_a_launch_draws_its_own_random_bits(kernel):
    """Equal weights with equal gradients, each result halfway between two bf16 numbers: each
    element rounds up or down by its own bits. Blocks within a chunk and chunks of one weight
    must not repeat one pattern (as a key or counter used twice would)."""
    n = 3 * triton_adamw.CHUNK
    w = torch.ones(n, dtype=torch.bfloat16)
    grad, m, v = torch.ones_like(w), torch.zeros_like(w), torch.zeros_like(w)
    # the first AdamW step moves each weight by lr: 1 - 2^-9, halfway between 1 - 2^-8 and 1
    triton_adamw.adamw_([(w, grad, m, v)], lr=2**-9, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, step=1, seed=3)
    assert set(w.float().unique().tolist()) == {1.0, 1.0 - 2**-8}
    up = (w == 1).view(-1, triton_adamw.BLOCK)
    assert 0.45 < up.float().mean().item() < 0.55
    assert len({tuple(row.tolist()) for row in up}) == len(up)  # no two blocks alike
