"""Train the tiny shapes base model from scratch with the project's own trainer (`make tiny-base`).

    python scripts/train_tiny_base.py [--out logs/tiny-base] [--images 20000]
                                      [--vae-minutes 2] [--ldm-minutes 6] [--accelerator gpu]

1. generated, captioned 64 px shapes (scripts/make_shapes.py) in <out>/data;
2. the VAE:  main.py --base configs/tiny/autoencoder.yaml -t ...;
3. scale_factor = 1 / std of the VAE's latents over 2,000 training images;
4. UNet + text encoder, VAE frozen:
       main.py --base configs/tiny/model.yaml configs/tiny/train-base.yaml -t ...
           model.params.first_stage_config.params.ckpt_path=<VAE> model.params.scale_factor=<s>
5. the EMA weights, pruned to fp16 safetensors in CompVis layout: <out>/tiny-shapes.safetensors,
   and <out>/summary.json (times, final losses, scale factor).
Each stage stops at its time budget (Lightning max_time). doc/TINY_BASE.md has the record.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def last_scalar(run: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else None


def latent_std(vae_ckpt: Path, data: Path, count: int = 2000) -> float:
    """Std of posterior samples over `count` images (CompVis's rescale: 1 / this)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.data.batching import collate_batch
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(ROOT / "configs/tiny/model.yaml").model.params
    vae = instantiate_from_config({"target": cfg.first_stage_config.target,
                                   "params": {**OmegaConf.to_container(cfg.first_stage_config.params),
                                              "ckpt_path": str(vae_ckpt)}}).eval()
    ds = instantiate_from_config({"target": "ldm.data.ed_validate.EDValidateBatch",
                                  "params": {"data_root": str(data), "batch_size": 100, "resolution": 64,
                                             "bucket_step": 16, "min_side": 32}})
    zs, seen = [], 0
    with torch.no_grad():
        for keys in ds.batch_sampler():
            x = collate_batch([ds[k] for k in keys])["image"]
            zs.append(vae.encode(x).sample(generator=torch.Generator().manual_seed(seen)).flatten())
            seen += len(keys)
            if seen >= count:
                break
    return torch.cat(zs).std().item()


def run_dir(logs: Path, name: str) -> Path:
    return max(logs.glob(f"*_{name}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "tiny-base")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--vae-minutes", type=float, default=2.0)
    ap.add_argument("--ldm-minutes", type=float, default=6.0)
    ap.add_argument("--accelerator", default=None, help="gpu or cpu (default: gpu if present)")
    args, extra = ap.parse_known_args(argv)

    from ldm.prune import prune_checkpoint
    from ldm.train import main as train_main
    from scripts.make_shapes import make_shapes

    out, t_start = args.out, time.perf_counter()
    data, logs = out / "data", out / "logs"
    if not data.is_dir():
        make_shapes(data, count=args.images, size=64, seed=1)
    common = ["--data_root", str(data), "-l", str(logs), "lightning.trainer.max_epochs=10000"]
    if args.accelerator:
        common.append(f"lightning.trainer.accelerator={args.accelerator}")
    if args.accelerator == "cpu":
        common.append("lightning.trainer.precision=32")

    def budget(minutes: float) -> str:
        s = int(minutes * 60)
        return f"lightning.trainer.max_time=00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"

    t0 = time.perf_counter()
    if train_main(["--base", str(ROOT / "configs/tiny/autoencoder.yaml"), "-t", "-n", "tiny-vae", *common,
                   budget(args.vae_minutes), *extra]):
        return 1
    vae_run = run_dir(logs, "tiny-vae")
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"
    t_vae = time.perf_counter() - t0
    scale = 1.0 / latent_std(vae_ckpt, data)
    print(f"VAE latent std {1 / scale:.4f}: scale_factor {scale:.5f}")

    t0 = time.perf_counter()
    if train_main(["--base", str(ROOT / "configs/tiny/model.yaml"), str(ROOT / "configs/tiny/train-base.yaml"),
                   "-t", "-n", "tiny-ldm", *common, budget(args.ldm_minutes),
                   f"model.params.first_stage_config.params.ckpt_path={vae_ckpt}",
                   f"model.params.scale_factor={scale:.5f}", *extra]):
        return 1
    ldm_run = run_dir(logs, "tiny-ldm")
    t_ldm = time.perf_counter() - t0
    report = prune_checkpoint(ldm_run / "checkpoints" / "last.ckpt", out / "tiny-shapes.safetensors",
                              safetensors=True, force=True)
    print(report.summary())
    import torch

    from ldm.checkpoint import load_checkpoint_file
    last = load_checkpoint_file(ldm_run / "checkpoints" / "last.ckpt")
    summary = {
        "images": args.images, "scale_factor": round(scale, 5),
        "vae": {"minutes": round(t_vae / 60, 2), "val_rec_loss_l1": last_scalar(vae_run, "val/rec_loss"),
                "run": vae_run.name},
        "ldm": {"minutes": round(t_ldm / 60, 2), "steps": last["global_step"], "epochs": last["epoch"],
                "val_loss": last_scalar(ldm_run, "val/loss"),
                "val_loss_no_ema": last_scalar(ldm_run, "val/loss_no_ema"),
                "train_loss_smooth": last_scalar(ldm_run, "train/loss_smooth"), "run": ldm_run.name},
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "weights": str(report.dst), "size_bytes": report.size_after,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
