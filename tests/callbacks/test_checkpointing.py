"""BackgroundCheckpointIO: checkpoints written from a writer thread while training goes on."""
from __future__ import annotations

import threading

import pytest
import pytorch_lightning as pl
import torch

import ldm.callbacks.checkpointing as ckpt
from checkpoint_states import holds_w, state
from ldm.callbacks.checkpointing import BackgroundCheckpointIO


class Gate:
    """Holds the writer thread inside torch.save until released."""

    def __init__(self, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        real = torch.save

        def slow_save(obj, f, *args, **kwargs):
            self.entered.set()
            assert self.release.wait(10)
            real(obj, f, *args, **kwargs)
        monkeypatch.setattr(ckpt.torch, "save", slow_save)


def test_the_file_holds_the_state_at_save_time_while_training_changes_it(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "e.ckpt")  # returns while the writer waits in torch.save
    assert gate.entered.wait(10) and not (tmp_path / "e.ckpt").exists()
    ckpt_dict["state_dict"]["w"].add_(100)  # the next optimizer steps, in place
    ckpt_dict["callbacks"]["ModelCheckpoint"]["best_k_models"]["b.ckpt"] = torch.tensor(0.1)
    gate.release.set()
    io.teardown()  # the end of the run waits for the write
    loaded = torch.load(tmp_path / "e.ckpt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 1.0))
    assert list(loaded["callbacks"]["ModelCheckpoint"]["best_k_models"]) == ["a.ckpt"]
    assert loaded["global_step"] == 7 and loaded["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ckpt"]  # no temp file left


def test_two_saves_of_one_state_share_the_host_copy_and_removals_keep_their_order(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(t.numel()) or real_to(t, *a, **k))
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    (tmp_path / "old.ckpt").write_bytes(b"x")
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")  # ModelCheckpoint's save_last, same state
    io.remove_checkpoint(tmp_path / "old.ckpt")  # top-k dropping an older file
    assert (tmp_path / "old.ckpt").exists()  # queued behind the writes
    n_tensors = 4
    assert len(copies) == n_tensors  # one host copy per tensor, not two
    gate.release.set()
    io.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=01.ckpt", "last.ckpt"]
    for name in ("epoch=01.ckpt", "last.ckpt"):
        assert holds_w(tmp_path / name, 2.0)
    ckpt_dict["state_dict"]["w"].add_(1)  # a later save after an in-place change copies that tensor anew
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    io.teardown()
    assert holds_w(tmp_path / "last.ckpt", 3.0)


def test_a_save_after_the_writes_are_done_copies_into_the_host_memory_of_the_last_one(tmp_path, monkeypatch):
    fresh = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: fresh.append(t.numel()) or real_to(t, *a, **k))
    saved = []
    real_save = torch.save
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: saved.append(obj) or real_save(obj, f, *a, **k))
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=00.ckpt")
    io.wait()
    first = {id(saved[0]["state_dict"]["w"]), id(saved[0]["optimizer_states"][0]["state"][0]["exp_avg"])}
    assert len(fresh) == 4
    ckpt_dict["state_dict"]["w"].add_(1)  # an epoch of training
    ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.teardown()
    assert len(fresh) == 4  # no fresh host memory for the second save
    assert id(saved[1]["state_dict"]["w"]) in first  # a host tensor of the first save (same shape), overwritten
    loaded = torch.load(tmp_path / "epoch=01.ckpt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 2.0))
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.full((64,), 1.5))
    assert holds_w(tmp_path / "epoch=00.ckpt", 1.0)  # written before its memory was reused


def test_host_memory_a_write_still_reads_is_not_reused(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "a.ckpt")
    assert gate.entered.wait(10)
    ckpt_dict["state_dict"]["w"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "b.ckpt")  # while a.ckpt is still being written
    gate.release.set()
    io.teardown()
    assert holds_w(tmp_path / "a.ckpt", 1.0)
    assert holds_w(tmp_path / "b.ckpt", 2.0)


def test_the_memory_check_counts_host_tensors_kept_for_reuse(tmp_path, monkeypatch):
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "a.ckpt")
    io.wait()
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: 100)  # bytes: far less than a fresh copy
    ckpt_dict["state_dict"]["w"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "b.ckpt")
    assert io._writer.pending  # copied into the kept tensors and written in the background, not in place
    io.teardown()
    assert holds_w(tmp_path / "b.ckpt", 2.0)


