import hashlib
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import prune_ckpt
from ldm.prune import format_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def fake_model_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "model.diffusion_model.input_blocks.0.0.weight": r(32, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": r(32),
        "model.diffusion_model.time_embed.0.weight": r(128, 32),
        "model.diffusion_model.out.2.weight": r(4, 32, 3, 3),
        "first_stage_model.encoder.conv_in.weight": r(32, 3, 3, 3),
        "first_stage_model.decoder.conv_out.bias": r(3),
        "first_stage_model.quant_conv.weight": r(8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": r(100, 64),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": r(64),
        POSITION_IDS: torch.arange(77)[None],
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "alphas_cumprod": torch.linspace(0.999, 0.005, 1000),
    }


def ema_name(unet_key: str) -> str:
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def fake_lightning_checkpoint() -> dict:
    """What a Lightning run with EMA and AdamW saves: EMA shadows differ from the weights by +100."""
    weights = fake_model_weights()
    state_dict = dict(weights)
    for k, v in weights.items():
        if k.startswith("model.diffusion_model."):
            state_dict[ema_name(k)] = v + 100.0
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    unet = [v for k, v in weights.items() if k.startswith("model.diffusion_model.")]
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "last_model_path": "x"}},
        "optimizer_states": [{
            "state": {i: {"step": torch.tensor(1234.0), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.ones_like(p)} for i, p in enumerate(unet)},
            "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "params": list(range(len(unet)))}],
        }],
        "lr_schedulers": [{"last_epoch": 1234, "base_lrs": [1e-6]}],
    }


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run" / "last.ckpt"
    path.parent.mkdir()
    torch.save(fake_lightning_checkpoint(), path)
    return path


def load_output(path):
    top = torch.load(path, map_location="cpu", weights_only=True)
    assert list(top) == ["state_dict"]  # no optimizer, loops, callbacks, epoch, global_step
    return top["state_dict"]


def test_default_keeps_model_weights_swaps_in_ema_and_writes_fp16(ckpt, capsys):
    before = sha256(ckpt)
    assert prune_ckpt.main(["--ckpt", str(ckpt)]) == 0
    out = ckpt.with_name("last-pruned.ckpt")
    assert sorted(os.listdir(ckpt.parent)) == ["last-pruned.ckpt", "last.ckpt"]
    sd = load_output(out)
    source = fake_model_weights()
    assert set(sd) == set(source)  # every model key kept, no model_ema.*
    for k, v in source.items():
        if k.startswith("model.diffusion_model."):
            assert sd[k].dtype == torch.float16
            assert torch.equal(sd[k], (v + 100.0).half())  # the EMA weights
        elif k in ("betas", "alphas_cumprod"):
            assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v)  # schedule stays exact
        elif k == POSITION_IDS:
            assert sd[k].dtype == torch.int64 and torch.equal(sd[k], v)
        else:
            assert sd[k].dtype == torch.float16 and torch.equal(sd[k], v.half())
    assert sha256(ckpt) == before

    printed = capsys.readouterr().out
    sizes = f"{format_size(ckpt.stat().st_size)} -> {format_size(out.stat().st_size)}"
    assert f"size: {sizes}" in printed
    assert out.stat().st_size < ckpt.stat().st_size / 2
    assert "EMA weights used as the UNet weights (all 4 UNet tensors)" in printed
    assert "dropped keys: ema 6" in printed  # 4 shadows + decay + num_updates
    assert "kept keys:    unet 4, vae 3, text_encoder 3, schedule 2" in printed
    for entry in ("optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step"):
        assert entry in printed


def test_no_ema_full_keeps_the_trained_weights_in_fp32(ckpt, capsys):
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--no-ema", "--full"]) == 0
    sd = load_output(ckpt.with_name("last-pruned.ckpt"))
    source = fake_model_weights()
    assert set(sd) == set(source)
    for k, v in source.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v)
    assert "EMA weights dropped (--no-ema)" in capsys.readouterr().out


def test_bf16(ckpt):
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--bf16"]) == 0
    sd = load_output(ckpt.with_name("last-pruned.ckpt"))
    assert sd["first_stage_model.quant_conv.weight"].dtype == torch.bfloat16


def test_safetensors_output(ckpt):
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--safetensors"]) == 0
    out = ckpt.with_name("last-pruned.safetensors")
    sd = safetensors.torch.load_file(out)
    assert set(sd) == set(fake_model_weights())
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert sd[POSITION_IDS].dtype == torch.int64


def test_refuses_to_overwrite_without_force(ckpt, capsys):
    out = ckpt.with_name("last-pruned.ckpt")
    out.write_bytes(b"an older export")
    assert prune_ckpt.main(["--ckpt", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert out.read_bytes() == b"an older export"
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--force"]) == 0
    assert "state_dict" in torch.load(out, weights_only=True)


def test_never_overwrites_the_input(ckpt, capsys):
    before = sha256(ckpt)
    for argv in (["--out", str(ckpt)], ["--out", str(ckpt), "--force"],
                 ["--out", str(ckpt.parent / ".." / "run" / "last.ckpt"), "--force"]):
        assert prune_ckpt.main(["--ckpt", str(ckpt), *argv]) == 1
        assert "is the input checkpoint" in capsys.readouterr().err
    assert sha256(ckpt) == before
    assert os.listdir(ckpt.parent) == ["last.ckpt"]


def test_out_file_or_directory_and_backslash_paths(ckpt, tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--out", str(exports)]) == 0
    assert (exports / "last-pruned.ckpt").is_file()
    windows_style = str(ckpt).replace("/", "\\")
    out = str(exports / "model.safetensors").replace("/", "\\")
    assert prune_ckpt.main(["--ckpt", windows_style, "--out", out]) == 0
    assert set(safetensors.torch.load_file(exports / "model.safetensors")) == set(fake_model_weights())


def test_conflicting_or_unknown_output_names(ckpt, capsys):
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--safetensors", "--out", str(ckpt.with_name("a.ckpt"))]) == 1
    assert "a.ckpt" in capsys.readouterr().err
    assert prune_ckpt.main(["--ckpt", str(ckpt), "--out", str(ckpt.with_name("a.bin"))]) == 1
    assert "a.bin: unknown output extension" in capsys.readouterr().err


class NotAllowed:
    pass


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint file not found"),
    (b"\x80\x02 this is not a checkpoint", "truncated or corrupt"),
    ("unsafe", "refused to load"),
    ({"state_dict": {"first_stage_model.x": torch.zeros(1)}}, "not a Stable Diffusion checkpoint"),
])
def test_bad_inputs_name_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "unsafe":
        torch.save({"state_dict": {}, "payload": NotAllowed()}, path)
    elif content is not None:
        torch.save(content, path)
    assert prune_ckpt.main(["--ckpt", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "bad-pruned.ckpt").exists()


def test_incomplete_ema_points_at_no_ema(tmp_path, capsys):
    top = fake_lightning_checkpoint()
    del top["state_dict"][ema_name("model.diffusion_model.out.2.weight")]
    path = tmp_path / "last.ckpt"
    torch.save(top, path)
    assert prune_ckpt.main(["--ckpt", str(path)]) == 1
    err = capsys.readouterr().err
    assert "incomplete EMA" in err and "--no-ema" in err and str(path) in err
    assert prune_ckpt.main(["--ckpt", str(path), "--no-ema"]) == 0


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        prune_ckpt.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ckpt", "--out", "--safetensors", "--no-ema", "--full", "--bf16", "--force"):
        assert option in text
    assert "-pruned.ckpt" in text and "never modified" in text


def test_full_and_bf16_are_exclusive(ckpt):
    with pytest.raises(SystemExit) as e:
        prune_ckpt.main(["--ckpt", str(ckpt), "--full", "--bf16"])
    assert e.value.code == 2


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1_536_000, "1.5 MB"),
                                     (999_960, "1.0 MB"), (11_300_000_000, "11.3 GB"), (2_130_000_000, "2.1 GB")])
def test_format_size(n, text):
    assert format_size(n) == text


def test_command_line(ckpt):
    before = sha256(ckpt)
    result = subprocess.run([sys.executable, "prune_ckpt.py", "--ckpt", str(ckpt), "--safetensors"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = ckpt.with_name("last-pruned.safetensors")
    assert f"size: {format_size(ckpt.stat().st_size)} -> {format_size(out.stat().st_size)}" in result.stdout
    assert set(safetensors.torch.load_file(out)) == set(fake_model_weights())
    assert sha256(ckpt) == before


def test_a_zero_terminal_snr_schedule_is_made_finite_for_other_tools(tmp_path, capsys):
    from ldm.models.diffusion import schedule
    from ldm.prune import A1111_TERMINAL_ABAR, prune_checkpoint

    betas = schedule.rescale_zero_terminal_snr(schedule.make_beta_schedule("linear", 1000, 0.00085, 0.012))
    buffers = schedule.schedule_buffers(betas)
    assert buffers["alphas_cumprod"][-1] == 0 and torch.isinf(buffers["sqrt_recip_alphas_cumprod"][-1])
    src = tmp_path / "ztsnr.ckpt"
    torch.save({"state_dict": {**fake_model_weights(), **buffers}}, src)
    report = prune_checkpoint(src, tmp_path / "out.safetensors")
    assert report.terminal_snr_fixed and "zero-terminal-SNR" in report.summary()
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert all(torch.isfinite(out[name]).all() for name in buffers)
    assert out["alphas_cumprod"][-1].item() == pytest.approx(A1111_TERMINAL_ABAR, rel=1e-5)
    assert torch.allclose(out["alphas_cumprod"][:-1], buffers["alphas_cumprod"][:-1], rtol=1e-4)  # the last step moves
    plain = prune_checkpoint(tmp_path / "out.safetensors", tmp_path / "again.safetensors")
    assert not plain.terminal_snr_fixed  # a finite schedule is left alone
