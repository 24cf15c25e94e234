"""InterruptCheckpoint: what a run that stops on an error keeps, and when there is nothing to keep."""
from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch

from ldm.callbacks.checkpointing import InterruptCheckpoint


class _Failing(pl.LightningModule):
    """A tiny module whose training fails at optimizer step `fail_at` (None: never), or in
    configure_optimizers when `fail_in_setup`."""

    def __init__(self, fail_at: int | None = None, fail_in_setup: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.fail_at, self.fail_in_setup = fail_at, fail_in_setup

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_at:
            raise RuntimeError(f"failed at step {self.fail_at}")
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)

    def configure_optimizers(self):
        if self.fail_in_setup:
            raise RuntimeError("bad optimizer settings")
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit(root, model: _Failing, max_steps: int = 3, ckpt_path=None) -> None:
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=root,
                         callbacks=[InterruptCheckpoint(root / "checkpoints")])
    trainer.fit(model, ckpt_path=ckpt_path)


def test_an_error_after_some_steps_saves_them_and_names_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="failed at step 2"):
        _fit(tmp_path, _Failing(fail_at=2))
    saved = tmp_path / "checkpoints" / "errored-epoch=00-step=00002.ckpt"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [saved.name]
    ckpt = torch.load(saved, weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"]


@pytest.mark.parametrize("failing", [{"fail_in_setup": True}, {"fail_at": 0}], ids=["setup", "first step"])
def test_an_error_before_the_first_optimizer_step_writes_no_checkpoint(tmp_path, caplog, failing):
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError):
        _fit(tmp_path, _Failing(**failing))
    assert not list(tmp_path.rglob("*.ckpt"))  # a copy of the starting weights would be gigabytes for nothing
    assert "No checkpoint saved: the run stopped before its first optimizer step (step 0)" in caplog.text


def test_a_resumed_run_that_fails_at_once_keeps_only_the_file_it_resumed_from(tmp_path):
    first = tmp_path / "first"
    with pytest.raises(RuntimeError):
        _fit(first, _Failing(fail_at=2))
    resumed_from = first / "checkpoints" / "errored-epoch=00-step=00002.ckpt"
    with pytest.raises(RuntimeError, match="failed at step 2"):  # the restored step: nothing new ran
        _fit(tmp_path / "second", _Failing(fail_at=2), max_steps=6, ckpt_path=resumed_from)
    assert not list((tmp_path / "second").rglob("*.ckpt"))
    with pytest.raises(RuntimeError, match="failed at step 4"):  # two steps after the resume: saved
        _fit(tmp_path / "third", _Failing(fail_at=4), max_steps=6, ckpt_path=resumed_from)
    assert [p.name for p in (tmp_path / "third" / "checkpoints").iterdir()] == ["errored-epoch=01-step=00004.ckpt"]
