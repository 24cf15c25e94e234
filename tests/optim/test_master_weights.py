"""adamw_master: bf16 UNet weights with fp32 master copies, autocast's arithmetic without its casts."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import os

from ldm.optim import triton_adamw
from ldm.optim.master_weights import AdamWMaster, MasterWeights, check_master_trainer
from ldm.optim.optimizers import OptimizerConfig, build_optimizer
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    """The same bf16 gradients for every copy of `net` (as the bf16 products produce them)."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g).bfloat16() for p in model.parameters()]


def follow(steps: int, channels_last: bool = False) -> tuple[nn.Module, nn.Module, MasterWeights]:
    """torch's AdamW on fp32 weights given gradients g.float(), and AdamWMaster on the bf16
    copy given g: after each step the masters are the fp32 weights, the weights their rounding."""
    ref = net()
    half = copy.deepcopy(ref)
    if channels_last:
        half.to(memory_format=torch.channels_last)
    masters = MasterWeights(half)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt = AdamWMaster(half.parameters(), lr=1e-2, weight_decay=0.1)
    opt.use(masters)
    for step in range(steps):
        for model in (ref, half):
            for p, g in zip(model.parameters(), grads(model, step)):
                p.grad = torch.empty_like(p).copy_(g)  # in the weight's layout, as autograd makes it
        opt_ref.step()
        opt.step()
    return ref, half, masters


def check_follows(ref: nn.Module, half: nn.Module, masters: MasterWeights) -> None:
    for a, p in zip(ref.parameters(), half.parameters()):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(masters.master[p], a.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), masters.master[p].bfloat16())


