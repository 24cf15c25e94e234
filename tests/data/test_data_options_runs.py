"""The caption options, settings files and long prompts through main.py on CPU (the tiny
model): an adapter run records them in its kohya header; a full fine-tune trains with them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint as ckpt_io
from ldm.modules.adapters.files import read_adapter
from ldm.train import main
from ldm.util import instantiate_from_config
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "tests/configs/tiny.yaml", ROOT / "tests/configs/tiny_run.yaml"]
OPTIONS = ["data.params.train.params.shuffle_tags=true", "data.params.train.params.keep_tokens=1",
           "data.params.train.params.tag_dropout=0.1", "model.params.cond_stage_config.params.max_length=150",
           "data.params.train.params.crop_jitter=0.05", "lightning.trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("options_inputs")
    data = out / "shapes"
    for i, path in enumerate(make_shapes(data / "plain", count=6, size=64, seed=0)
                             + make_shapes(data / "flipped", count=6, size=64, seed=1)):
        words = path.stem.rsplit("_", 1)[0].split()  # "a small red circle on a white background"
        path.with_suffix(".txt").write_text(", ".join(["sks shape"] + words[1:4] + [" ".join(words[5:])] * (i % 2)))
    (data / "flipped" / "flip_p.txt").write_text("0.5")
    (data / "flipped" / "loss_scale.txt").write_text("2")
    cfg = OmegaConf.load(CONFIGS[0]).model
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    with torch.no_grad():  # zero-initialised layers of an untrained UNet would pass no gradient back
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    ckpt_io.save_checkpoint(model.state_dict(), out / "base.safetensors")
    return {"data": data, "base": out / "base.safetensors"}


def only_run(logs: Path) -> Path:
    (run_dir,) = [p for p in logs.iterdir() if p.is_dir()]
    return run_dir


def test_an_adapter_run_records_the_data_options(inputs, tmp_path):
    logs = tmp_path / "logs"
    argv = ["--base", *CONFIGS, ROOT / "tests/configs/tiny_lora.yaml", "-t", "-n", "opts",
            "--actual_resume", inputs["base"], "--data_root", inputs["data"], "-l", logs, *OPTIONS]
    assert main([str(a) for a in argv]) == 0
    run_dir = only_run(logs)
    _, meta = read_adapter(run_dir / "adapters" / "opts.safetensors")
    assert (meta["ss_shuffle_caption"], meta["ss_flip_aug"], meta["ss_keep_tokens"]) == ("True", "True", "1")
    assert (meta["ss_caption_dropout_rate"], meta["ss_caption_tag_dropout_rate"]) == ("0.04", "0.1")
    assert meta["ss_max_token_length"] == "150"
    assert (meta["ss_random_crop"], meta["ss_color_aug"]) == ("True", "False")  # crop_jitter is kohya's random crop
    plan = json.loads((run_dir / "dataset_plan.json").read_text())
    (settings,) = plan["folder_settings"]  # training images only: val_split holds some out
    assert settings == {"folder": "flipped", "images": settings["images"], "flip_p": 0.5, "loss_scale": 2.0}
    assert 0 < settings["images"] <= 6
    assert plan["kohya"]["fields"]["ss_shuffle_caption"] == "True"


def test_a_full_fine_tune_trains_with_the_options(inputs, tmp_path):
    logs = tmp_path / "logs"
    argv = ["--base", *CONFIGS, "-t", "-n", "full", "--actual_resume", inputs["base"], "--data_root", inputs["data"],
            "-l", logs, "model.params.cond_stage_trainable=true", *OPTIONS]
    assert main([str(a) for a in argv]) == 0
    state = ckpt_io.load_checkpoint_file(only_run(logs) / "checkpoints" / "last.ckpt")["state_dict"]
    base = ckpt_io.load_checkpoint_file(inputs["base"])
    base = base.get("state_dict", base)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[key].float(), base[key].float())  # the text encoder trained through the chunks
