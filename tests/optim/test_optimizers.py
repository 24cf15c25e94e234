import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.optim import OPTIMIZERS, OptimizerConfig, build_optimizer, build_scheduler, import_optional
from ldm.util import ConfigError

SECTION = dict(name="adamw", lr=1e-6, text_encoder_lr=None, text_encoder_stop=None, weight_decay=None, betas=None,
               eps=None, args={}, scheduler="constant", warmup=0, num_cycles=1, power=1.0, min_lr_ratio=0.0)


def parts():
    torch.manual_seed(0)
    return nn.Linear(4, 4), nn.Linear(4, 2)  # stand-ins for the UNet and the text encoder


def test_the_documented_section_parses():
    cfg = OptimizerConfig.from_mapping(SECTION)
    assert cfg == OptimizerConfig()  # the section above is the default
    set_ = OptimizerConfig.from_mapping(
        {"weight_decay": 0, "betas": [0.9, 0.99], "eps": 1e-6, "text_encoder_stop": 0.5})
    assert (set_.weight_decay, set_.betas, set_.eps, set_.text_encoder_stop) == (0.0, (0.9, 0.99), 1e-6, 0.5)


def test_omegaconf_section_and_missing_section():
    node = OmegaConf.create({"model": {"params": {"optimizer": {"name": "AdamW", "lr": 2e-6, "warmup": 0.05}}}})
    cfg = OptimizerConfig.from_mapping(node.model.params.optimizer)
    assert (cfg.name, cfg.lr, cfg.warmup, cfg.weight_decay) == ("adamw", 2e-6, 0.05, None)
    assert OptimizerConfig.from_mapping(None) == OptimizerConfig()


@pytest.mark.parametrize("section, key", [
    ({"learning_rate": 1e-6}, "model.params.optimizer: unknown key(s) learning_rate"),
    ({"name": "sgd"}, "model.params.optimizer.name: unknown optimizer 'sgd'"),
    ({"lr": 0}, "model.params.optimizer.lr:"),
    ({"lr": "1e-6"}, "model.params.optimizer.lr:"),
    ({"text_encoder_lr": -1.0}, "model.params.optimizer.text_encoder_lr:"),
    ({"weight_decay": -0.1}, "model.params.optimizer.weight_decay:"),
    ({"betas": [0.9]}, "model.params.optimizer.betas:"),
    ({"betas": [0.9, 1.0]}, "model.params.optimizer.betas:"),
    ({"eps": 0}, "model.params.optimizer.eps:"),
    ({"args": [1, 2]}, "model.params.optimizer.args:"),
    ({"scheduler": "onecycle"}, "model.params.optimizer.scheduler:"),
    ({"warmup": 2.0}, "model.params.optimizer.warmup:"),
    ({"num_cycles": 0}, "model.params.optimizer.num_cycles:"),
    ({"power": -1}, "model.params.optimizer.power:"),
    ({"text_encoder_stop": 0}, "model.params.optimizer.text_encoder_stop:"),
    ({"text_encoder_stop": 1.0}, "model.params.optimizer.text_encoder_stop:"),
    ({"text_encoder_stop": -0.5}, "model.params.optimizer.text_encoder_stop:"),
    ({"text_encoder_stop": "100"}, "model.params.optimizer.text_encoder_stop:"),
    ({"text_encoder_stop": True}, "model.params.optimizer.text_encoder_stop:"),
])
def test_bad_sections_name_the_key(section, key):
    with pytest.raises(ValueError) as e:
        OptimizerConfig.from_mapping(section)
    assert str(e.value).startswith(key)


def test_adamw_with_one_group_per_part():
    unet, text = parts()
    cfg = OptimizerConfig.from_mapping({"lr": 1e-4, "text_encoder_lr": 1e-5, "weight_decay": 0.02,
                                        "betas": [0.8, 0.99], "eps": 1e-7})
    opt = build_optimizer({"unet": unet.parameters(), "text_encoder": text.parameters()}, cfg, "cpu")
    assert type(opt) is torch.optim.AdamW
    unet_group, text_group = opt.param_groups
    assert (unet_group["name"], unet_group["lr"]) == ("unet", 1e-4)
    assert (text_group["name"], text_group["lr"]) == ("text_encoder", 1e-5)
    assert unet_group["params"] == list(unet.parameters()) and text_group["params"] == list(text.parameters())
    for g in opt.param_groups:
        assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.99), 1e-7, 0.02)
        assert not g["fused"]  # fused only on CUDA


