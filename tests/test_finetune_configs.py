"""What the shipped fine-tune configs (configs/stable-diffusion/*finetune*.yaml) set beyond
Lightning's and the model's defaults."""
from __future__ import annotations

from pathlib import Path

import pytest

from ldm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = sorted((ROOT / "configs/stable-diffusion").glob("*finetune*.yaml"))


def test_there_are_four():
    assert [p.name for p in FINETUNE] == ["v1-finetune_everydream.yaml", "v1-finetune_micro.yaml",
                                          "v2-finetune_everydream-v.yaml", "v2-finetune_everydream.yaml"]


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.stem)
def test_every_validation_batch_runs_once_before_training(path):
    """Lightning's default sanity check runs 2 validation batches; a failure in a later one
    would stop the run only at the first epoch's end."""
    assert load_config([path]).lightning.trainer.num_sanity_val_steps == -1


SD_CONFIGS = FINETUNE + sorted((ROOT / "configs/lora").glob("*.yaml"))


@pytest.mark.parametrize("path", SD_CONFIGS, ids=lambda p: p.stem)
def test_sample_grids_take_dpm_solver_at_20_steps(path):
    """Half the UNet calls of DDIM at 40 steps; the logger takes the config's params as they are."""
    from ldm.callbacks.image_logger import ImageLogger

    logger = ImageLogger(**load_config([path]).lightning.callbacks.image_logger.params)
    assert (logger.sampler, logger._steps(logger.sampler)) == ("dpmpp_2m", 20)
