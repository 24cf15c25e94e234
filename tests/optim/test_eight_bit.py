"""adamw8bit_bf16: bitsandbytes' 8-bit AdamW on bf16 weights with stochastic rounding (real
bitsandbytes, whose CPU build runs the same update as its CUDA kernel)."""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from ldm.optim import eight_bit
from ldm.optim.eight_bit import AdamW8bitBF16
from ldm.optim.low_memory import check_channels_last, unet_dtype
from ldm.optim.optimizers import OptimizerConfig, build_optimizer


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A weight of 8192 elements (8-bit moments: 32 blocks) and three small ones (bf16 moments)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 4)).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(32, 128, generator=torch.Generator().manual_seed(step)).to(next(model.parameters()).dtype)

        def closure():
            loss = model(x).float().square().mean()
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()


@pytest.mark.parametrize("chunk", [1 << 22, 1024])  # whole; the 8192-element weight in 8 chunks
def test_on_fp32_weights_it_is_bitsandbytes_adamw8bit(chunk, monkeypatch):
    monkeypatch.setattr(eight_bit, "CHUNK", chunk)
    torch.manual_seed(0)
    ours = nn.Linear(128, 64, bias=False)
    theirs = copy.deepcopy(ours)
    opt_a = AdamW8bitBF16(ours.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = bnb.optim.AdamW8bit(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        x = torch.randn(32, 128, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    state = opt_a.state[ours.weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == (8192,)
    assert state["exp_avg_sq_absmax"].dtype == torch.float32 and state["exp_avg_sq_absmax"].shape == (32,)
    torch.testing.assert_close(state["exp_avg"], opt_b.state[theirs.weight]["state1"].view(-1), rtol=0, atol=0)


def test_it_follows_fp32_adamw_and_keeps_small_weights_moments_in_their_dtype():
    ours, reference = net(), net()
    w0 = [p.detach().clone() for p in reference.parameters()]
    opt = AdamW8bitBF16(ours.parameters(), lr=1e-2, weight_decay=0.1)
    train(ours, opt, range(20))
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1), range(20))
    for a, b, start in zip(ours.parameters(), reference.parameters(), w0):
        assert (a - b).norm() < 0.05 * (b - start).norm()  # 8-bit moments: ~2% off after 20 steps here
    assert [opt.state[p]["exp_avg"].dtype for p in ours.parameters()] == [torch.uint8] + [torch.float32] * 3


def test_bf16_weights_keep_updates_smaller_than_a_bf16_step():
    """lr 1e-4 on weights of 1.0 is under half the bf16 spacing there (2^-8): bitsandbytes'
    AdamW8bit on the bf16 weight loses every step, adamw8bit_bf16 keeps them (in expectation)."""
    steps, lr = 200, 1e-4
    moved = {}
    for name, cls in (("ours", AdamW8bitBF16), ("bitsandbytes", bnb.optim.AdamW8bit)):
        p = nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = cls([p], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # a constant gradient: Adam's step is lr every time
            opt.step()
        moved[name] = (1.0 - p.float()).mean().item()
        assert opt.state[p]["state1" if name == "bitsandbytes" else "exp_avg"].dtype == torch.uint8
    assert moved["bitsandbytes"] == 0.0
    assert moved["ours"] == pytest.approx(steps * lr, rel=0.1)


@pytest.mark.parametrize("fused_backward", [False, True])
def test_a_resumed_run_continues_exactly_with_its_8bit_state(fused_backward):
    """torch's load_state_dict casts every state tensor to its weight's dtype (uint8 codes and
    fp32 scales to bf16); the 8-bit state is restored as saved. Stochastic rounding draws from
    the global generator, seeded alike after the split in both runs."""
    cfg = OptimizerConfig.from_mapping({"name": "adamw8bit_bf16", "lr": 1e-3, "fused_backward": fused_backward})
    straight = net(torch.bfloat16)
    opt = build_optimizer({"unet": straight.parameters()}, cfg, "cpu")
    train(straight, opt, range(3))
    torch.manual_seed(5)
    train(straight, opt, range(3, 6))

    first = net(torch.bfloat16)
    opt1 = build_optimizer({"unet": first.parameters()}, cfg, "cpu")
    train(first, opt1, range(3))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    if fused_backward:
        opt1.remove_hooks()
    resumed = net(torch.bfloat16)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer({"unet": resumed.parameters()}, cfg, "cpu")
    opt2.load_state_dict(saved_opt)
    weight = next(resumed.parameters())
    assert opt2.state[weight]["exp_avg"].dtype == torch.uint8
    torch.testing.assert_close(opt2.state[weight]["exp_avg_absmax"], saved_opt["state"][0]["exp_avg_absmax"])
    assert opt2.state[list(resumed.parameters())[1]]["exp_avg"].dtype == torch.bfloat16  # a small weight's
    torch.manual_seed(5)
    train(resumed, opt2, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_optimizers_state_and_channels_last_are_refused():
    model = net(torch.bfloat16)
    other = build_optimizer({"unet": model.parameters()}, OptimizerConfig.from_mapping({"name": "adamw_bf16"}), "cpu")
    train(model, other, range(1))
    opt = build_optimizer({"unet": model.parameters()}, OptimizerConfig.from_mapping({"name": "adamw8bit_bf16"}), "cpu")
    with pytest.raises(ValueError, match=r"shape \(64, 128\) is not 8-bit AdamW's .* saved by another optimizer"):
        opt.load_state_dict(other.state_dict())  # refused as it is loaded, before any step
    with pytest.raises(ValueError, match="channels_last: not with optimizer.name: adamw8bit_bf16"):
        check_channels_last(True, "adamw8bit_bf16")
    assert unet_dtype("bf16", False, "adamw8bit_bf16") == torch.bfloat16
