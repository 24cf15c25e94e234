"""The optimizers beyond AdamW. lion-pytorch and prodigyopt (the `test` extra) run for real;
bitsandbytes' AdamW8bit is stood in for by a module with its signature and AdamW's arithmetic,
so that what the builder passes it can be read back (bitsandbytes itself runs in
test_eight_bit.py)."""
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from ldm.callbacks.adapter_saver import _optimizer_name
from ldm.optim import OptimizerConfig, build_optimizer, build_scheduler


class AdamW8bit(torch.optim.AdamW):
    """Stand-in for bitsandbytes.optim.adamw.AdamW8bit: its signature, AdamW's arithmetic."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.bnb_kwargs = dict(min_8bit_size=min_8bit_size, is_paged=is_paged)


AdamW8bit.__module__ = "bitsandbytes.optim.adamw"


@pytest.fixture
def fake_bnb(monkeypatch):
    module = types.ModuleType("bitsandbytes")
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)


def parts():
    torch.manual_seed(0)
    return nn.Linear(8, 8), nn.Linear(8, 4)  # stand-ins for the UNet and the text encoder


def build(section, unet=None, text=None):
    groups = {"unet": unet.parameters()} if unet is not None else {}
    if text is not None:
        groups["text_encoder"] = text.parameters()
    return build_optimizer(groups, OptimizerConfig.from_mapping(section), "cpu")


def train(opt, unet, text, steps, sched=None):
    """`steps` optimizer steps on a regression through both parts; the losses."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4)
    losses = []
    for _ in range(steps):
        loss = (text(torch.tanh(unet(x))) - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return losses


@pytest.mark.parametrize("name, lr, module", [
    ("adamw8bit", 1e-2, "bitsandbytes"), ("lion", 1e-2, "lion_pytorch"), ("prodigy", 1.0, "prodigyopt"),
    ("adafactor", 1e-1, "torch"),
])
def test_each_optimizer_trains_with_one_group_per_part(fake_bnb, name, lr, module):
    unet, text = parts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these settings deserves a warning
        opt = build({"name": name, "lr": lr}, unet, text)
    assert type(opt).__mro__[1 if name == "prodigy" else 0].__module__.split(".")[0] == module
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("unet", lr), ("text_encoder", lr)]
    losses = train(opt, unet, text, 30)
    assert losses[-1] < 0.8 * losses[0]


def test_adamw8bit_passes_settings_and_args(fake_bnb):
    unet, text = parts()
    opt = build({"name": "adamw8bit", "betas": [0.8, 0.99], "weight_decay": 0.1, "text_encoder_lr": 1e-5,
                 "args": {"min_8bit_size": 16, "is_paged": True}}, unet, text)
    assert type(opt) is AdamW8bit and opt.bnb_kwargs == {"min_8bit_size": 16, "is_paged": True}
    assert [g["lr"] for g in opt.param_groups] == [1e-6, 1e-5]
    assert all(g["betas"] == (0.8, 0.99) and g["weight_decay"] == 0.1 for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.args\.fused: not an argument of AdamW8bit"):
        build({"name": "adamw8bit", "args": {"fused": True}}, unet)


@pytest.mark.parametrize("name, module, extra", [
    ("adamw8bit", "bitsandbytes", "adamw8bit"), ("adamw8bit_bf16", "bitsandbytes", "adamw8bit"),
    ("lion", "lion_pytorch", "lion"), ("prodigy", "prodigyopt", "prodigy"),
])
def test_a_missing_package_names_its_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    unet, _ = parts()
    with pytest.raises(ValueError, match=rf"^model\.params\.optimizer\.name: .*'{module}'.*"
                                         rf'pip install "everydream-ldm\[{extra}\]"'):
        build({"name": name}, unet)


def test_lion_keeps_its_own_betas_and_has_no_eps():
    unet, _ = parts()
    assert build({"name": "lion"}, unet).param_groups[0]["betas"] == (0.9, 0.99)  # Lion's, not AdamW's
    opt = build({"name": "lion", "betas": [0.95, 0.98], "weight_decay": 0.1, "args": {"use_triton": False}}, unet)
    assert (opt.param_groups[0]["betas"], opt.param_groups[0]["weight_decay"]) == ((0.95, 0.98), 0.1)
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.eps: lion \(Lion\) has no such setting"):
        build({"name": "lion", "eps": 1e-8}, unet)


def test_prodigy_warns_about_its_learning_rates():
    unet, text = parts()
    with pytest.warns(UserWarning, match="best about 1.0"):
        build({"name": "prodigy", "lr": 1e-4}, unet)
    with pytest.warns(UserWarning, match=r"one learning rate, the first param group's \(unet: 1\); "
                                         r"text_encoder's 0.5 is not used"):
        opt = build({"name": "prodigy", "lr": 1.0, "text_encoder_lr": 0.5}, unet, text)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]  # prodigyopt refuses unequal non-zero lrs
    opt = build({"name": "prodigy", "lr": 1.0, "weight_decay": 0.01, "args": {"d_coef": 2.0,
                                                                              "safeguard_warmup": True}}, unet)
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["d_coef"], group["safeguard_warmup"]) == (0.01, 2.0, True)


