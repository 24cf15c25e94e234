"""The objective's options through main.py: a full fine-tune and an adapter run with them all on
(the options one by one: test_noise_loss_options.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm import checkpoint as ckpt_io
from tiny_objective import build

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests/configs/tiny.yaml"
OPTIONS = ["model.params.parameterization=v", "model.params.zero_terminal_snr=true", "model.params.noise_offset=0.06",
           "model.params.multires_noise_iterations=3", "model.params.ip_noise_gamma=0.1",
           "model.params.min_snr_gamma=5", "model.params.loss_type=huber", "model.params.huber_c=0.2",
           "model.params.min_timestep=100", "model.params.max_timestep=900", "lightning.trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from scripts.make_shapes import make_shapes

    out = tmp_path_factory.mktemp("options_inputs")
    make_shapes(out / "shapes", count=8, size=64, seed=0)
    model = build()
    with torch.no_grad():  # zero-initialised layers would pass no gradient back to an adapter
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    ckpt_io.save_checkpoint(model.state_dict(), out / "base.safetensors")
    return {"shapes": out / "shapes", "base": out / "base.safetensors"}


def train(tmp_path, inputs, *configs: str) -> Path:
    from ldm.train import main

    logs = tmp_path / "logs"
    argv = ["--base", str(TINY), str(ROOT / "tests/configs/tiny_run.yaml"), *configs, "-t", "-n", "opts",
            "--actual_resume", str(inputs["base"]), "--data_root", str(inputs["shapes"]), "-l", str(logs), *OPTIONS]
    assert main(argv) == 0
    (run_dir,) = [p for p in logs.iterdir() if p.is_dir()]
    return run_dir


def test_a_full_fine_tune_trains_with_the_options_and_keeps_the_config_schedule(inputs, tmp_path):
    run_dir = train(tmp_path, inputs)
    state = ckpt_io.load_state_dict(run_dir / "checkpoints" / "last.ckpt")
    assert state["alphas_cumprod"][-1].item() == 0.0  # zero terminal SNR, not the loaded file's schedule
    assert state["betas"][-1].item() == 1.0


def test_an_adapter_run_writes_the_options_into_its_header(inputs, tmp_path):
    from ldm.modules.adapters.files import read_adapter

    run_dir = train(tmp_path, inputs, str(ROOT / "tests/configs/tiny_lora.yaml"))
    _, meta = read_adapter(run_dir / "adapters" / "opts.safetensors")
    assert {k: meta.get(k) for k in build().kohya_fields()} == {
        "ss_noise_offset": "0.06", "ss_noise_offset_random_strength": "False",
        "ss_multires_noise_iterations": "3", "ss_multires_noise_discount": "0.3", "ss_ip_noise_gamma": "0.1",
        "ss_min_snr_gamma": "5.0", "ss_zero_terminal_snr": "True", "ss_loss_type": "huber",
        "ss_huber_schedule": "constant", "ss_huber_c": "0.2"}
    assert meta["modelspec.timestep_range"] == "100,900"
    assert meta["modelspec.prediction_type"] == "v"
