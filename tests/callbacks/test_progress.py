"""The progress bar: the run's ETA, and no read-back of GPU metrics at every step, nor a wait for one
when it refreshes during training."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.progress import LaggedRead, RunProgressBar, run_eta


def test_run_eta_text():
    assert run_eta(10, 100, 20.0, 10) == "10/100 ETA 0:03:00"
    assert run_eta(0, 100, 0.0, 0) == "0/100"
    assert run_eta(5, float("inf"), 1.0, 5) == "5"


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_bar_reads_metrics_every_refresh_not_every_step(tmp_path):
    bar = RunProgressBar()
    calls = []
    original = bar.get_metrics
    bar.get_metrics = lambda trainer, module: calls.append(trainer.global_step) or original(trainer, module)
    trainer = pl.Trainer(max_steps=40, callbacks=[bar], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, log_every_n_steps=1000, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(80, 4)), batch_size=2))
    training_reads = [s for s in calls if s > 0]
    assert 3 <= len(training_reads) <= 6, calls  # every 10th step, plus the epoch's end


class TinyUnshown(Tiny):
    """Logs its loss as LatentDiffusion does: on step and epoch, not as a progress-bar metric."""

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss


def read_backs(tmp_path, monkeypatch, module) -> tuple[int, list[dict]]:
    """Tensor-to-number conversions during a 40-step fit, and what the bar showed."""
    reads, real_item, real_float = [], torch.Tensor.item, torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    bar, shown = RunProgressBar(), []
    original = bar.get_metrics
    bar.get_metrics = lambda trainer, module: shown.append(original(trainer, module)) or shown[-1]
    trainer = pl.Trainer(max_steps=40, callbacks=[bar], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, log_every_n_steps=1000, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(80, 4)), batch_size=2))
    monkeypatch.undo()
    return len(reads), shown


def test_the_loss_is_read_back_when_the_bar_refreshes_not_every_step(tmp_path, monkeypatch):
    """Lightning turns prog_bar metrics into numbers after every batch (a host sync per step on
    a GPU); the loss reaches the bar from the callback metrics, read at each refresh only."""
    assert read_backs(tmp_path, monkeypatch, Tiny())[0] >= 40  # prog_bar=True: every step
    reads, shown = read_backs(tmp_path, monkeypatch, TinyUnshown())
    assert 3 <= reads <= 10, reads  # the refreshes (every 10th step, the epoch's end), not 40
    losses = [m["train/loss_step"] for m in shown if "train/loss_step" in m]
    assert len(losses) >= 3 and all(isinstance(v, float) for v in losses)


def test_the_models_log_no_training_metric_into_lightnings_progress_bar(monkeypatch):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load("tests/configs/tiny.yaml").model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    logged = []
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.append((name, kw.get("prog_bar", False))))
    model.on_fit_start()
    batch = model.on_before_batch_transfer({"image": torch.rand(2, 3, 32, 32) * 2 - 1, "caption": ["a", "b"]}, 0)
    model.training_step(batch, 0)
    assert ("train/loss", False) in logged and not any(prog_bar for _, prog_bar in logged)


class FakeEvent:
    """A CUDA event stand-in: `done` says whether the GPU has reached it."""
    done = False

    def record(self):
        pass

    def query(self):
        return FakeEvent.done

    def synchronize(self):
        FakeEvent.done = True


class AsIfOnGpu(LaggedRead):
    on_gpu = staticmethod(lambda value: True)
    new_event = staticmethod(FakeEvent)


def test_lagged_read_shows_the_last_copy_that_arrived_without_waiting():
    read, FakeEvent.done = AsIfOnGpu(), False
    assert read({"loss": torch.tensor(1.0)}) == {}  # copy started, not arrived: nothing to show yet
    assert read({"loss": torch.tensor(2.0)}) == {}  # still in flight: no second copy queued behind it
    FakeEvent.done = True
    assert read({"loss": torch.tensor(3.0)}) == {"loss": 1.0}  # the first arrived; 3.0's copy starts
    FakeEvent.done = False
    assert read({"loss": torch.tensor(4.0)}) == {"loss": 1.0}
    assert read({"loss": torch.tensor(5.0)}, wait=True) == {"loss": 5.0}  # waits, reads the value now
    plain = LaggedRead()  # values on the CPU: read at once
    assert plain({"loss": torch.tensor(6.0)}) == {"loss": 6.0}


def test_the_bar_waits_for_the_loss_only_outside_training_steps(tmp_path):
    bar, waits = RunProgressBar(), []
    real = bar._read
    bar._read = lambda values, wait=False: waits.append(wait) or real(values, wait=wait)
    trainer = pl.Trainer(max_steps=40, callbacks=[bar], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, log_every_n_steps=1000, accelerator="cpu")
    trainer.fit(TinyUnshown(), DataLoader(TensorDataset(torch.randn(80, 4)), batch_size=2))
    assert waits.count(False) >= 3  # the refreshes every 10 steps
    assert waits[-1] is True  # the epoch's end
