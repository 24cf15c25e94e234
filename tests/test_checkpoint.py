"""ldm/checkpoint.py: bit-exact round trips (.ckpt, .safetensors), raw, wrapped and Lightning
files, old pickles, the text encoder's position ids, and loading into a model (groups, EMA,
missing and mismatched weights). Refusals and failed saves: test_checkpoint_refusals.py."""
import collections
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoint import (
    POSITION_IDS_KEY,
    CheckpointError,
    group_of,
    load_checkpoint_file,
    load_into_model,
    load_state_dict,
    save_checkpoint,
    use_ema_weights,
)
from tiny_ldm import TinyLDM, assert_bit_exact, random_sd, sd_of

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_then_load_is_bit_exact(tmp_path, suffix, dtype):
    sd = random_sd(dtype, ema=True)
    path = tmp_path / f"model{suffix}"
    save_checkpoint(sd, path)
    assert_bit_exact(load_state_dict(path), sd)
    if suffix == ".safetensors":
        with safetensors.safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("wrap", ["raw", "wrapped", "wrapped twice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loads_raw_and_wrapped_state_dicts(tmp_path, wrap, dtype):
    sd = random_sd(dtype)
    obj = {"raw": sd, "wrapped": {"state_dict": sd}, "wrapped twice": {"state_dict": {"state_dict": sd}}}[wrap]
    torch.save(obj, tmp_path / "m.pt")
    assert_bit_exact(load_state_dict(tmp_path / "m.pt"), sd)


def test_extra_entries_and_dtype_cast(tmp_path):
    sd = random_sd(torch.float32, ema=True)
    save_checkpoint(sd, tmp_path / "m.ckpt", extra={"global_step": 7, "epoch": 2}, dtype=torch.float16)
    top = load_checkpoint_file(tmp_path / "m.ckpt")
    assert (top["global_step"], top["epoch"]) == (7, 2)
    loaded = top["state_dict"]
    assert loaded["model.diffusion_model.out.weight"].dtype == torch.float16
    assert loaded["model_ema.diffusion_modeloutweight"].dtype == torch.float16
    assert torch.equal(loaded["model.diffusion_model.out.weight"], sd["model.diffusion_model.out.weight"].half())
    for key in ["betas", "model_ema.decay"]:  # full precision: fp16 rounds 0.9999 to 1.0
        assert loaded[key].dtype == torch.float32
    assert loaded["model_ema.num_updates"].dtype == torch.int32
    assert loaded[POSITION_IDS_KEY].dtype == torch.int64


def test_safetensors_refuses_extra_and_handles_shared_tensors(tmp_path):
    sd = random_sd()
    with pytest.raises(CheckpointError, match="m.safetensors"):
        save_checkpoint(sd, tmp_path / "m.safetensors", extra={"global_step": 1})
    tied = sd["model.diffusion_model.out.weight"]
    sd["other.tied"] = tied                   # same tensor under two names
    sd["other.view"] = tied.t()               # a non-contiguous view of it
    save_checkpoint(sd, tmp_path / "m.safetensors")
    assert_bit_exact(load_state_dict(tmp_path / "m.safetensors"), {k: v.contiguous() for k, v in sd.items()})


@pytest.mark.parametrize("bad", [None, torch.arange(77.0)[None], torch.arange(1, 78)[None], torch.arange(77)])
def test_sd1_files_get_correct_position_ids(tmp_path, bad):
    sd = random_sd()
    del sd[POSITION_IDS_KEY]
    if bad is not None:
        sd[POSITION_IDS_KEY] = bad
    for name in ["m.ckpt", "m.safetensors"]:
        save_checkpoint(sd, tmp_path / name)
        ids = load_state_dict(tmp_path / name)[POSITION_IDS_KEY]
        assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


def test_sd2_files_get_no_position_ids(tmp_path):
    sd = {"cond_stage_model.model.positional_embedding": torch.randn(77, 8), "betas": torch.rand(10)}
    save_checkpoint(sd, tmp_path / "m.safetensors")
    assert load_state_dict(tmp_path / "m.safetensors").keys() == sd.keys()


# --------------------------------------------------------------------------- Lightning and old files
def lightning_like(sd):
    from pytorch_lightning.callbacks import ModelCheckpoint

    return {
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [None]}],
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"ready": 4}}}},
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "/ckpts"},
                      "ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(float("inf"))}},
        "hyper_parameters": {"cfg": OmegaConf.create({"lr": 1e-4, "unet": {"ch": [1, 2]}, "ref": "${lr}"}),
                             "out": pathlib.Path("/runs/x"), "win": pathlib.PureWindowsPath(r"C:\runs"),
                             "counts": collections.defaultdict(list), "order": collections.OrderedDict(a=1)},
    }


