"""The latent cache (cache_latents): keys, hits, invalidation, flips, refusals, the data folder
left as it was, and the same training loss as encoding at every step."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.ed_validate import EDValidateBatch
from ldm.data.batching import collate_batch
from ldm.data.every_dream import EveryDreamBatch
from ldm.data.latent_cache import default_cache_dir, fill, load_moments
from ldm.train import main
from ldm.util import instantiate_from_config
from scripts.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "tests/configs/tiny.yaml", ROOT / "tests/configs/tiny_run.yaml"]
SMALL = {"resolution": 32, "bucket_step": 16, "min_side": 16, "seed": 7}


@pytest.fixture(scope="module")
def model():
    cfg = OmegaConf.load(CONFIGS[0]).model
    torch.manual_seed(0)
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}).eval()


@pytest.fixture
def shapes(tmp_path) -> Path:
    make_shapes(tmp_path / "shapes", count=6, size=64, seed=0)
    return tmp_path / "shapes"


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """The default cache folder, under the test's own temp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "everydream-ldm" / "latents"


def dataset(root: Path, **kw) -> EveryDreamBatch:
    return EveryDreamBatch(data_root=str(root), batch_size=2, **{**SMALL, "cache_latents": True, **kw})


def run_fill(model, *datasets) -> dict[str, int]:
    return fill(datasets, model.first_stage_model, torch.device("cpu"), batch_size=4, say=lambda text: None)


def entries(folder: Path) -> set[Path]:
    return set(folder.rglob("*.safetensors"))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_the_default_folder_follows_xdg_and_the_home(monkeypatch, tmp_path, cache_home):
    assert default_cache_dir() == cache_home
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "everydream-ldm" / "latents"