def test_adafactor_is_torchs_relative_step_optimizer():
    unet, _ = parts()
    opt = build({"name": "adafactor", "lr": 1e-2, "args": {"eps": [None, 1e-3], "d": 1.0}}, unet)
    assert type(opt) is torch.optim.Adafactor and opt.param_groups[0]["weight_decay"] == 0.0  # its own default
    for key in ("betas", "eps"):
        with pytest.raises(ValueError, match=rf"^model\.params\.optimizer\.{key}: adafactor .*no such setting"):
            build({"name": "adafactor", key: [0.9, 0.99] if key == "betas" else 1e-8}, unet)
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.args\.relative_step: an argument of "
                                         r"transformers' Adafactor; .*lr 1e-2 is kohya's default"):
        build({"name": "adafactor", "args": {"relative_step": False}}, unet)


def test_adafactor_falls_back_to_transformers_on_an_older_torch(monkeypatch):
    from transformers.optimization import Adafactor
    monkeypatch.delattr(torch.optim, "Adafactor")
    unet, text = parts()
    opt = build({"name": "adafactor", "lr": 1e-1, "args": {"clip_threshold": 2.0}}, unet, text)
    assert type(opt) is Adafactor
    group = opt.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (
        1e-1, False, True, False)  # lr scaled by the parameter's RMS, as torch's does
    assert group["clip_threshold"] == 2.0
    losses = train(opt, unet, text, 30)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name, lr", [("adamw", 1e-2), ("adamw8bit", 1e-2), ("lion", 3e-3), ("prodigy", 1.0),
                                      ("adafactor", 1e-1)])
def test_the_text_encoder_stops_changing_after_text_encoder_stop(fake_bnb, name, lr):
    unet, text = parts()
    cfg = OptimizerConfig.from_mapping({"name": name, "lr": lr, "weight_decay": 0.1, "text_encoder_stop": 0.3,
                                        "scheduler": "cosine"})
    opt = build_optimizer({"unet": unet.parameters(), "text_encoder": text.parameters()}, cfg, "cpu")
    sched = build_scheduler(opt, cfg, total_steps=10)  # the text encoder trains on steps 0, 1, 2
    text_start = [p.detach().clone() for p in text.parameters()]
    train(opt, unet, text, 3, sched)
    assert [g["lr"] for g in opt.param_groups][1] == 0.0 and opt.param_groups[0]["lr"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(text_start, text.parameters()))  # it did train
    text_stopped = [p.detach().clone() for p in text.parameters()]
    unet_stopped = [p.detach().clone() for p in unet.parameters()]
    train(opt, unet, text, 5, sched)
    assert all(torch.equal(a, b) for a, b in zip(text_stopped, text.parameters()))  # weight decay included
    assert all(not torch.equal(a, b) for a, b in zip(unet_stopped, unet.parameters()))
    assert all(p.grad is not None for p in text.parameters())  # gradients are left as they were


def test_text_encoder_stop_without_a_text_encoder_warns():
    unet, _ = parts()
    cfg = OptimizerConfig(text_encoder_stop=5)
    opt = build_optimizer({"unet": unet.parameters()}, cfg, "cpu")
    with pytest.warns(UserWarning, match=r"text_encoder_stop: the text encoder is not trained"):
        build_scheduler(opt, cfg, total_steps=10)


def test_the_adapter_header_names_the_optimizer_as_kohya_does(fake_bnb):
    unet, _ = parts()

    def name(section, device="cpu"):
        cfg = OptimizerConfig.from_mapping(section)
        return _optimizer_name(build_optimizer({"unet": unet.parameters()}, cfg, device), cfg)

    assert name({}) == "torch.optim.adamw.AdamW"
    assert name({"weight_decay": 0.01}, "cuda") == "torch.optim.adamw.AdamW(weight_decay=0.01,fused=True)"
    expected = "bitsandbytes.optim.adamw.AdamW8bit(betas=(0.9, 0.999))"
    assert name({"name": "adamw8bit", "betas": [0.9, 0.999]}) == expected
    assert name({"name": "lion", "weight_decay": 0.1}) == "lion_pytorch.lion_pytorch.Lion(weight_decay=0.1)"
    assert name({"name": "prodigy", "lr": 1.0, "args": {"d_coef": 2}}) == "prodigyopt.prodigy.Prodigy(d_coef=2)"
    assert name({"name": "adafactor", "lr": 1e-2}) == "torch.optim.Adafactor"
    cfg = OptimizerConfig(weight_decay=0.01, betas=(0.9, 0.99), args={"amsgrad": True})
    plain = torch.optim.AdamW(unet.parameters())  # not built here: the section's settings
    assert _optimizer_name(plain, cfg) == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99),amsgrad=True)"
    assert _optimizer_name(None, cfg) is None
