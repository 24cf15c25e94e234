"""scripts/merge_lora.py: a merged checkpoint is the base model with the adapter applied."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.modules.adapters.config import NetworkConfig
from ldm.modules.adapters.files import write_adapter
from ldm.modules.adapters.network import AdapterNetwork
from ldm.util import instantiate_from_config
from scripts.merge_lora import main as merge_main, parse_lora

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/tiny.yaml"


def tiny_model() -> torch.nn.Module:
    cfg = OmegaConf.load(TINY).model
    return instantiate_from_config({"target": cfg.target, "params": cfg.params})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    ckpt_io.save_checkpoint(model.state_dict(), out / "base.safetensors")
    adapters = {}
    for algo in ("locon", "loha", "lokr"):
        net = AdapterNetwork(model, NetworkConfig.from_mapping({"algo": algo, "dim": 2, "alpha": 1, "conv_dim": 2}))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
        write_adapter(out / f"{algo}.safetensors", net.tensors(torch.float32), {"ss_network_dim": "2"})
        net.remove()
        adapters[algo] = out / f"{algo}.safetensors"
    return {"dir": out, "base": out / "base.safetensors", **adapters}


def outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([10, 700]), model.get_learned_conditioning(["a red ring", "meebs"]))


@pytest.mark.parametrize("algo, weight", [("locon", 1.0), ("loha", 0.6), ("lokr", -0.5)])
def test_the_merged_checkpoint_equals_the_base_with_the_adapter_applied(files, algo, weight, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert merge_main(["--ckpt", str(files["base"]), "--lora", f"{files[algo]}:{weight}", "--out", str(out),
                       "--config", str(TINY)]) == 0
    base = tiny_model()
    ckpt_io.load_into_model(base, ckpt_io.load_state_dict(files["base"]))
    plain = outputs(base)
    from ldm.modules.adapters.files import read_adapter

    net = AdapterNetwork(base, NetworkConfig(), read_adapter(files[algo])[0], fresh=False)
    net.set_multiplier(weight)
    adapted = outputs(base)
    net.remove()
    merged = tiny_model()
    report = ckpt_io.load_into_model(merged, ckpt_io.load_state_dict(out))
    assert not report.missing
    assert not torch.allclose(adapted, plain, atol=1e-4)
    assert torch.allclose(outputs(merged), adapted, atol=1e-5)
    assert set(ckpt_io.load_state_dict(out)) == set(ckpt_io.load_state_dict(files["base"]))


def test_two_adapters_merge_in_turn(files, tmp_path):
    out = tmp_path / "both.ckpt"
    assert merge_main(["--ckpt", str(files["base"]), "--lora", str(files["locon"]), "--lora",
                       f"{files['loha']}:0.5", "--out", str(out), "--config", str(TINY)]) == 0
    base = tiny_model()
    ckpt_io.load_into_model(base, ckpt_io.load_state_dict(files["base"]))
    from ldm.modules.adapters.files import read_adapter

    a = AdapterNetwork(base, NetworkConfig(), read_adapter(files["locon"])[0], fresh=False)
    expected = ckpt_io.load_state_dict(files["base"])
    expected = {k: v.clone() for k, v in expected.items()}
    a.merge_into(expected, 1.0)
    a.remove()
    b = AdapterNetwork(base, NetworkConfig(), read_adapter(files["loha"])[0], fresh=False)
    b.merge_into(expected, 0.5)
    b.remove()
    merged = ckpt_io.load_state_dict(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_merge_problems_are_named(files, tmp_path, capsys):
    sdxl = tmp_path / "sdxl.safetensors"
    write_adapter(sdxl, {"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())}, {})
    assert merge_main(["--ckpt", str(files["base"]), "--lora", str(sdxl), "--out", str(tmp_path / "x.ckpt"),
                       "--config", str(TINY)]) == 2
    assert "SDXL" in capsys.readouterr().err
    # the tiny checkpoint has SD 1.x's text-encoder keys but not its sizes: the guessed config is named
    assert merge_main(["--ckpt", str(files["base"]), "--lora", str(files["locon"]), "--out",
                       str(tmp_path / "y.ckpt")]) == 2
    assert "--config" in capsys.readouterr().err
    assert merge_main(["--ckpt", str(files["base"]), "--lora", str(files["locon"]), "--out", str(files["base"]),
                       "--config", str(TINY)]) == 2
    assert "input checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "y.ckpt").exists()


def test_lora_arguments():
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_lora("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_lora("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0)
