"""model.params.channels_last: NHWC convolution weights give the plain step's loss and gradients,
and a resumed optimizer state always takes its weights' layout."""
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.optim.optimizers import match_state_layouts
from tests.models.test_latent_diffusion import build, tiny_batch

TINY = Path(__file__).resolve().parents[2] / "tests/configs/tiny.yaml"
NHWC = torch.channels_last


def tiny(**overrides):
    torch.manual_seed(0)
    model = build(TINY, **overrides)
    model.setup("fit")
    return model


def test_channels_last_gives_the_plain_loss_and_gradients():
    plain, nhwc = tiny(), tiny(channels_last=True)
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=NHWC) for p in convs)
    assert all(not p.is_contiguous() for p in convs if p.shape[-1] > 1)  # 1x1 kernels are both
    assert all(p.is_contiguous() for p in plain.model.parameters())
    assert all(p.is_contiguous() for p in nhwc.first_stage_model.parameters())  # only the UNet
    losses = []
    for model in (plain, nhwc):
        model.on_fit_start()  # the same seeded noise stream for both
        loss = model.shared_step(tiny_batch())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), nhwc.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        # the gradient follows its weight's memory layout (a size-1 dim's stride says nothing:
        # 1x1 kernels, which run as products, get (I, 1, 1, 1) for (I, 1, I, I), the same memory)
        assert [s for s, n in zip(b.grad.stride(), b.shape) if n > 1] == \
            [s for s, n in zip(b.stride(), b.shape) if n > 1], name
    assert nhwc.state_dict().keys() == plain.state_dict().keys()


def test_channels_last_bad_values_are_named(monkeypatch):
    with pytest.raises(ValueError, match="model.params.channels_last: expected true or false"):
        build(TINY, channels_last="yes")
    bf16 = {"channels_last": True, "optimizer": {"name": "adamw_bf16"}}
    assert build(TINY, **bf16).channels_last  # its fused kernel (Triton) takes NHWC weights
    monkeypatch.setattr("ldm.optim.triton_adamw.triton", None)
    with pytest.raises(ValueError, match="channels_last: with optimizer.name: adamw_bf16 it needs Triton"):
        build(TINY, **bf16)


def adamw_steps(weight: torch.Tensor, grads: list[torch.Tensor], state=None, fix: bool = False):
    """Fused AdamW on `weight` (its own layout), optionally from a saved state; returns the
    weight after the steps and the optimizer's state."""
    p = torch.nn.Parameter(weight.clone(memory_format=torch.preserve_format))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))
        copied = match_state_layouts(opt) if fix else 0
        assert copied == (2 if fix else 0)  # both moments were NCHW
    for g in grads:
        p.grad = g.contiguous(memory_format=torch.channels_last if weight.is_contiguous(memory_format=NHWC)
                              else torch.contiguous_format)
        opt.step()
    return p.detach(), opt.state_dict()


def test_a_resumed_state_takes_its_weights_layout():
    """A run saved without channels_last and resumed with it: fused AdamW walks weight, gradient
    and moments as flat memory, so NCHW moments of an NHWC weight update the wrong elements."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2)
    g1, g2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    _, saved = adamw_steps(w, [g1])  # NCHW run, one step
    after_one, _ = adamw_steps(w, [g1])
    expected, _ = adamw_steps(after_one, [g2], saved)  # resumed in the same layout
    nhwc = after_one.contiguous(memory_format=NHWC)
    broken, _ = adamw_steps(nhwc, [g2], saved)
    assert not torch.allclose(broken, expected)  # what the fix is for
    fixed, _ = adamw_steps(nhwc, [g2], saved, fix=True)
    torch.testing.assert_close(fixed, expected)


def test_training_start_gives_restored_moments_their_weights_layout():
    model = tiny(channels_last=True)
    conv = next(p for p in model.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    opt = torch.optim.AdamW(model.model.parameters(), fused=True)
    opt.state[conv] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(conv.shape),  # NCHW, as saved
                       "exp_avg_sq": torch.rand(conv.shape)}
    saved = copy.deepcopy(opt.state[conv])
    model._trainer = SimpleNamespace(optimizers=[opt])
    model.on_train_start()
    for name in ("exp_avg", "exp_avg_sq"):
        assert opt.state[conv][name].stride() == conv.stride()
        assert torch.equal(opt.state[conv][name], saved[name])  # the same values, in the weight's layout


def test_written_files_hold_contiguous_tensors(tmp_path):
    """Training checkpoints and pruned files: other tools may .view() a loaded weight."""
    from ldm.callbacks.checkpointing import BackgroundCheckpointIO
    from ldm.checkpoint import save_checkpoint

    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=NHWC)
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"state_dict": {"model.w": w}, "global_step": 1}, tmp_path / "last.ckpt")
    io.teardown()
    save_checkpoint({"model.w": w}, tmp_path / "pruned.ckpt")
    for name in ("last.ckpt", "pruned.ckpt"):
        loaded = torch.load(tmp_path / name, weights_only=False)["state_dict"]["model.w"]
        assert loaded.is_contiguous() and torch.equal(loaded, w), name


def test_the_ema_follows_the_weights_layout_and_averages_the_same():
    plain, nhwc = tiny(use_ema=True), tiny(use_ema=True, channels_last=True)
    shadows = [b for b in nhwc.model_ema.buffers() if b.dim() == 4 and b.shape[-1] > 1]
    assert shadows and all(b.is_contiguous(memory_format=NHWC) for b in shadows)
    for model in (plain, nhwc):
        with torch.no_grad():
            for p in model.model.parameters():
                p.add_(1.0)
        model.model_ema(model.model)
    for (name, a), b in zip(plain.model_ema.state_dict().items(), nhwc.model_ema.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
