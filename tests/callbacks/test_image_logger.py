import threading
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import Precision

from ldm.callbacks.image_logger import (ImageLogger, SamplePrompt, fit_size, latent_factor, make_grid, sampling_mode,
                                        parse_prompt_line, read_prompts_file)
from ldm.util import instantiate_from_config

# ---- prompt lines -------------------------------------------------------------------------


def test_parse_prompt_line_all_options():
    p = parse_prompt_line("a well-lit photo of a cat  --n blurry, low-res --w 700 --h 512 --d 42 --s 30 --l 6.5"
                          " --ss ddim")
    assert p == SamplePrompt("a well-lit photo of a cat", "blurry, low-res", 640, 512, 42, 30, 6.5, "ddim")
    assert parse_prompt_line(p.to_line()) == p


def test_parse_prompt_line_takes_kohyas_sampler_name():
    assert parse_prompt_line("a cat --ss dpmsolver++").sampler == "dpmpp_2m"
    assert parse_prompt_line("a cat --ss dpmpp_2m").sampler == "dpmpp_2m"


def test_parse_prompt_line_keeps_dashes_that_are_not_options():
    p = parse_prompt_line("a state-of-the-art robot -- shiny --no-wait --l 3")
    assert p == SamplePrompt("a state-of-the-art robot -- shiny --no-wait", guidance_scale=3.0)


def test_parse_prompt_line_defaults_and_multiple():
    assert parse_prompt_line("  just a prompt ") == SamplePrompt("just a prompt")
    assert parse_prompt_line("x --w 100 --h 33", multiple=32) == SamplePrompt("x", width=96, height=32)
    assert parse_prompt_line("x --n") == SamplePrompt("x", negative_prompt="")


