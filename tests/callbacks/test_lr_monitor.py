"""The learning-rate monitor: Lightning's names and values, its hook on a CUDA stream of its own."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from ldm.callbacks.lr_monitor import LearningRateMonitor


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Linear(4, 4)
        self.text = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return (self.text(self.unet(batch[0])) ** 2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": self.unet.parameters(), "lr": 1e-3, "name": "unet"},
                                  {"params": self.text.parameters(), "lr": 5e-4, "name": "text_encoder"}])


def test_rates_logged_under_lightnings_names_at_logging_steps(tmp_path):
    logger = _Recorder()
    trainer = pl.Trainer(max_steps=4, log_every_n_steps=2, logger=logger, accelerator="cpu",
                         callbacks=[LearningRateMonitor(logging_interval="step")], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Tiny())
    rates = [(step, m) for step, m in logger.metrics if any(k.startswith("lr-") for k in m)]
    assert [step for step, _ in rates] == [1, 3]  # the steps the loggers write, as Lightning's monitor logs
    assert rates[0][1] == {"lr-AdamW/unet": 1e-3, "lr-AdamW/text_encoder": 5e-4}
    assert float(trainer.callback_metrics["lr-AdamW/unet"]) == pytest.approx(1e-3)


def test_hook_runs_on_a_stream_of_its_own_on_cuda(monkeypatch):
    """Lightning's hook copies each rate to the GPU on the current stream and waits for it: here it
    runs inside a stream made once for the monitor (the copy then waits for nothing else)."""
    made, inside, seen = [], [False], []

    class FakeStream:
        def __init__(self, device):
            made.append(device)

    @contextlib.contextmanager
    def fake_stream(stream):
        assert isinstance(stream, FakeStream)
        inside[0] = True
        yield
        inside[0] = False

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream)
    monkeypatch.setattr(pl.callbacks.LearningRateMonitor, "on_train_batch_start",
                        lambda self, trainer, *a, **k: seen.append(inside[0]))
    monitor = LearningRateMonitor(logging_interval="step")
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    monitor.on_train_batch_start(gpu, None, None, 0)
    monitor.on_train_batch_start(gpu, None, None, 1)
    monitor.on_train_batch_start(cpu, None, None, 2)
    assert seen == [True, True, False]
    assert made == [torch.device("cuda", 0)]  # one stream, reused
