"""main.py end to end on CPU: the tiny model, generated images, two short epochs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm import checkpoint as ckpt_io
from ldm.prune import prune_checkpoint
from ldm.train import main, resolve_resume
from ldm.util import ConfigError
from run_folders import stopped_at
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--base", str(ROOT / "tests/configs/tiny.yaml"), str(ROOT / "tests/configs/tiny_run.yaml")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, count=12, size=64, seed=0)  # 9 train (5 batches of 2), 3 validation
    return out


def run_main(*argv: str) -> int:
    return main([str(a) for a in argv])


def only_run(logs: Path) -> Path:
    runs = [p for p in logs.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint_file(ckpt)["state_dict"]


def scalar_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


@pytest.fixture(scope="module")
def finished_run(shapes, tmp_path_factory) -> Path:
    """One uninterrupted 2-epoch run with EMA, a checkpoint every 3 steps and at each epoch."""
    logs = tmp_path_factory.mktemp("logs")
    rc = run_main(*BASE, "-t", "-n", "MyProject", "--data_root", shapes, "-l", logs,
                  "model.params.use_ema=true", "lightning.modelcheckpoint.params.every_n_epochs=null",
                  "lightning.modelcheckpoint.params.every_n_train_steps=3")
    assert rc == 0
    return only_run(logs)


@pytest.mark.slow
def test_two_epochs_write_the_run_folder(finished_run):
    assert finished_run.name.endswith("_MyProject") and finished_run.name[:4].isdigit()
    ckpts = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    # 5 steps an epoch: saves at steps 3, 6, 9, and last.ckpt at the end (step 10)
    assert ckpts == ["epoch=00-step=00003.ckpt", "epoch=01-step=00006.ckpt", "epoch=01-step=00009.ckpt",
                     "last.ckpt"]
    configs = list((finished_run / "configs").glob("*-project.yaml"))
    assert len(configs) == 1 and "use_ema: true" in configs[0].read_text()
    plan = json.loads((finished_run / "dataset_plan.json").read_text())
    assert plan["training_images"] == 9 and plan["held_out_images"] == 3
    assert plan["steps"]["steps_per_epoch"] == 5 and plan["steps"]["total_steps"] == 10
    grids = sorted(p.name for p in (finished_run / "images" / "train").glob("*.png"))
    assert "samples_gs-000003_e-00_batch.png" in grids and "samples_gs-000010_e-01_batch.png" in grids
    scalars, images = scalar_tags(finished_run)
    assert {"train/loss_step", "train/loss_epoch", "train/loss_smooth", "val/loss", "val/loss_no_ema",
            "perf/images_per_sec"} <= scalars
    assert any(t.startswith("lr-") for t in scalars), scalars
    assert "samples/batch" in images
    last = ckpt_io.load_checkpoint_file(finished_run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 10 and "noise_rng_state" in last
    assert any(k.startswith("model_ema.") for k in last["state_dict"])


@pytest.mark.slow
def test_pruned_run_checkpoint_loads_into_the_model(finished_run, tmp_path):
    from ldm.config import load_config
    from ldm.util import instantiate_from_config

    report = prune_checkpoint(finished_run / "checkpoints" / "last.ckpt", tmp_path / "pruned.safetensors",
                              safetensors=True)
    assert report.ema == "used" and "optimizer_states" in report.dropped_entries
    cfg = load_config([ROOT / "tests/configs/tiny.yaml"])
    model = instantiate_from_config({"target": cfg.model.target, "params": cfg.model.params}, path="model")
    sd = ckpt_io.load_state_dict(tmp_path / "pruned.safetensors")
    assert set(sd) == set(model.state_dict())  # every model key, nothing else
    load = ckpt_io.load_into_model(model, sd, source="pruned")
    assert not load.missing and not load.unexpected
    trained = weights(finished_run / "checkpoints" / "last.ckpt")
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], trained["model_ema.diffusion_modelout2weight"].half().float())


@pytest.mark.slow
def test_resume_mid_epoch_ends_with_the_same_weights(finished_run, tmp_path):
    """Resume from step 3 (mid epoch 0) in a copy of the run folder: bitwise the same end."""
    ckpt = stopped_at(finished_run, "epoch=00-step=00003.ckpt", tmp_path)
    copy = ckpt.parent.parent
    assert run_main("-r", ckpt) == 0
    resumed, straight = weights(copy / "checkpoints" / "last.ckpt"), weights(finished_run / "checkpoints" / "last.ckpt")
    assert resumed.keys() == straight.keys()
    different = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert not different, different[:5]
    # and the checkpoints of the steps after the resume point are the same files' weights
    again = weights(copy / "checkpoints" / "epoch=01-step=00006.ckpt")
    assert all(torch.equal(again[k], v) for k, v in weights(
        finished_run / "checkpoints" / "epoch=01-step=00006.ckpt").items())


def test_resume_takes_a_run_folder_or_a_checkpoint(tmp_path):
    run = tmp_path / "2026-01-01T00-00-00_x"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no checkpoints/last.ckpt"):
        resolve_resume(str(run))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_resume(str(run)) == (run, run / "checkpoints" / "last.ckpt")
    assert resolve_resume(str(run).replace("/", "\\") + "\\checkpoints\\last.ckpt") == \
        (run, run / "checkpoints" / "last.ckpt")


def test_dry_run_prints_the_plan_without_a_model(shapes, capsys):
    assert run_main(*BASE, "--data_root", shapes, "--dry_run") == 0
    out = capsys.readouterr().out
    assert "images found: 12" in out and "Total for 2 epochs: exact 10 steps" in out


@pytest.mark.parametrize("override, message", [
    ("data.params.batch_sise=4", "data.params.batch_sise"),
    ("lightning.trainer.max_epoch=3", "lightning.trainer.max_epoch"),
    ("data.params.train.params.flip_p=2", "flip_p"),
    ("lightning.trainer.max_epochs=many", "lightning.trainer.max_epochs"),
])
def test_bad_overrides_name_the_key(shapes, tmp_path, capsys, override, message):
    assert run_main(*BASE, "-t", "--data_root", shapes, "-l", tmp_path, override) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_a_missing_optimizer_package_stops_the_run_before_the_model_is_built(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if not installed: its import fails
    assert run_main(*BASE, "-t", "--data_root", shapes, "-l", tmp_path, "model.params.optimizer.name=lion") == 2
    err = capsys.readouterr().err
    assert "model.params.optimizer.name: this optimizer needs the optional package 'lion_pytorch' (not installed)" \
        in err
    assert 'pip install "everydream-ldm[lion]"' in err
    assert not any(tmp_path.iterdir())  # stopped before the model was built: no run folder


def test_overrides_reach_the_run(shapes, tmp_path, capsys):
    # without -t the run is built and checked, not trained
    assert run_main(*BASE, "--data_root", shapes, "-l", tmp_path, "data.params.batch_size=3",
                    "model.base_learning_rate=2e-5", "--scale_lr") == 0
    out = capsys.readouterr().out
    assert "Learning rate 6.00e-05 = 1 (accumulate_grad_batches) x 1 (devices) x 3 (batch_size)" in out
    saved = next((only_run(tmp_path) / "configs").glob("*-project.yaml")).read_text()
    assert "batch_size: 3" in saved


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such folder"),
    ("empty", "no usable images: no image files"),
    ("none", "pass --data_root"),
])
def test_data_root_problems_stop_before_the_model(tmp_path, capsys, setup, message):
    (tmp_path / "empty").mkdir()
    args = [] if setup == "none" else ["--data_root", tmp_path / setup]
    assert run_main(*BASE, "-t", "-l", tmp_path / "logs", *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_a_loadable_interrupted_checkpoint(shapes, tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *BASE, "-t", "--data_root", str(shapes), "-l", str(tmp_path),
         "lightning.trainer.max_epochs=1000", "lightning.callbacks.image_logger.params.disabled=true"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 400  # generous: a loaded 2-core machine is slow
        while not list(tmp_path.glob("*/checkpoints/epoch=00-*.ckpt")):  # the first epoch ran
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    saved = list(tmp_path.glob("*/checkpoints/interrupted-epoch=*-step=*.ckpt"))
    assert len(saved) == 1, out
    assert "resume with: python main.py -r" in out
    ckpt = ckpt_io.load_checkpoint_file(saved[0])
    assert ckpt["global_step"] >= 5 and "optimizer_states" in ckpt
    assert any(k.startswith("model.diffusion_model.") for k in ckpt["state_dict"])


def test_original_config_targets_resolve_to_ours():
    from ldm.callbacks.image_logger import ImageLogger
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.util import get_obj_from_str

    assert get_obj_from_str("main.DataModuleFromConfig") is DataModuleFromConfig
    assert get_obj_from_str("main.ImageLogger") is ImageLogger
    with pytest.raises(ConfigError, match="has no 'CUDACallback'"):
        get_obj_from_str("main.CUDACallback")



def test_resume_keeps_the_flags_the_run_started_with(tmp_path, capsys):
    from ldm.train import apply_saved_flags, parse_args

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "2026-01-01T00-00-00-cli.json").write_text(json.dumps(
        {"seed": 5, "devices": "2", "precision": "bf16-mixed", "scale_lr": True}))
    args, _ = parse_args(["-r", str(tmp_path), "--precision", "32"])
    apply_saved_flags(args, tmp_path)
    assert (args.seed, args.devices, args.precision, args.scale_lr) == (5, "2", "32", True)
    assert "--seed 5" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_saves_its_flags(finished_run):
    saved = json.loads(next((finished_run / "configs").glob("*-cli.json")).read_text())
    assert saved == {"seed": 23, "devices": None, "precision": None, "scale_lr": False, "actual_resume": None}


def test_dry_run_plans_for_the_devices_asked(shapes, capsys):
    assert run_main(*BASE, "--data_root", shapes, "--dry_run", "--devices", "2") == 0
    assert "= 3 per rank" in capsys.readouterr().out  # 5 batches over 2 ranks, evened out to 6


@pytest.mark.slow
def test_two_processes_ddp_on_cpu_share_one_run_folder(shapes, tmp_path):
    """Lightning starts `main.py` again for rank 1; it must train in rank 0's folder."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *BASE, "-t", "--data_root", str(shapes), "-l", str(tmp_path),
         "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
         "lightning.callbacks.image_logger.params.disabled=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch=00-step=00003.ckpt", "epoch=01-step=00006.ckpt", "last.ckpt"]  # 5 batches -> 3 per rank
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    assert proc.stdout.count("Done. Run folder") == 1