def test_unset_settings_keep_the_optimizers_defaults():
    unet, _ = parts()
    opt = build_optimizer({"unet": unet.parameters()}, OptimizerConfig(), "cpu")
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01)  # torch's AdamW
    assert opt.built_with == {}  # nothing passed besides params and lr


def test_text_encoder_lr_falls_back_to_lr_and_empty_parts_are_skipped():
    unet, text = parts()
    opt = build_optimizer({"unet": unet.parameters(), "text_encoder": text.parameters()},
                          OptimizerConfig(lr=3e-6), "cpu")
    assert [g["lr"] for g in opt.param_groups] == [3e-6, 3e-6]
    opt = build_optimizer({"unet": unet.parameters(), "text_encoder": []}, OptimizerConfig(), "cpu")
    assert [g["name"] for g in opt.param_groups] == ["unet"]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer({"unet": []}, OptimizerConfig(), "cpu")
    with pytest.raises(ValueError, match="unknown param group"):
        build_optimizer({"vae": unet.parameters()}, OptimizerConfig(), "cpu")


def test_fused_on_cuda():
    unet, _ = parts()  # torch also has a CPU kernel for fused AdamW, so CPU tensors can stand in
    opt = build_optimizer({"unet": unet.parameters()}, OptimizerConfig(), "cuda")
    assert opt.param_groups[0]["fused"] is True and opt.built_with == {"fused": True}
    opt = build_optimizer({"unet": unet.parameters()}, OptimizerConfig(args={"fused": False}), "cuda")
    assert not opt.param_groups[0]["fused"]  # args override the default


def test_args_reach_the_optimizer_and_are_checked():
    unet, _ = parts()
    opt = build_optimizer({"unet": unet.parameters()}, OptimizerConfig(args={"amsgrad": True}), "cpu")
    assert opt.param_groups[0]["amsgrad"] is True
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.args\.momentum: not an argument of AdamW"):
        build_optimizer({"unet": unet.parameters()}, OptimizerConfig(args={"momentum": 0.9}), "cpu")
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.args\.lr: set it as .*optimizer\.lr inst"):
        build_optimizer({"unet": unet.parameters()}, OptimizerConfig(args={"lr": 1.0}), "cpu")


def test_adamw_step_decreases_a_loss():
    unet, _ = parts()
    opt = build_optimizer({"unet": unet.parameters()}, OptimizerConfig(lr=1e-2), "cpu")
    x, y = torch.randn(16, 4), torch.randn(16, 4)
    losses = []
    for _ in range(20):
        loss = (unet(x) - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0]


def test_build_scheduler_uses_the_config():
    unet, text = parts()
    cfg = OptimizerConfig.from_mapping({"lr": 1e-4, "text_encoder_lr": 1e-5, "scheduler": "linear", "warmup": 0.5})
    opt = build_optimizer({"unet": unet.parameters(), "text_encoder": text.parameters()}, cfg, "cpu")
    sched = build_scheduler(opt, cfg, total_steps=4)  # 2 warm-up steps, then 2 decay steps
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [u for u, _ in lrs] == pytest.approx([0, 5e-5, 1e-4, 5e-5, 0])
    assert [t for _, t in lrs] == pytest.approx([0, 5e-6, 1e-5, 5e-6, 0])


def test_optional_packages_name_their_pip_extra():
    assert import_optional("math", "unused").sqrt(4.0) == 2.0
    with pytest.raises(ValueError, match=r'pip install "everydream-ldm\[lion\]"') as e:
        import_optional("surely_not_an_installed_module_xyz", "lion")
    assert str(e.value).startswith("model.params.optimizer.name:")


@pytest.mark.parametrize("name, module, extra", [
    ("adamw8bit", "bitsandbytes", "adamw8bit"), ("adamw8bit_bf16", "bitsandbytes", "adamw8bit"),
    ("lion", "lion_pytorch", "lion"), ("prodigy", "prodigyopt", "prodigy"),
])
def test_reading_the_section_stops_on_a_missing_optional_package(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: its import fails
    with pytest.raises(ConfigError, match=rf"^model.params.optimizer.name: .*'{module}' \(not installed\); "
                                          rf'install it with: pip install "everydream-ldm\[{extra}\]"'):
        OptimizerConfig.from_mapping({"name": name})
    assert OptimizerConfig.from_mapping({"name": "adamw"}).name == "adamw"  # the others need nothing


def test_registry_holds_builders_by_lowercase_name():
    assert set(OPTIMIZERS) == {"adamw", "adamw8bit", "adamw_bf16", "adamw8bit_bf16", "adamw_master",
                               "lion", "prodigy", "adafactor"}
    assert all(callable(b) and name == name.lower() for name, b in OPTIMIZERS.items())