def test_lightning_like_checkpoint_loads(tmp_path):
    sd = random_sd()
    torch.save(lightning_like(sd), tmp_path / "m.ckpt")
    assert_bit_exact(load_state_dict(tmp_path / "m.ckpt"), sd)
    top = load_checkpoint_file(tmp_path / "m.ckpt")
    assert top["global_step"] == 1000 and top["epoch"] == 3
    assert top["hyper_parameters"]["cfg"].ref == 1e-4
    assert top["hyper_parameters"]["out"] == pathlib.PurePosixPath("/runs/x")
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in top["callbacks"]


def test_windows_path_from_a_windows_machine_loads(tmp_path, monkeypatch):
    class WindowsPath(pathlib.PureWindowsPath):  # how pickle names a concrete Windows path
        pass
    WindowsPath.__module__, WindowsPath.__qualname__ = "pathlib", "WindowsPath"
    monkeypatch.setattr(pathlib, "WindowsPath", WindowsPath)
    torch.save({"state_dict": random_sd(), "hyper_parameters": {"out": WindowsPath(r"C:\runs")}}, tmp_path / "m.ckpt")
    monkeypatch.undo()
    out = load_checkpoint_file(tmp_path / "m.ckpt")["hyper_parameters"]["out"]
    assert out == pathlib.PureWindowsPath(r"C:\runs")


def test_real_lightning_checkpoint_loads(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self, cfg, out_dir, lr=1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.model = nn.Module()
            self.model.diffusion_model = nn.Linear(4, 1)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.model.diffusion_model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    module = Module(OmegaConf.create({"unet": {"channels": 4}, "lr": 1e-3}), tmp_path)
    data = DataLoader(TensorDataset(torch.randn(4, 4), torch.randn(4, 1)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    top = load_checkpoint_file(tmp_path / "last.ckpt")
    assert top["global_step"] == 1 and "optimizer_states" in top and "loops" in top
    assert top["hyper_parameters"]["cfg"].unet.channels == 4
    assert top["hyper_parameters"]["out_dir"] == tmp_path
    assert_bit_exact(load_state_dict(tmp_path / "last.ckpt"), sd_of(module))


@pytest.mark.parametrize("numpy_module", [b"numpy._core.multiarray", b"numpy.core.multiarray"])
def test_numpy_global_step_loads(tmp_path, numpy_module):
    """numpy 1.x wrote `numpy.core.multiarray.scalar`; rewrite a legacy-format file to say so."""
    sd = random_sd()
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd, "global_step": np.int64(470000), "lr": np.float32(1e-4)}, path,
               _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"cnumpy._core.multiarray\nscalar\n" in data
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"c" + numpy_module + b"\n"))
    top = load_checkpoint_file(path)
    assert top["global_step"] == 470000 and top["lr"] == np.float32(1e-4)
    assert_bit_exact(load_state_dict(path), sd)


# --------------------------------------------------------------------------- groups, EMA, load into model
@pytest.mark.parametrize("key, group", [
    ("model.diffusion_model.input_blocks.0.0.weight", "unet"),
    ("first_stage_model.encoder.conv_in.weight", "vae"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "text_encoder"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "text_encoder"),
    ("model_ema.diffusion_modelinput_blocks00weight", "ema"),
    ("model_ema.num_updates", "ema"),
    ("alphas_cumprod", "schedule"),
    ("posterior_mean_coef2", "schedule"),
    ("logvar", "other"),
    ("model.betas", "other"),
])
def test_group_of(key, group):
    assert group_of(key) == group


