"""Adapter modules and the network: the math checked against how the loaders rebuild ΔW."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ldm.modules.adapters.config import NetworkConfig
from ldm.modules.adapters.modules import LoHa, LoKr, LoRA, factorization, from_tensors
from ldm.modules.adapters.network import AdapterError, AdapterNetwork
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def loader_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW the way AUTOMATIC1111 and ComfyUI rebuild it from a file's tensors (research notes
    §1.2), written independently of ldm.modules.adapters: flattened products, alpha / rank."""
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        w, rank = torch.mm(up.flatten(1), down.flatten(1)), down.shape[0]
    elif "hada_w1_a" in t:
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        rank = t["hada_w1_b"].shape[0]
    else:
        w1 = t["lokr_w1"]
        if "lokr_w2" in t:
            w2, rank = t["lokr_w2"], None
        else:
            w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        w = torch.kron(w1, w2)
    scale = alpha / rank if alpha and rank else 1.0
    return w.reshape(shape) * scale


LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv3x3": lambda: nn.Conv2d(16, 12, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 12, 1),
    "conv_stride2": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1),
}


def inputs(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features)
    return torch.randn(2, layer.in_channels, 8, 8)


def randomise(adapter: nn.Module) -> None:
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)


def reference(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    w = layer.weight + multiplier * delta
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("make", [lambda l: LoRA(l, 4, 2.0), lambda l: LoHa(l, 3, 1.5),
                                  lambda l: LoKr(l, 2, 1.0), lambda l: LoKr(l, 64, 64.0)],
                         ids=["lora", "loha", "lokr_low_rank", "lokr_full_w2"])
def test_forward_equals_the_weight_the_loaders_rebuild(kind, make):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    adapter = make(layer)
    x = inputs(layer)
    before = layer(x)
    adapter.apply_to(layer)
    assert torch.allclose(layer(x), before), "ΔW must start at zero"
    randomise(adapter)
    tensors = dict(adapter.state_dict())
    expected = reference(layer, x, loader_delta(tensors, layer.weight.shape), 0.7)
    adapter.multiplier = 0.7
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert not torch.allclose(layer(x), before, atol=1e-3)
    assert torch.allclose(adapter.delta_weight(), loader_delta(tensors, layer.weight.shape), atol=1e-6)
    adapter.remove()
    assert torch.equal(layer(x), before)


def test_lora_shapes_are_kohya_s():
    conv = LoRA(nn.Conv2d(2560, 1280, 3, padding=1), 8, 4.0)
    assert conv.lora_down.weight.shape == (8, 2560, 3, 3) and conv.lora_up.weight.shape == (1280, 8, 1, 1)
    lin = LoRA(nn.Linear(768, 3072), 8, 4.0)
    assert lin.lora_down.weight.shape == (8, 768) and lin.lora_up.weight.shape == (3072, 8)
    assert conv.state_dict()["alpha"].shape == ()
    hada = LoHa(nn.Conv2d(16, 12, 3), 4, 4.0)
    assert hada.hada_w1_a.shape == (12, 4) and hada.hada_w1_b.shape == (4, 16 * 9)


def test_factorization():
    assert factorization(320) == (16, 20) and factorization(1280) == (32, 40) and factorization(127) == (1, 127)
    assert factorization(320, 4) == (4, 80) and factorization(768, 8) == (8, 96)


@pytest.mark.parametrize("make", [lambda l: LoRA(l, 4, 2.0), lambda l: LoHa(l, 3, None),
                                  lambda l: LoKr(l, 2, 1.0), lambda l: LoKr(l, 64, 3.0)])
def test_an_adapter_rebuilt_from_its_tensors_is_the_same(make):
    torch.manual_seed(1)
    layer = nn.Conv2d(16, 12, 3, padding=1)
    adapter = make(layer)
    randomise(adapter)
    again = from_tensors(layer, dict(adapter.state_dict()))
    assert type(again) is type(adapter)
    assert torch.allclose(again.delta_weight(), adapter.delta_weight())


@pytest.mark.parametrize("make", [lambda l: LoRA(l, 4, 2.0), lambda l: LoHa(l, 4, 2.0)], ids=["lora", "loha"])
def test_a_loaded_alpha_is_the_one_the_forward_uses(make):
    """alpha is kept as a Python number for the forward; loading a state dict (a resumed run,
    another file's tensors) must update it, or the adapter would train at the old scale."""
    torch.manual_seed(2)
    layer, x = nn.Linear(24, 40), torch.randn(2, 5, 24)
    adapter = make(layer)
    randomise(adapter)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    state["alpha"] = torch.tensor(0.5)
    adapter.load_state_dict(state)
    assert adapter.scale == 0.5 / 4
    adapter.apply_to(layer)
    expected = reference(layer, x, loader_delta(state, layer.weight.shape))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_tensor_that_does_not_fit_names_itself():
    layer = nn.Linear(8, 8)
    tensors = dict(LoRA(nn.Linear(8, 16), 4, 4.0).state_dict())
    with pytest.raises(ValueError, match="lora_up.weight"):
        from_tensors(layer, tensors)
    with pytest.raises(ValueError, match="dora_scale"):
        from_tensors(layer, {**dict(LoRA(layer, 2, 1.0).state_dict()), "dora_scale": torch.ones(8)})


def test_dropouts_only_while_training_and_from_the_given_generator():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    adapter = LoRA(layer, 8, 8.0, dropout=0.5, rank_dropout=0.5)
    adapter.apply_to(layer)
    randomise(adapter)
    x = torch.randn(4, 16)
    adapter.eval()
    clean = layer(x)
    assert torch.allclose(clean, reference(layer, x, adapter.delta_weight()), atol=1e-5)
    adapter.train()
    adapter.generator = torch.Generator().manual_seed(3)
    a = layer(x)
    adapter.generator = torch.Generator().manual_seed(3)
    assert torch.equal(layer(x), a)
    assert not torch.allclose(a, clean, atol=1e-3)
    skip = LoRA(nn.Linear(4, 4), 2, 2.0, module_dropout=1.0)
    base = nn.Linear(4, 4)
    skip.apply_to(base)
    randomise(skip)
    y = torch.randn(3, 4)
    skip.train()
    assert torch.equal(base(y), F.linear(y, base.weight, base.bias))


def test_half_precision_base_with_fp32_adapter():
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    adapter = LoRA(layer, 4, 4.0)
    randomise(adapter)
    adapter.apply_to(layer)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert adapter.lora_up.weight.grad is not None and adapter.lora_up.weight.dtype == torch.float32


# ---- the network on models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    with torch.no_grad():  # the UNet's zero-initialised output layers would hide every difference
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return model


def test_network_trains_only_adapters_and_round_trips_through_its_tensors(tiny):
    net = AdapterNetwork(tiny, NetworkConfig(algo="loha", dim=2, alpha=1, conv_dim=2))
    try:
        groups = net.param_groups()
        assert groups["unet"] and groups["text_encoder"]
        assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in net.state_dict())
        randomise(net)
        tensors = net.tensors(torch.float32)
    finally:
        net.remove()
    again = AdapterNetwork(tiny, NetworkConfig(algo="lora", dim=8, targets=["unet"]), tensors, "file")
    try:
        assert sorted(again.paths) == sorted(net.paths)  # the file's modules, with the file's algorithm
        assert all(a.algo == "loha" for _, a in again.adapters())
        for key, adapter in again.adapters():
            assert torch.allclose(adapter.delta_weight(), getattr(net, key).delta_weight())
    finally:
        again.remove()