def test_a_failed_write_names_its_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    io.save_checkpoint(state(1.0), tmp_path / "last.ckpt")
    io.wait()
    good = (tmp_path / "last.ckpt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    io.save_checkpoint(state(5.0), tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"could not write checkpoint .*last.ckpt: No space left"):
        io.teardown()
    assert (tmp_path / "last.ckpt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_without_host_memory_for_the_copy_it_writes_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: 100)  # bytes: less than the copy needs
    io, ckpt_dict = BackgroundCheckpointIO(), state(4.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "e.ckpt")
    assert (tmp_path / "e.ckpt").exists()  # written before save_checkpoint returned
    ckpt_dict["state_dict"]["w"].add_(1)
    assert holds_w(tmp_path / "e.ckpt", 4.0)
    io.teardown()


def test_main_writes_in_the_background_unless_last_is_a_link():
    from omegaconf import OmegaConf

    from ldm.run import checkpoint_io_for
    assert type(checkpoint_io_for(OmegaConf.create({}))) is BackgroundCheckpointIO
    link = OmegaConf.create({"lightning": {"modelcheckpoint": {"params": {"save_last": "link"}}}})
    assert type(checkpoint_io_for(link)) is ckpt.AtomicCheckpointIO


def _saved_objects(monkeypatch) -> list:
    saved = []
    real_save = torch.save
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: saved.append(obj) or real_save(obj, f, *a, **k))
    return saved


def test_the_first_save_copies_into_host_memory_reserved_in_the_writer_thread(tmp_path, monkeypatch):
    touched = []
    real_touch = ckpt._touched_host_tensors
    monkeypatch.setattr(ckpt, "_touched_host_tensors", lambda layouts, pin: touched.append(
        threading.current_thread().name) or real_touch(layouts, pin))
    saved = _saved_objects(monkeypatch)
    fresh = []
    real_to = torch.Tensor.to
    io, ckpt_dict = BackgroundCheckpointIO(), state(3.0)
    sd, moments = ckpt_dict["state_dict"], ckpt_dict["optimizer_states"][0]["state"][0]
    assert io.reserve([sd["w"], sd["b"], moments["exp_avg"], sd["w"]])  # a tensor named twice is reserved once
    assert not io.reserve([sd["w"]])  # once only
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: fresh.append(t.numel()) or real_to(t, *a, **k))
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=00.ckpt")
    io.teardown()
    assert touched and touched[0].startswith("checkpoint-writer")
    assert fresh == [1]  # only the tensor that was not reserved (the callback's best score) got fresh memory
    loaded = torch.load(tmp_path / "epoch=00.ckpt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 3.0))
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.full((64,), 1.5))
    assert saved[0]["state_dict"]["w"] is not saved[0]["optimizer_states"][0]["state"][0]["exp_avg"]