def test_use_ema_weights_swaps_in_ema_tensors():
    sd = random_sd(ema=True)
    swapped = use_ema_weights(sd)
    assert not any(k.startswith("model_ema.") for k in swapped)
    assert torch.equal(swapped["model.diffusion_model.input_blocks.0.weight"],
                       sd["model_ema.diffusion_modelinput_blocks0weight"])
    assert torch.equal(swapped["first_stage_model.encoder.weight"], sd["first_stage_model.encoder.weight"])
    assert "model_ema.decay" in sd  # the input is left alone

    del sd["model_ema.diffusion_modeloutbias"]
    with pytest.raises(CheckpointError, match="incomplete.*model_ema.diffusion_modeloutbias"):
        use_ema_weights(sd, source="x.ckpt")
    with pytest.raises(CheckpointError, match="x.ckpt: has no EMA"):
        use_ema_weights(random_sd(), source="x.ckpt")


def test_load_into_model_copies_casts_and_reports():
    model = TinyLDM(ema=True).to(torch.bfloat16)
    sd = random_sd(torch.float32)
    sd["logvar"] = torch.zeros(10)  # "other" the model does not have
    del sd["alphas_cumprod"]
    report = load_into_model(model, sd, source="m.ckpt")

    weight = model.model.diffusion_model.input_blocks[0].weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, sd["model.diffusion_model.input_blocks.0.weight"].bfloat16())
    assert report.unexpected == {"other": ["logvar"]}
    assert report.missing["schedule"] == ["alphas_cumprod"]
    assert report.ema_from_weights and "model_ema.decay" in report.missing["ema"]
    assert report.ignored == [POSITION_IDS_KEY]
    assert len(report.loaded["unet"]) == 4 and len(report.loaded["schedule"]) == 1
    summary = report.summary()
    assert "m.ckpt" in summary and "unet=4" in summary and "other=1" in summary and "EMA" in summary


def test_load_into_model_with_ema_file():
    sd = random_sd(ema=True)
    model = TinyLDM(ema=True)
    report = load_into_model(model, sd)
    assert not report.ema_from_weights and len(report.loaded["ema"]) == 6
    assert model.model_ema.num_updates.item() == 123

    model = TinyLDM(ema=True)
    report = load_into_model(model, sd, use_ema=True)
    assert torch.equal(model.model.diffusion_model.out.weight, sd["model_ema.diffusion_modeloutweight"])
    assert report.ema_from_weights  # the file's EMA now lives in the weights

    model = TinyLDM(ema=False)
    report = load_into_model(model, sd)
    assert len(report.unexpected["ema"]) == 6 and not report.ema_from_weights

    del sd["model_ema.diffusion_modeloutbias"]
    with pytest.raises(CheckpointError, match="incomplete EMA.*model_ema.diffusion_modeloutbias"):
        load_into_model(TinyLDM(ema=True), sd, source="m.ckpt")


@pytest.mark.parametrize("missing", ["model.diffusion_model.out.weight", "first_stage_model.encoder.bias",
                                     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
def test_missing_weight_is_fatal_and_named(missing):
    model = TinyLDM()
    before = sd_of(model)
    sd = random_sd()
    del sd[missing]
    with pytest.raises(ValueError, match=f"m.ckpt.*{group_of(missing)}: 1 key.*{missing}"):
        load_into_model(model, sd, source="m.ckpt")
    assert_bit_exact(sd_of(model), before)  # nothing was copied


def test_shape_mismatch_is_fatal_and_names_both_shapes():
    model = TinyLDM()
    sd = random_sd()
    sd["first_stage_model.encoder.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"m.ckpt.*first_stage_model.encoder.weight: file \[4, 3, 3, 3\] "
                                         r"vs model \[4, 3, 1, 1\]"):
        load_into_model(model, sd, source="m.ckpt")


def test_corrupt_position_ids_are_never_copied():
    sd = random_sd()
    sd[POSITION_IDS_KEY] = torch.tensor([[0.0, 1.0, *range(2, 76), 75.999]])  # rounding damage seen in merges
    model = TinyLDM(position_ids=True)
    report = load_into_model(model, sd)
    assert torch.equal(model.cond_stage_model.transformer.text_model.embeddings.position_ids, torch.arange(77)[None])
    assert report.ignored == [POSITION_IDS_KEY] and not report.unexpected

    del sd[POSITION_IDS_KEY]  # absent from the file: fine too, not "missing"
    assert not load_into_model(TinyLDM(position_ids=True), sd).missing