@pytest.mark.parametrize("line, message", [
    ("a cat --w wide", r"prompts.txt:7: --w 'wide': expected a whole number"),
    ("a cat --h 40", r"prompts.txt:7: --h '40': must be at least 64 pixels"),
    ("a cat --d -1", r"prompts.txt:7: --d '-1'"),
    ("a cat --s 0", r"prompts.txt:7: --s '0': expected a number of steps in \[1, 999\]"),
    ("a cat --l lots", r"prompts.txt:7: --l 'lots': expected a number"),
    ("a cat --l nan", r"prompts.txt:7: --l 'nan': expected a finite number"),
    ("a cat --q 3", r"prompts.txt:7: unknown option --q"),
    ("a cat --ss euler_a", r"prompts.txt:7: --ss 'euler_a': unknown sampler 'euler_a' \(known: ddim, dpmpp_2m"),
    ("a cat --s 3 --s 4", r"prompts.txt:7: option --s given twice"),
    ("--s 3", r"prompts.txt:7: no prompt text"),
])
def test_parse_prompt_line_errors_name_the_line(line, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_line(line, where="prompts.txt:7")


def test_read_prompts_file_skips_comments_and_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\na dog --d 3\n   # indented comment\na cat\n")
    assert read_prompts_file(path) == [SamplePrompt("a dog", seed=3), SamplePrompt("a cat")]
    path.write_text("a dog\n\na cat --w x\n")
    with pytest.raises(ValueError, match=rf"{path}:3: --w 'x'"):
        read_prompts_file(path)
    with pytest.raises(ValueError, match="missing.txt: cannot read"):
        read_prompts_file(tmp_path / "missing.txt")


def test_fit_size_caps_the_area_and_keeps_the_aspect():
    assert fit_size(512, 768, 768, 64) == (512, 768)
    assert fit_size(768, 1152, 512, 64) == (384, 576)  # scaled by 0.54 to 418x627, rounded down
    assert fit_size(20, 20, 512, 64) == (64, 64)


def test_make_grid_rows_of_four():
    images = [Image.new("RGB", (32, 32), "red")] * 5 + [Image.new("RGB", (64, 16), "blue")]
    grid = make_grid(images)
    assert grid.size == (4 * 64, 2 * 32)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((64 + 40, 0)) == (0, 0, 0)
    assert grid.getpixel((64, 32)) == (0, 0, 255) and grid.getpixel((64, 32 + 20)) == (0, 0, 0)


# ---- the callback on the tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    cfg = OmegaConf.load("tests/configs/tiny.yaml").model
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def fake_trainer(tmp_path, global_step, epoch=0, is_global_zero=True, datamodule=None):
    return SimpleNamespace(global_step=global_step, current_epoch=epoch, is_global_zero=is_global_zero, loggers=[],
                           datamodule=datamodule, default_root_dir=str(tmp_path), precision_plugin=Precision())


def load(path):
    with Image.open(path) as image:
        return image.copy()


def batch(captions, height=32, width=32):
    return {"caption": captions, "image": torch.zeros(len(captions), 3, height, width)}


def images_dir(tmp_path):
    return tmp_path / "images" / "train"


def test_latent_factor_of_the_tiny_vae(tiny_model):
    assert latent_factor(tiny_model) == 4  # ch_mult [1, 2, 2]


def test_batch_and_prompt_grids_are_written_and_the_prompts_file_reread(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red square --w 64 --h 32 --s 3\n")
    logger = ImageLogger(batch_frequency=2, max_images=2, prompts_file=str(prompts), steps=2, seed=10,
                         negative_prompt="blurry", logdir=str(tmp_path))
    out = images_dir(tmp_path)
    logger.on_train_batch_end(fake_trainer(tmp_path, 1), tiny_model, None, batch(["a", "b", "c"]), 0)
    assert not out.exists()  # step 1 is not a multiple of batch_frequency
    logger.on_train_batch_end(fake_trainer(tmp_path, 2), tiny_model, None, batch(["cap one", "cap two", "c"]), 1)
    logger.wait()  # the writer thread
    grid = load(out / "samples_gs-000002_e-00_batch.png")
    assert grid.size == (2 * 32, 32)  # max_images=2 captions, at the batch's 32x32 size
    assert (out / "samples_gs-000002_e-00_batch.txt").read_text().splitlines() == [
        "cap one --n blurry --w 32 --h 32 --d 10 --s 2 --l 7.5 --ss ddim",
        "cap two --n blurry --w 32 --h 32 --d 11 --s 2 --l 7.5 --ss ddim"]
    first_prompts = load(out / "samples_gs-000002_e-00_prompts.png")
    assert first_prompts.size == (64, 32)
    assert (out / "samples_gs-000002_e-00_prompts.txt").read_text() == \
        "a red square --n blurry --w 64 --h 32 --d 10 --s 3 --l 7.5 --ss ddim\n"

    prompts.write_text("a red square --w 64 --h 32 --s 3\n\na tree --d 99 --l 1\n")  # edited mid-run
    logger.on_train_epoch_end(fake_trainer(tmp_path, 3, epoch=1), tiny_model)
    logger.wait()
    assert (out / "samples_gs-000003_e-01_prompts.txt").read_text().splitlines() == [
        "a red square --n blurry --w 64 --h 32 --d 10 --s 3 --l 7.5 --ss ddim",
        "a tree --n blurry --w 32 --h 32 --d 99 --s 2 --l 1.0 --ss ddim"]  # default size: image_size 8 x 4 px
    second_prompts = load(out / "samples_gs-000003_e-01_prompts.png")
    assert second_prompts.size == (2 * 64, 32)
    # same seed and weights -> the same image in a later grid
    assert np.array_equal(np.asarray(second_prompts)[:, :64], np.asarray(first_prompts))
    assert np.array_equal(np.asarray(load(out / "samples_gs-000003_e-01_batch.png")), np.asarray(grid))


def test_each_step_is_sampled_once_and_only_on_rank_zero(tiny_model, tmp_path):
    logger = ImageLogger(batch_frequency=1, steps=2, logdir=str(tmp_path))
    logger.on_train_batch_end(fake_trainer(tmp_path, 0), tiny_model, None, batch(["a"]), 0)
    assert not images_dir(tmp_path).exists()  # never at step 0
    logger.on_train_batch_end(fake_trainer(tmp_path, 1), tiny_model, None, batch(["a"]), 0)
    logger.wait()
    png = images_dir(tmp_path) / "samples_gs-000001_e-00_batch.png"
    stamp = png.stat().st_mtime_ns
    logger.on_train_batch_end(fake_trainer(tmp_path, 1), tiny_model, None, batch(["a"]), 1)  # accumulation
    logger.on_train_epoch_end(fake_trainer(tmp_path, 1), tiny_model)
    logger.wait()
    assert png.stat().st_mtime_ns == stamp and len(list(images_dir(tmp_path).iterdir())) == 2

    other = tmp_path / "rank1"
    ImageLogger(batch_frequency=1, steps=2, logdir=str(other)).on_train_batch_end(
        fake_trainer(other, 1, is_global_zero=False), tiny_model, None, batch(["a"]), 0)
    ImageLogger(batch_frequency=1, steps=2, logdir=str(other), disabled=True).on_train_batch_end(
        fake_trainer(other, 1), tiny_model, None, batch(["a"]), 0)
    assert not other.exists()


def test_sampling_is_isolated_from_training(tiny_model, tmp_path, monkeypatch):
    seen, apply_model = [], tiny_model.apply_model

    def spy_apply_model(x_t, t, context):
        torch.rand(1)  # a model that draws from the global RNG while sampling
        seen.append((tiny_model.training, tiny_model.model.training, torch.is_grad_enabled(), ema[0]))
        return apply_model(x_t, t, context)

    ema = [False]

    @contextmanager
    def spy_ema_scope():
        ema[0] = True
        yield
        ema[0] = False

    monkeypatch.setattr(tiny_model, "apply_model", spy_apply_model)
    monkeypatch.setattr(tiny_model, "ema_scope", spy_ema_scope)
    tiny_model.train()
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    ImageLogger(steps=2, logdir=str(tmp_path)).on_train_batch_end(
        fake_trainer(tmp_path, 250), tiny_model, None, batch(["a"]), 0)
    assert seen and all(s == (False, False, False, True) for s in seen)
    assert torch.equal(torch.get_rng_state(), rng)
    assert tiny_model.training and tiny_model.model.training
    assert not tiny_model.first_stage_model.training  # the frozen VAE stays in eval mode


def test_a_broken_prompts_file_fails_at_start_and_warns_mid_run(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine\na cat --w lots\n")
    logger = ImageLogger(batch_frequency=1, steps=2, prompts_file=str(prompts), logdir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"{prompts}:2: --w 'lots'"):
        logger.on_fit_start(fake_trainer(tmp_path, 0), tiny_model)
    with pytest.warns(UserWarning, match=rf"{prompts}:2: --w 'lots'.*skipping the prompts grid at step 1"):
        logger.on_train_batch_end(fake_trainer(tmp_path, 1), tiny_model, None, batch(["a"]), 0)
    logger.wait()
    assert sorted(p.name for p in images_dir(tmp_path).iterdir()) == [
        "samples_gs-000001_e-00_batch.png", "samples_gs-000001_e-00_batch.txt"]


@pytest.mark.parametrize("options, lines", [
    ({}, ["a --n  --w 32 --h 32 --d 0 --s 40 --l 7.5 --ss ddim",
          "b --n  --w 32 --h 32 --d 1 --s 20 --l 7.5 --ss dpmpp_2m",
          "c --n  --w 32 --h 32 --d 2 --s 3 --l 7.5 --ss dpmpp_2m"]),
    ({"sampler": "dpmpp_2m", "steps": 5}, ["a --n  --w 32 --h 32 --d 0 --s 5 --l 7.5 --ss dpmpp_2m",
                                           "b --n  --w 32 --h 32 --d 1 --s 5 --l 7.5 --ss dpmpp_2m",
                                           "c --n  --w 32 --h 32 --d 2 --s 3 --l 7.5 --ss dpmpp_2m"]),
])
def test_each_prompt_gets_a_sampler_and_steps(tiny_model, tmp_path, options, lines):
    """DDIM at 40 steps by default; a prompt's --ss picks another sampler at that sampler's
    default steps, unless the logger's sampler and steps or the prompt's --s say otherwise."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb --ss dpmsolver++\nc --ss dpmpp_2m --s 3\n")
    logger = ImageLogger(batch_frequency=1, seed=0, prompts_file=str(prompts), logdir=str(tmp_path), **options)
    logger.log_samples(fake_trainer(tmp_path, 1), tiny_model)
    logger.wait()
    assert (images_dir(tmp_path) / "samples_gs-000001_e-00_prompts.txt").read_text().splitlines() == lines


def test_an_unknown_sampler_is_named():
    with pytest.raises(ValueError, match=r"ImageLogger sampler: unknown sampler 'euler' \(known: ddim, dpmpp_2m"):
        ImageLogger(sampler="euler")


def test_batch_size_comes_from_latents_and_is_capped(tiny_model, tmp_path):
    logger = ImageLogger(batch_frequency=1, steps=2, logdir=str(tmp_path))
    latents = {"caption": ["a"], "latent": torch.zeros(1, 4, 8, 16)}  # 32x64 px
    data_64px = SimpleNamespace(resolution=64)
    logger.on_train_batch_end(fake_trainer(tmp_path, 1, datamodule=data_64px), tiny_model, None, latents, 0)
    logger.wait()
    assert load(images_dir(tmp_path) / "samples_gs-000001_e-00_batch.png").size == (64, 32)
    big = batch(["a"], height=96, width=192)  # x0.47 to fit in 64^2 px: 45x90 -> 32x64
    logger.on_train_batch_end(fake_trainer(tmp_path, 2, datamodule=data_64px), tiny_model, None, big, 0)
    logger.wait()
    assert load(images_dir(tmp_path) / "samples_gs-000002_e-00_batch.png").size == (64, 32)
    # without a data module resolution: the model's image_size, 8 latent px = 32 px
    logger.on_train_batch_end(fake_trainer(tmp_path, 3), tiny_model, None, big, 0)
    logger.wait()
    assert load(images_dir(tmp_path) / "samples_gs-000003_e-00_batch.png").size == (32, 32)


class RandomCaptions(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image, "caption": f"random image {i}"}


def test_with_a_real_trainer(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle --w 64\n")
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="", version="")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=tb, default_root_dir=str(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ImageLogger(batch_frequency=1, steps=2, prompts_file=str(prompts))])
    trainer.fit(tiny_model, torch.utils.data.DataLoader(RandomCaptions(), batch_size=2))

    files = sorted(p.name for p in images_dir(tmp_path).iterdir())  # epoch end = step 2: not sampled twice
    assert files == [f"samples_gs-00000{s}_e-00_{kind}.{ext}" for s in (1, 2)
                     for kind in ("batch", "prompts") for ext in ("png", "txt")]
    assert load(images_dir(tmp_path) / "samples_gs-000002_e-00_batch.png").size == (64, 32)
    assert load(images_dir(tmp_path) / "samples_gs-000002_e-00_prompts.png").size == (128, 32)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/batch", "samples/prompts"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/batch")] == [1, 2]


def test_sampling_runs_uncompiled_under_cuda_graphs(tiny_model, tmp_path, monkeypatch):
    """compile: reduce-overhead: the sample grid runs with the compiled blocks set aside (a graph
    tree would reuse the memory of earlier blocks' outputs between no-grad calls)."""
    stances, real_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance",
                        lambda name, **kw: stances.append(name) or real_stance(name, **kw))
    monkeypatch.setattr(tiny_model, "cudagraphs", True)
    ImageLogger(steps=2, logdir=str(tmp_path)).on_train_batch_end(
        fake_trainer(tmp_path, 250), tiny_model, None, batch(["a"]), 0)
    assert stances == ["force_eager"]


@pytest.mark.parametrize("benchmark", [True, False])
def test_sampling_turns_cudnn_benchmark_off_and_restores_it(tiny_model, benchmark):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        with sampling_mode(tiny_model):
            assert torch.backends.cudnn.benchmark is False and not torch.is_grad_enabled()
        assert torch.backends.cudnn.benchmark is benchmark
    finally:
        torch.backends.cudnn.benchmark = old


def test_long_prompts_sample_with_a_long_prompt_text_encoder(tmp_path):
    """max_length 150: prompts past 75 tokens reach the UNet as [B, 154, D], negative prompt included."""
    cfg = OmegaConf.load("tests/configs/tiny.yaml").model
    cfg.params.cond_stage_config.params.max_length = 150
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    long = " ".join(["a red square on a blue field"] * 14)  # 98 tokens
    contexts = []
    model.model.register_forward_pre_hook(lambda module, args: contexts.append(args[2].shape))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long} --n blurry --w 32 --h 32 --s 2\n")
    logger = ImageLogger(batch_frequency=1, steps=2, prompts_file=str(prompts), logdir=str(tmp_path))
    logger.log_samples(fake_trainer(tmp_path, 1), model)
    logger.wait()
    assert (images_dir(tmp_path) / "samples_gs-000001_e-00_prompts.png").exists()
    assert contexts and all(shape[1:] == (154, model.cond_stage_model.transformer.text_model.config.hidden_size)
                            for shape in contexts)


def test_grids_are_written_in_a_writer_thread_and_a_failed_write_names_its_file(tiny_model, tmp_path, monkeypatch):
    threads, real_save = [], Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda im, fp, *a, **k: threads.append(threading.current_thread().name)
                        or real_save(im, fp, *a, **k))
    logger = ImageLogger(batch_frequency=1, steps=2, logdir=str(tmp_path))
    logger.on_train_batch_end(fake_trainer(tmp_path, 1), tiny_model, None, batch(["a"]), 0)
    logger.teardown(None, tiny_model, "fit")  # the end of the run waits for the writes
    assert (images_dir(tmp_path) / "samples_gs-000001_e-00_batch.png").exists()
    assert threads and all(name.startswith("sample-grid-writer") for name in threads)

    def full_disk(im, fp, *args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    logger.on_train_batch_end(fake_trainer(tmp_path, 2), tiny_model, None, batch(["a"]), 0)
    with pytest.raises(RuntimeError, match=r"could not write sample grid .*samples_gs-000002_e-00_batch.png: "
                                           r"No space left"):
        logger.wait()
    logger.teardown(None, tiny_model, "fit")


def test_log_first_step_samples_the_base_model_once_before_training(tiny_model, tmp_path):
    """log_first_step: a grid of the first batch's captions before the first optimizer step (the
    untrained weights), once however many micro-batches step 0 takes, and training is unchanged."""
    import copy

    def fit(model, folder, **logger_options):
        pl.seed_everything(3)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, default_root_dir=str(folder),
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[ImageLogger(batch_frequency=1000, steps=2, log_on_epoch_end=False,
                                                    **logger_options)])
        trainer.fit(model, torch.utils.data.DataLoader(RandomCaptions(), batch_size=2))
        return model

    untrained = copy.deepcopy(tiny_model)
    baseline = tmp_path / "baseline"
    first_batch = {"caption": ["random image 0", "random image 1"], "image": torch.zeros(2, 3, 32, 32)}
    reference = ImageLogger(steps=2, log_first_step=True, logdir=str(baseline))
    reference.on_train_batch_start(fake_trainer(baseline, 0), copy.deepcopy(untrained), first_batch, 0)
    reference.wait()

    with_grid = fit(copy.deepcopy(untrained), tmp_path / "with", log_first_step=True)
    without = fit(copy.deepcopy(untrained), tmp_path / "without")
    files = sorted(p.name for p in images_dir(tmp_path / "with").iterdir())
    assert files == ["samples_gs-000000_e-00_batch.png", "samples_gs-000000_e-00_batch.txt"]
    assert not (tmp_path / "without" / "images").exists()
    text = (images_dir(tmp_path / "with") / "samples_gs-000000_e-00_batch.txt").read_text().splitlines()
    assert [line.split(" --")[0] for line in text] == ["random image 0", "random image 1"]
    assert np.array_equal(np.asarray(load(images_dir(tmp_path / "with") / "samples_gs-000000_e-00_batch.png")),
                          np.asarray(load(images_dir(baseline) / "samples_gs-000000_e-00_batch.png")))
    trained, plain = with_grid.state_dict(), without.state_dict()
    assert not torch.equal(trained["model.diffusion_model.out.2.weight"],
                           untrained.state_dict()["model.diffusion_model.out.2.weight"])
    assert all(torch.equal(trained[k], plain[k]) for k in plain)  # sampling left training as it was

    accumulating = ImageLogger(steps=2, log_first_step=True, logdir=str(tmp_path / "acc"))
    for micro_batch in range(2):  # accumulate_grad_batches: step 0 takes two batches
        accumulating.on_train_batch_start(fake_trainer(tmp_path / "acc", 0), untrained, batch(["a"]), micro_batch)
    accumulating.wait()
    assert len(list(images_dir(tmp_path / "acc").iterdir())) == 2  # one grid, its .txt
    resumed = ImageLogger(steps=2, log_first_step=True, logdir=str(tmp_path / "resumed"))
    resumed.on_train_batch_start(fake_trainer(tmp_path / "resumed", 500), untrained, batch(["a"]), 0)
    assert not (tmp_path / "resumed").exists()  # a resumed run: its first grid is at its frequency