def test_a_second_fill_encodes_nothing_and_the_items_carry_moments(model, shapes, cache_home):
    ds = dataset(shapes)
    assert run_fill(model, ds) == {"cached": 0, "encoded": 6}
    assert len(entries(cache_home)) == 6
    again = dataset(shapes)
    assert run_fill(model, again) == {"cached": 6, "encoded": 0}
    items = [again[k] for k in next(iter(again.batch_sampler(1, 0)))]
    batch = collate_batch(items)
    w, h = items[0]["bucket"]
    assert "image" not in batch and batch["moments"].shape == (2, 8, h // 4, w // 4)  # [B, 2*C, h, w]
    assert batch["moments"].dtype == torch.float32


def test_an_edited_image_is_encoded_again_and_nothing_else(model, shapes, cache_home):
    run_fill(model, dataset(shapes))
    before = entries(cache_home)
    victim = sorted(shapes.glob("*.png"))[0]
    from PIL import Image

    with Image.open(victim) as im:
        im.convert("RGB").rotate(90).save(victim)
    assert run_fill(model, dataset(shapes)) == {"cached": 5, "encoded": 1}
    assert len(entries(cache_home) - before) == 1


def test_each_flip_is_an_entry_of_its_own(model, shapes, cache_home):
    plain = dataset(shapes)
    flipped = dataset(shapes, flip_p=1.0)
    both = dataset(shapes, flip_p=0.5)
    assert plain.cache_entries() == [(i, False) for i in range(6)]
    assert flipped.cache_entries() == [(i, True) for i in range(6)]
    assert sorted(both.cache_entries()) == sorted(plain.cache_entries() + flipped.cache_entries())
    assert run_fill(model, plain) == {"cached": 0, "encoded": 6}
    assert run_fill(model, both) == {"cached": 6, "encoded": 6}  # the unflipped ones were there
    assert run_fill(model, flipped) == {"cached": 6, "encoded": 0}
    assert len(entries(cache_home)) == 12
    a, b = load_moments(both._latent_entries[(0, False)]), load_moments(both._latent_entries[(0, True)])
    assert not torch.equal(a, b)


def test_a_validation_dataset_shares_the_entries(model, shapes, cache_home):
    train = dataset(shapes, val_split=0.5)
    val = EDValidateBatch(data_root=str(shapes), batch_size=2, val_split=0.5, cache_latents=True, **SMALL)
    assert run_fill(model, train, val) == {"cached": 0, "encoded": 6}
    assert run_fill(model, dataset(shapes)) == {"cached": 6, "encoded": 0}


def test_refusals_name_the_key(shapes, tmp_path):
    with pytest.raises(ValueError, match="cache_latents.*crop_jitter"):
        dataset(shapes, crop_jitter=0.05)
    with pytest.raises(ValueError, match="cache_latents.*background: random"):
        dataset(shapes, background="random")
    with pytest.raises(ValueError, match="cache_dir.*inside the image folder"):
        dataset(shapes, cache_dir=str(shapes / "latents"))
    dataset(shapes, crop_jitter=0.05, cache_latents=False)  # without the cache, jitter is fine


def test_the_cache_lives_outside_the_data_folder_which_stays_unchanged(model, shapes, tmp_path, cache_home):
    before = snapshot(shapes)
    ds = dataset(shapes, flip_p=0.5)
    run_fill(model, ds)
    for k in range(len(ds)):
        ds[k]
    assert snapshot(shapes) == before
    assert entries(cache_home) and not any(Path(os.path.realpath(p)).is_relative_to(shapes.resolve())
                                           for p in entries(cache_home))
    own = tmp_path / "my_cache"
    ds = dataset(shapes, cache_dir=str(own))
    run_fill(model, ds)
    assert len(entries(own)) == 6 and snapshot(shapes) == before


def test_the_training_loss_is_the_one_of_encoding_each_step(model, shapes):
    """The same noise stream, moments from the cache or from the VAE: the same loss."""
    cached, plain = dataset(shapes, flip_p=0.5), dataset(shapes, flip_p=0.5, cache_latents=False)
    run_fill(model, cached)
    keys = next(iter(cached.batch_sampler(1, 0)))
    losses = []
    for ds in (cached, plain):
        batch = collate_batch([ds[k] for k in keys])
        model.noise_rng = torch.Generator().manual_seed(3)
        with torch.no_grad():
            losses.append((model.shared_step(batch), model.fixed_noise_loss(batch)))
    (train_c, val_c), (train_p, val_p) = losses
    assert torch.equal(train_c, train_p) and torch.equal(val_c, val_p)  # float32 on CPU: bitwise
    model.noise_rng = None


@pytest.mark.slow
def test_runs_through_main_reuse_the_cache_and_train_as_without_it(shapes, tmp_path, capsys):
    from ldm import checkpoint as ckpt_io

    quick = ["lightning.trainer.max_steps=3", "lightning.trainer.limit_val_batches=0",
             "lightning.trainer.num_sanity_val_steps=0", "lightning.callbacks.image_logger.params.disabled=true",
             "data.params.train.params.flip_p=0.5"]

    def train(name: str, *extra: str) -> dict[str, torch.Tensor]:
        logs = tmp_path / name
        argv = ["--base", *CONFIGS, "-t", "-n", name, "--data_root", shapes, "-l", logs, *quick, *extra]
        assert main([str(a) for a in argv]) == 0
        (run_dir,) = [p for p in logs.iterdir() if p.is_dir()]
        return ckpt_io.load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]

    on = ["data.params.train.params.cache_latents=true", "data.params.validation.params.cache_latents=true"]
    first = train("first", *on)
    assert "latents: 0 cached, 10 to encode" in capsys.readouterr().out  # 4 training images x 2 flips + 2
    # with loader workers: Lightning starts them before on_fit_start (estimated_stepping_batches
    # iterates the loader), so the fill restarts them to give them the entry table
    second = train("second", *on, "data.params.num_workers=2")
    assert "latents: 10 cached, 0 to encode" in capsys.readouterr().out
    assert all(torch.equal(second[k], v) for k, v in first.items())
    plain = train("plain")
    assert "latents:" not in capsys.readouterr().out
    different = [k for k in plain if not torch.equal(first[k], plain[k])]  # float32 on CPU: bitwise
    assert plain.keys() == first.keys() and not different, different[:5]


def test_the_fill_runs_a_compiled_encoder_uncompiled(shapes, cache_home):
    """Under model.params.compile the encoder is compiled for the training step; the one-off
    fill would compile it once per batch shape for a single use, so it runs eager."""
    from torch._dynamo.utils import counters

    cfg = OmegaConf.load(CONFIGS[0]).model
    vae = instantiate_from_config({"target": cfg.target, "params": cfg.params}).first_stage_model.eval()
    torch._dynamo.reset()
    counters.clear()
    vae.encoder.compile(backend="eager", dynamic=False)
    try:
        assert fill([dataset(shapes)], vae, torch.device("cpu"), batch_size=4, say=lambda t: None)["encoded"] == 6
        assert counters["frames"]["total"] == 0
        vae.encode(torch.zeros(1, 3, 16, 16))  # the same module outside the fill: compiled
        assert counters["frames"]["total"] == 1
    finally:
        torch._dynamo.reset()