def test_compvis_named_keys_load_and_unknown_keys_are_named(tiny):
    from ldm.modules.adapters.names import compvis_key

    net = AdapterNetwork(tiny, NetworkConfig(targets=["unet"], dim=2))
    tensors = net.tensors(torch.float32)
    paths = dict(net.paths)
    net.remove()
    renamed = {}
    for name, t in tensors.items():
        key, _, rest = name.partition(".")
        renamed[compvis_key(paths[key]) + "." + rest] = t
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    again = AdapterNetwork(tiny, NetworkConfig(targets=["unet"], dim=2), renamed, "compvis.safetensors")
    assert sorted(again.paths) == sorted(paths)
    again.remove()
    with pytest.raises(AdapterError, match=r"bad\.safetensors.*SDXL"):
        AdapterNetwork(tiny, NetworkConfig(), {"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())},
                       "bad.safetensors")


def test_merge_into_a_state_dict_equals_the_adapted_forward(tiny):
    torch.manual_seed(2)
    net = AdapterNetwork(tiny, NetworkConfig(algo="locon", dim=2))
    randomise(net)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    ctx = tiny.get_learned_conditioning(["a red square"])
    with torch.no_grad():
        adapted = tiny.apply_model(x, t, ctx)
    merged = {k: v.clone() for k, v in tiny.state_dict().items() if not k.startswith("network.")}
    assert net.merge_into(merged, 1.0) == len(net.paths)
    net.remove()
    with torch.no_grad():
        plain = tiny.apply_model(x, t, ctx)
        saved = {k: v.clone() for k, v in tiny.state_dict().items()}
        tiny.load_state_dict(merged, strict=False)
        ctx2 = tiny.get_learned_conditioning(["a red square"])
        out = tiny.apply_model(x, t, ctx2)
        tiny.load_state_dict(saved, strict=False)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    assert torch.allclose(out, adapted, atol=1e-5)


@pytest.mark.parametrize("node, message", [
    ({"algo": "dora"}, "network.algo"), ({"dim": 0}, "network.dim"), ({"rank": 4}, "unknown key"),
    ({"algo": "lora", "conv_dim": 4}, "use algo: locon"), ({"targets": ["vae"]}, "network.targets"),
    ({"save_precision": "fp8"}, "network.save_precision"), ({"output_name": "a/b"}, "network.output_name"),
])
def test_bad_network_settings_name_the_key(node, message):
    with pytest.raises(ConfigError, match=message):
        NetworkConfig.from_mapping(node)


def test_conv_alpha_defaults_keep_the_alpha_ratio():
    cfg = NetworkConfig.from_mapping({"algo": "locon", "dim": 16, "alpha": 8, "conv_dim": 4})
    assert cfg.conv_rank == (4, 2.0)
    assert NetworkConfig.from_mapping({"algo": "locon", "dim": 16, "alpha": 8}).conv_rank == (16, 8.0)
    module, args = NetworkConfig.from_mapping({"algo": "loha", "conv_dim": 4, "conv_alpha": 1}).kohya_module_and_args()
    assert module == "lycoris.kohya" and args == {"conv_dim": "4", "conv_alpha": "1", "algo": "loha"}


def test_a_file_may_adapt_layers_beyond_kohya_s_sets(tiny):
    """LyCORIS' `full` preset also writes conv_in, conv_out and the time embedding."""
    torch.manual_seed(3)
    unet = tiny.model.diffusion_model
    extra = {}
    for key, layer in (("lora_unet_conv_in", unet.input_blocks[0][0]), ("lora_unet_time_embedding_linear_1",
                                                                         unet.time_embed[0])):
        adapter = LoRA(layer, 2, 1.0)
        randomise(adapter)
        extra.update({f"{key}.{k}": v for k, v in adapter.state_dict().items()})
    net = AdapterNetwork(tiny, NetworkConfig(targets=["unet"]), extra, "full.safetensors", fresh=False)
    try:
        assert net.paths == {"lora_unet_conv_in": "model.diffusion_model.input_blocks.0.0",
                             "lora_unet_time_embedding_linear_1": "model.diffusion_model.time_embed.0"}
        assert net.tensors(torch.float32).keys() == extra.keys()
    finally:
        net.remove()


def test_module_dropout_reads_nothing_back_from_the_device(monkeypatch):
    """The skip decision stays a device tensor: no .item() (a host sync per adapter per step)."""
    layer = nn.Linear(4, 4)
    adapter = LoRA(layer, 2, 2.0, module_dropout=0.5)
    adapter.apply_to(layer)
    randomise(adapter)
    adapter.train()
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("host sync")))
    adapter.generator = torch.Generator().manual_seed(0)
    outs = [layer(torch.ones(1, 4)) for _ in range(20)]
    skipped = sum(torch.equal(o, F.linear(torch.ones(1, 4), layer.weight, layer.bias)) for o in outs)
    assert 3 <= skipped <= 17  # about half the steps skip the adapter