def test_out_of_memory_names_what_to_change(shapes, tmp_path, capsys, monkeypatch):
    """A CUDA out-of-memory error in training stops the run with the keys that make it fit,
    with the run's own values, and the run folder kept."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    def out_of_memory(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(LatentDiffusion, "training_step", out_of_memory)
    rc = run_main(*BASE, "-t", "--data_root", shapes, "-l", tmp_path, "data.params.batch_size=3")
    assert rc == 3
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "data.params.batch_size (now 3)" in err
    assert "model.params.unet_config.params.use_checkpoint=true" in err and "presets/vram_12gb.yaml" in err
    assert str(only_run(tmp_path)) in err and (only_run(tmp_path) / "configs").is_dir()
    assert "cuda_graphs" not in err  # nothing recorded on a CPU: not a fix here


def test_out_of_memory_after_cuda_graphs_were_recorded_names_the_switch(tmp_path):
    from omegaconf import OmegaConf

    from ldm.run import out_of_memory_advice

    cfg = OmegaConf.create({"data": {"params": {"batch_size": 6}}})
    advice = out_of_memory_advice(cfg, torch.OutOfMemoryError("CUDA out of memory."), tmp_path, graphed=True)
    assert "To fit: set model.params.cuda_graphs=false" in advice and "batch_size (now 6)" in advice


@pytest.mark.parametrize("user, expected", [
    ({}, "expandable_segments:True None"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128 None"),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}, "None max_split_size_mb:128"),
])
def test_main_py_grows_the_allocators_segments_unless_the_user_set_it(user, expected):
    """main.py sets CUDA's allocator to expandable segments before torch starts (the CUDA graphs
    fit a 24 GB card with it); a setting of the user's own, under either name, is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    code = ("import os, main; "
            "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), os.environ.get('PYTORCH_ALLOC_CONF'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **user}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