def test_the_masters_follow_fp32_adamw_and_the_weights_are_their_rounding():
    check_follows(*follow(5))


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_kernel_updates_masters_and_weights_in_one_launch_per_step(monkeypatch, channels_last):
    """The GPU path (triton_adamw with bf16 copies), run by Triton's interpreter on the CPU: all
    six weights (the conv weight NHWC too) in one launch per step, the same AdamW."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on CPU tensors in Triton's interpreter only")
    pytest.importorskip("triton")
    launches, real = [], triton_adamw.adamw_
    monkeypatch.setattr(triton_adamw, "qualifies", triton_adamw.same_layout)
    monkeypatch.setattr(triton_adamw, "adamw_",
                        lambda weights, **kw: launches.append(len(weights)) or real(weights, **kw))
    check_follows(*follow(5, channels_last=channels_last))
    assert launches == [6] * 5


def test_the_kernel_takes_a_weight_with_its_copy_only_when_all_five_line_up():
    w = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)
    g, c = w.bfloat16(), w.bfloat16()
    assert triton_adamw.same_layout((w, g, torch.zeros_like(w), torch.zeros_like(w), c))
    nchw_copy = torch.zeros(4, 3, 2, 2).bfloat16()
    assert not triton_adamw.same_layout((w, g, torch.zeros_like(w), torch.zeros_like(w), nchw_copy))
    assert not triton_adamw.same_layout((w, w, torch.zeros_like(w), torch.zeros_like(w), c))  # the gradient is bf16
    assert not triton_adamw.same_layout((w.bfloat16(), g, g, g, c))  # the master, m and v are fp32


def test_state_dict_shows_the_masters_under_the_weights_names_and_loading_sets_them():
    model = net()
    names = list(model.state_dict())
    values = {k: v.clone() for k, v in model.state_dict().items()}
    masters = MasterWeights(model)
    state = model.state_dict()
    assert list(state) == names
    assert all(v.dtype == torch.float32 and torch.equal(v, values[k]) for k, v in state.items())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    new = {k: v + 1e-3 for k, v in values.items()}  # below bf16's resolution for most of them
    model.load_state_dict(new)
    assert all(torch.equal(masters.master[p], new[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p.detach(), new[k].bfloat16()) for k, p in model.named_parameters())


def test_the_optimizer_state_round_trip_keeps_fp32_moments():
    ref, half, masters = follow(3)
    opt = AdamWMaster(half.parameters(), lr=1e-2, weight_decay=0.1)
    opt.use(masters)
    for p, g in zip(half.parameters(), grads(half, 0)):
        p.grad = g
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    again = AdamWMaster(half.parameters(), lr=1e-2, weight_decay=0.1)
    again.load_state_dict(saved)
    for p in half.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert again.state[p][k].dtype == torch.float32
            assert torch.equal(again.state[p][k], opt.state[p][k])
        assert again.state[p]["step"] == 1


def test_a_bf16_weight_without_a_master_is_an_error():
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="no fp32 master"):
        AdamWMaster([p]).step()


def build(**overrides):
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    for k, v in overrides.items():
        cfg.params[k] = v
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def test_a_step_computes_what_autocast_computes_on_fp32_weights():
    """The same loss, the same gradients (bf16 here, their fp32 cast there) and, after one
    optimizer step, masters that are torch's AdamW result: the UNet under bf16 autocast sees
    the same bf16 weights either way. The frozen VAE and text encoder are bf16 in both."""
    torch.manual_seed(0)
    plain = build(use_ema=False)
    master = build(use_ema=False, unet_precision="bf16", optimizer={"name": "adamw_master"})
    master.load_state_dict(plain.state_dict())
    plain.first_stage_model.bfloat16()
    plain.cond_stage_model.bfloat16()
    master.setup("fit")
    assert master.masters is not None and all(p.dtype == torch.bfloat16 for p in master.model.parameters())
    results, images = [], torch.rand(2, 3, 32, 32) * 2 - 1
    for model in (plain, master):
        model.learning_rate = 1e-3
        opt = model.configure_optimizers()["optimizer"]
        assert isinstance(opt, AdamWMaster) == (model is master)
        model.on_fit_start()  # the noise stream, seeded alike
        batch = model.on_before_batch_transfer({"image": images, "caption": ["a red circle", "a blue square"]}, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.shared_step(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.float() for p in model.model.parameters()]))
        opt.step()
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    trained, kept = plain.state_dict(), master.state_dict()
    unet = [k for k in trained if k.startswith("model.diffusion_model.")]
    assert unet and all(kept[k].dtype == torch.float32 for k in unet)
    for k in unet:
        torch.testing.assert_close(kept[k], trained[k], rtol=1e-6, atol=1e-7)


def test_the_settings_adamw_master_cannot_honour_are_refused_by_name():
    with pytest.raises(ValueError, match="unet_precision: optimizer.name adamw_master .* set unet_precision: bf16"):
        build(use_ema=False, optimizer={"name": "adamw_master"})
    with pytest.raises(ValueError,
                       match="EMA .* set use_ema: false, or unet_precision: fp32 with optimizer.name: adamw"):
        build(use_ema=True, unet_precision="bf16", optimizer={"name": "adamw_master"})
    with pytest.raises(ConfigError, match="fused_backward: not with adamw_master"):
        OptimizerConfig.from_mapping({"name": "adamw_master", "fused_backward": True})

    class Trainer:
        accumulate_grad_batches, precision = 1, "bf16-mixed"
    check_master_trainer(Trainer(), "k")
    for field, value, message in (("accumulate_grad_batches", 4, "accumulate_grad_batches: 1"),
                                  ("precision", "16-mixed", "precision: bf16-mixed, or .* adamw with "
                                                                "model.params.unet_precision: fp32")):
        t = Trainer()
        setattr(t, field, value)
        with pytest.raises(ConfigError, match=message):
            check_master_trainer(t, "k")


def test_the_optimizer_is_built_by_name():
    model = net()
    MasterWeights(model)
    opt = build_optimizer({"unet": model.parameters()}, OptimizerConfig.from_mapping({"name": "adamw_master"}), "cpu")
    assert isinstance(opt, AdamWMaster) and opt.built_with == {}


@pytest.mark.slow  # a main.py run of the tiny model and its resumption, ~15 s
def test_main_trains_with_masters_saves_them_and_resumes(tmp_path):
    from ldm.train import main
    from scripts.make_shapes import make_shapes

    make_shapes(tmp_path / "shapes", count=6, size=64, seed=0)
    base = ["--base", str(ROOT / "tests/configs/tiny.yaml"), str(ROOT / "tests/configs/tiny_run.yaml")]
    opts = ["model.params.unet_precision=bf16", "model.params.optimizer.name=adamw_master",
            "model.params.use_ema=false", "lightning.trainer.precision=bf16-mixed",
            "lightning.callbacks.image_logger.params.disabled=true", "lightning.trainer.max_epochs=1"]
    assert main([*base, "-t", "--data_root", str(tmp_path / "shapes"), "-l", str(tmp_path / "logs"), *opts]) == 0
    (run,) = list((tmp_path / "logs").iterdir())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    unet = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.diffusion_model.")}
    assert unet and all(v.dtype == torch.float32 for v in unet.values())  # the masters, not their rounding
    assert any(not torch.equal(v, v.bfloat16().float()) for v in unet.values())
    (state,) = ckpt["optimizer_states"]
    assert len(state["state"]) == len(unet)
    assert all(s["exp_avg"].dtype == torch.float32 and "master" not in s for s in state["state"].values())
    assert main([*base, "-t", "-r", str(run / "checkpoints" / "last.ckpt"), *opts[:-1],
                 "lightning.trainer.max_epochs=2"]) == 0


@pytest.mark.parametrize("config", ["v1-finetune_everydream", "v2-finetune_everydream"])
def test_the_fine_tune_configs_train_the_unet_with_masters_and_a_text_encoder_in_fp32(config):
    """The shipped fine-tune configs' settings (unet_precision bf16, adamw_master) on the tiny
    model, with cond_stage_trainable: true: the UNet's bf16 weights are their masters' rounding
    after a step, and the text encoder, kept fp32, trains in the same optimizer."""
    shipped = OmegaConf.load(ROOT / f"configs/stable-diffusion/{config}.yaml").model.params
    assert (shipped.unet_precision, shipped.optimizer.name, shipped.use_ema) == ("bf16", "adamw_master", False)
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    cfg.params.update(unet_precision="bf16", use_ema=False, cond_stage_trainable=True)
    cfg.params.optimizer = {"name": "adamw_master"}
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    model.setup("fit")
    model.learning_rate = 1e-3
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    text = [p for p in model.cond_stage_model.parameters() if p.requires_grad]
    assert text and all(p.dtype == torch.float32 for p in text)
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())
    before = [p.detach().clone() for p in text]
    before_unet = [p.detach().clone() for p in model.model.parameters()]
    model.on_fit_start()
    batch = model.on_before_batch_transfer({"image": torch.rand(2, 3, 32, 32) * 2 - 1,
                                            "caption": ["a red circle", "a blue square"]}, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.shared_step(batch).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, text))
    assert any(not torch.equal(a, p) for a, p in zip(before_unet, model.model.parameters()))
    for p in model.model.parameters():
        assert torch.equal(p.detach(), model.masters.master[p].bfloat16())