def test_no_reservation_without_the_free_memory_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: 300)  # bytes: the copy needs 2 x 256 + 12
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    assert not io.reserve([ckpt_dict["state_dict"]["w"], ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"]])
    assert io._reserved is None
    io.teardown()


def test_reserved_copies_of_several_dtypes_are_written_each_at_its_own_size(tmp_path):
    """The reserved host memory is one buffer; the file must not hold it whole, nor refuse
    tensors of different dtypes over it."""
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    ckpt_dict["state_dict"]["h"] = torch.arange(5, dtype=torch.bfloat16)
    ckpt_dict["optimizer_states"][0]["state"][0]["step"] = torch.tensor(7, dtype=torch.int64)
    ckpt_dict["state_dict"]["mask"] = torch.tensor([True, False, True])
    tensors = [*ckpt_dict["state_dict"].values(), *ckpt_dict["optimizer_states"][0]["state"][0].values()]
    assert io.reserve(tensors)
    io.save_checkpoint(ckpt_dict, tmp_path / "mixed.ckpt")
    io.teardown()
    loaded = torch.load(tmp_path / "mixed.ckpt", weights_only=False)
    for name, t in [*loaded["state_dict"].items(), *loaded["optimizer_states"][0]["state"][0].items()]:
        expected = ckpt_dict["state_dict"].get(name, ckpt_dict["optimizer_states"][0]["state"][0].get(name))
        assert torch.equal(t, expected) and t.dtype == expected.dtype, name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


@pytest.mark.parametrize("free, pin", [(2 * 512 + 1, True), (2 * 512, False), (700, False)])
def test_the_reserved_memory_is_page_locked_only_with_twice_its_size_free(tmp_path, monkeypatch, free, pin):
    asked, released = [], []
    real_touch = ckpt._touched_host_tensors

    def touch(layouts, pin):
        asked.append(pin)
        arena = real_touch(layouts, False)  # no CUDA here: ordinary memory, released all the same
        monkeypatch.setattr(arena, "release", lambda: released.append(arena))
        return arena
    monkeypatch.setattr(ckpt, "_touched_host_tensors", touch)
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: free)  # bytes: the copy needs 2 x 256
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    assert io.reserve([ckpt_dict["state_dict"]["w"], ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"]])
    io.teardown()  # a reservation no save took is released too
    assert asked == [pin] and len(released) == 1


def test_a_failed_reservation_only_costs_the_first_save_fresh_memory(tmp_path, monkeypatch):
    def no_memory(layouts, pin):
        raise MemoryError("cannot allocate")
    monkeypatch.setattr(ckpt, "_touched_host_tensors", no_memory)
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    assert io.reserve(ckpt_dict["state_dict"].values())
    with pytest.warns(UserWarning, match="could not reserve host memory for the checkpoint copy: cannot allocate"):
        io.save_checkpoint(ckpt_dict, tmp_path / "a.ckpt")
    io.teardown()
    assert holds_w(tmp_path / "a.ckpt", 2.0)


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(6, 8))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["host_rng_state"] = torch.get_rng_state()  # a new tensor at every save, as LatentDiffusion's


@pytest.mark.parametrize("every_n_epochs", [1, 0])
def test_run_checkpoint_reserves_the_first_saves_memory_after_the_first_step(tmp_path, monkeypatch, every_n_epochs):
    io = BackgroundCheckpointIO()
    reserved, steps_at_reserve = [], []
    real_touch = ckpt._touched_host_tensors

    def touch(layouts, pin):
        out = real_touch(layouts, pin)
        reserved.extend(t for ts in out.tensors.values() for t in ts)
        return out
    monkeypatch.setattr(ckpt, "_touched_host_tensors", touch)
    real_reserve = io.reserve
    monkeypatch.setattr(io, "reserve", lambda tensors: steps_at_reserve.append(trainer.global_step)
                        or real_reserve(tensors))
    saved = _saved_objects(monkeypatch)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, plugins=[io],
                         callbacks=[ckpt.RunCheckpoint(dirpath=tmp_path, every_n_epochs=every_n_epochs,
                                                       save_top_k=-1, save_last=True)])
    model = _Tiny()
    trainer.fit(model)
    io.teardown()
    if not every_n_epochs:  # saves only at the end: no host memory held through the run
        assert steps_at_reserve == [] and reserved == [] and [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
        return
    assert steps_at_reserve == [1]  # once, after the first optimizer step
    first = saved[0]
    weights = list(first["state_dict"].values())
    moments = [v for s in first["optimizer_states"][0]["state"].values() for k, v in s.items() if k != "step"]
    assert len(weights) == 2 and len(moments) == 4
    assert all(any(t is r for r in reserved) for t in weights + moments)  # copied into the reserved memory
    files = {name: torch.load(tmp_path / name, weights_only=False)["state_dict"]["layer.weight"]
             for name in ("epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt")}
    assert torch.equal(files["last.ckpt"], model.layer.weight.detach())
    assert torch.equal(files["epoch=1-step=6.ckpt"], files["last.ckpt"])
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "epoch=1-step=6.ckpt")  # the same step: written once
    assert not torch.equal(files["epoch=0-step=3.ckpt"], files["last.ckpt"])  # written before its memory was reused


def test_checkpoint_tensors_are_the_state_the_module_saves_and_the_optimizer_state():
    model = _Tiny()
    optimizer = model.configure_optimizers()
    model.layer(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    trainer = type("T", (), {"lightning_module": model, "optimizers": [optimizer]})()
    assert len(ckpt.checkpoint_tensors(trainer)) == 2 + 2 * 3  # weight, bias; step and two moments each
    model.saved_state_dict = lambda sd: {k: v for k, v in sd.items() if k.endswith("bias")}  # an adapter run's trim
    tensors = ckpt.checkpoint_tensors(trainer)
    assert len(tensors) == 1 + 6 and tensors[0] is not None and tensors[0].shape == (8,)


def test_a_full_disk_is_named_as_such_when_torch_save_hides_it(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1591966656 vs 1591966544")
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    io = BackgroundCheckpointIO()
    io.save_checkpoint(state(1.0), tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"could not write checkpoint .*last.ckpt: No space left on device "
                                           r"\(\[enforce fail"):
        io.teardown()
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed
