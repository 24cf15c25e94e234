"""Adapter training through main.py on CPU: the tiny model, a LoRA, two short epochs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.modules.adapters.config import base_dtype
from ldm.modules.adapters.files import read_adapter, safetensors_hashes
from ldm.train import main
from ldm.util import instantiate_from_config
from run_folders import stopped_at
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--base", str(ROOT / "tests/configs/tiny.yaml"), str(ROOT / "tests/configs/tiny_run.yaml"),
        str(ROOT / "tests/configs/tiny_lora.yaml")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapter_inputs")
    make_shapes(out / "shapes", count=12, size=64, seed=0)
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    with torch.no_grad():  # a trained UNet has no zero layers; zero-initialised ones pass no gradient back
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    ckpt_io.save_checkpoint(model.state_dict(), out / "base.safetensors")
    return {"shapes": out / "shapes", "base": out / "base.safetensors"}


def run(*argv) -> int:
    return main([str(a) for a in argv])


def only_run(logs: Path) -> Path:
    (run_dir,) = [p for p in logs.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def lora_run(inputs, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    assert run(*BASE, "-t", "-n", "meebs", "--actual_resume", inputs["base"], "--data_root", inputs["shapes"],
               "-l", logs, "model.params.network.training_comment=50c 36i") == 0
    return only_run(logs)


def test_adapter_files_every_epoch_and_at_the_end(lora_run):
    names = sorted(p.name for p in (lora_run / "adapters").iterdir())
    assert names == ["meebs-000001.safetensors", "meebs-000002.safetensors", "meebs.safetensors"]
    tensors, meta = read_adapter(lora_run / "adapters" / "meebs.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    modules = {k.partition(".")[0] for k in tensors}
    assert len(modules) == len(tensors) // 3  # lora_down, lora_up, alpha each
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))  # it trained
    final = read_adapter(lora_run / "adapters" / "meebs-000002.safetensors")[0]
    assert all(torch.equal(final[k], tensors[k]) for k in tensors)  # the last epoch's file is the final state


def test_adapter_header_is_kohya_s(lora_run, inputs):
    tensors, meta = read_adapter(lora_run / "adapters" / "meebs.safetensors")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "meebs" and meta["modelspec.title"] == "meebs"
    assert meta["ss_training_comment"] == "50c 36i"
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == ("10", "2", "2")
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_seed"] == "23" and meta["ss_batch_size_per_device"] == "2"
    assert json.loads(meta["ss_dataset_dirs"])
    assert json.loads(meta["ss_tag_frequency"])
    assert meta["ss_mixed_precision"] == "no"
    assert meta["sshs_model_hash"] == safetensors_hashes(tensors, meta)["sshs_model_hash"]
    import hashlib
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(inputs["base"].read_bytes()).hexdigest()


def test_checkpoints_hold_the_adapter_only(lora_run, inputs):
    ckpt = ckpt_io.load_checkpoint_file(lora_run / "checkpoints" / "last.ckpt")
    assert ckpt["adapter_only"] is True
    assert {"noise_rng_state", "host_rng_state"} <= set(ckpt)  # both random streams resume
    assert ckpt["state_dict"] and all(k.startswith("network.") for k in ckpt["state_dict"])
    adapter = read_adapter(lora_run / "adapters" / "meebs.safetensors")[0]
    assert {k[len("network."):] for k in ckpt["state_dict"]} == set(adapter)
    assert (lora_run / "checkpoints" / "last.ckpt").stat().st_size < 2 * 2**20
    saved = json.loads(next((lora_run / "configs").glob("*-cli.json")).read_text())
    assert saved["actual_resume"] == str(inputs["base"].resolve())
    assert list((lora_run / "images" / "train").glob("*.png"))  # samples of the adapted model


@pytest.mark.slow
def test_resuming_an_adapter_run_ends_with_the_same_adapter(lora_run, tmp_path):
    ckpt = stopped_at(lora_run, "epoch=00-step=00005.ckpt", tmp_path)
    copy = ckpt.parent.parent
    assert run("-r", ckpt) == 0  # the base comes from the saved flag
    resumed = read_adapter(copy / "adapters" / "meebs.safetensors")[0]
    straight = read_adapter(lora_run / "adapters" / "meebs.safetensors")[0]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_network_weights_continue_from_a_file(lora_run, inputs, tmp_path, capsys):
    start = lora_run / "adapters" / "meebs.safetensors"
    logs = tmp_path / "logs"
    assert run(*BASE, "-n", "more", "--actual_resume", inputs["base"], "--data_root", inputs["shapes"],
               "-l", logs, "--network_weights", start) == 0  # without -t: builds the model and stops
    assert "96 UNet" not in capsys.readouterr().err
    from ldm.modules.adapters.config import NetworkConfig
    from ldm.modules.adapters.network import AdapterNetwork

    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    tensors = read_adapter(start)[0]
    net = AdapterNetwork(model, NetworkConfig(dim=4, alpha=2), tensors, str(start))
    assert all(torch.equal(v.half(), tensors[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("argv, message", [
    (["--network_weights", "missing.safetensors"], "no such file"),
    (["model.params.network.algo=dora"], "model.params.network.algo"),
    (["model.params.use_ema=true"], "use_ema"),
])
def test_bad_adapter_inputs_are_named(inputs, tmp_path, capsys, argv, message):
    assert run(*BASE, "-t", "--actual_resume", inputs["base"], "--data_root", inputs["shapes"],
               "-l", tmp_path / "logs", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_network_weights_need_an_adapter_config(inputs, tmp_path, capsys):
    plain = BASE[:-1]
    assert run(*plain, "--data_root", inputs["shapes"], "-l", tmp_path, "--network_weights", inputs["base"]) == 2
    assert "no model.params.network section" in capsys.readouterr().err


def test_a_bad_network_file_is_named(inputs, tmp_path, capsys):
    bad = tmp_path / "other.safetensors"
    ckpt_io.save_checkpoint({"lora_unet_nothing_here.alpha": torch.ones(())}, bad)
    assert run(*BASE, "--data_root", inputs["shapes"], "-l", tmp_path / "logs", "--network_weights", bad) == 2
    err = capsys.readouterr().err
    assert "other.safetensors" in err and "lora_unet_nothing_here" in err


def test_resuming_an_adapter_run_needs_its_base(lora_run, tmp_path, capsys):
    copy = tmp_path / lora_run.name
    shutil.copytree(lora_run, copy)
    for f in (copy / "configs").glob("*-cli.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "actual_resume": None}))
    assert run("-r", copy) == 2
    assert "--actual_resume" in capsys.readouterr().err


def test_the_frozen_base_follows_the_autocast_dtype():
    assert base_dtype("auto", "bf16-mixed") is torch.bfloat16
    assert base_dtype("auto", "16-mixed") is torch.float16
    assert base_dtype("auto", "32-true") is torch.float32
    assert base_dtype("fp16", "32-true") is torch.float16


def test_bf16_adapter_training_keeps_a_bf16_base_and_fp32_adapters(inputs, tmp_path):
    logs = tmp_path / "logs"
    assert run(*BASE, "-t", "--actual_resume", inputs["base"], "--data_root", inputs["shapes"], "-l", logs,
               "lightning.trainer.precision=bf16-mixed", "lightning.trainer.max_steps=2",
               "lightning.trainer.max_epochs=1", "model.params.network.algo=loha",
               "model.params.network.save_precision=bf16",
               "lightning.callbacks.image_logger.params.batch_frequency=100") == 0
    tensors, meta = read_adapter(only_run(logs) / "adapters" / "adapter.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["ss_mixed_precision"] == "bf16"


def test_a_regularisation_folder_is_reported_and_recorded(inputs, tmp_path, capsys):
    reg = tmp_path / "reg"
    make_shapes(reg / "1_shape", count=4, size=64, seed=3)
    logs = tmp_path / "logs"
    assert run(*BASE, "-t", "--actual_resume", inputs["base"], "--data_root", inputs["shapes"], "-l", logs,
               "--reg_data_root", reg, "data.params.train.params.prior_loss_weight=0.5",
               "lightning.trainer.max_epochs=1", "lightning.callbacks.image_logger.params.batch_frequency=100") == 0
    assert "doubled by the regularisation images" in capsys.readouterr().out
    meta = read_adapter(only_run(logs) / "adapters" / "adapter.safetensors")[1]
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 4}}
    assert meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == "0.5"
    assert meta["ss_num_batches_per_epoch"] == "9"  # 9 training + 9 regularisation samples, batches of 2


def test_the_loss_is_weighted_per_sample():
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def loss(weights):
        model.noise_rng = torch.Generator().manual_seed(0)
        return model.shared_step({"image": images, "caption": ["a", "b"], "loss_weight": torch.tensor(weights)})

    both, first, none = loss([1.0, 1.0]), loss([1.0, 0.0]), loss([0.0, 0.0])
    second = loss([0.0, 1.0])
    assert none == 0 and torch.allclose(first + second, both) and not torch.allclose(first, second)


def test_pruning_an_adapter_checkpoint_points_to_the_adapter_files(lora_run, tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.prune import prune_checkpoint

    with pytest.raises(CheckpointError, match="adapters"):
        prune_checkpoint(lora_run / "checkpoints" / "last.ckpt", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
