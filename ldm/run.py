"""Build the model, data and Lightning Trainer from a validated config, and train.

The log folder (made by ldm.train) receives:
    configs/<stamp>-project.yaml   the merged config, as run
    checkpoints/                   epoch=EE-step=SSSSS.ckpt, last.ckpt, interrupted-*.ckpt
    images/train/                  sample grids
    events.out.tfevents.*          TensorBoard scalars and images
    dataset_plan.json              what the data plan counted
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger

from ldm.callbacks.adapter_saver import AdapterSaver
from ldm.callbacks.checkpointing import (AtomicCheckpointIO, BackgroundCheckpointIO, InterruptCheckpoint,
                                         RunCheckpoint)
from ldm.callbacks.latent_cache import LatentCacheFiller, wants_latent_cache
from ldm.callbacks.progress import RunProgressBar
from ldm.callbacks.tensorboard_crc import use_fast_crc32c
from ldm.callbacks.throughput import Throughput
from ldm.config import to_plain
from ldm.util import ConfigError, instantiate_from_config, launcher_rank

CHECKPOINT_DEFAULTS = {"filename": "{epoch:02d}-{step:05d}", "save_last": True, "save_top_k": -1,
                       "every_n_epochs": 1, "enable_version_counter": False}  # a resumed run keeps last.ckpt


def trainer_kwargs(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    kw = dict(to_plain(OmegaConf.select(cfg, "lightning.trainer", default=None) or {}))
    if args.devices is not None:
        kw["devices"] = _parse_devices(args.devices)
    if args.precision is not None:
        kw["precision"] = args.precision
    if "accelerator" not in kw:
        kw["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    kw.setdefault("devices", 1)
    if kw["accelerator"] == "cpu" and str(kw.get("precision", "32")).startswith("16"):
        raise ConfigError("lightning.trainer.precision: fp16 mixed precision needs a GPU; use bf16-mixed or 32 on CPU")
    return kw


def _parse_devices(value: str) -> Any:
    value = value.strip().rstrip(",")
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value) if value.lstrip("-").isdigit() else value


def learning_rate(cfg: DictConfig, args: argparse.Namespace, world_size: int) -> float:
    base_lr = float(cfg.model.get("base_learning_rate", 1.0e-4))
    if not args.scale_lr:
        say(f"Learning rate {base_lr:.2e} (base_learning_rate; --scale_lr is off)")
        return base_lr
    batch = int(OmegaConf.select(cfg, "data.params.batch_size", default=1))
    accum = int(OmegaConf.select(cfg, "lightning.trainer.accumulate_grad_batches", default=1) or 1)
    lr = accum * world_size * batch * base_lr
    say(f"Learning rate {lr:.2e} = {accum} (accumulate_grad_batches) x {world_size} (devices) x "
        f"{batch} (batch_size) x {base_lr:.2e} (base_learning_rate)")
    return lr


def _world_size(devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in (-1, "auto", "-1"):
        return max(torch.cuda.device_count(), 1)
    return 1


def build_callbacks(cfg: DictConfig, logdir: Path) -> list[pl.Callback]:
    lightning = cfg.get("lightning") or {}
    ckpt_params = dict(CHECKPOINT_DEFAULTS)
    ckpt_params.update(to_plain(OmegaConf.select(cfg, "lightning.modelcheckpoint.params", default=None) or {}))
    if ckpt_params.get("monitor") and OmegaConf.select(cfg, "data.params.validation", default=None) is None:
        raise ConfigError("lightning.modelcheckpoint.params.monitor: choosing checkpoints by a validation "
                          "metric needs a data.params.validation dataset")
    callbacks: list[pl.Callback] = [
        RunCheckpoint(dirpath=str(logdir / "checkpoints"), **ckpt_params),
        InterruptCheckpoint(logdir / "checkpoints"),
        LearningRateMonitor(logging_interval="step"),
    ]
    for name, node in (lightning.get("callbacks") or {}).items():
        extra = {"logdir": str(logdir)} if _accepts(node, "logdir") else {}
        callbacks.append(instantiate_from_config(node, path=f"lightning.callbacks.{name}", **extra))
    if not any(isinstance(cb, Throughput) for cb in callbacks):
        callbacks.append(Throughput())  # always on; a config may set its every_n_steps
    return callbacks


def checkpoint_io_for(cfg: DictConfig) -> AtomicCheckpointIO:
    """Checkpoints are written in the background while training goes on, except with
    save_last: link, whose link would point at a file still being written if the run died."""
    link_last = OmegaConf.select(cfg, "lightning.modelcheckpoint.params.save_last", default=True) == "link"
    return AtomicCheckpointIO() if link_last else BackgroundCheckpointIO()


def _accepts(node: Any, key: str) -> bool:
    import inspect

    from ldm.util import get_obj_from_str

    cls = get_obj_from_str(node["target"])
    return key in inspect.signature(cls).parameters


# The VAE and a frozen text encoder stay in eval mode on purpose (ldm.models.diffusion.ddpm).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Lightning warns that a mid-epoch resume is unreliable unless the loader itself is stateful;
# here the data module carries the position (ldm.data.datamodule), and the resume is exact.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def run_training(cfg: DictConfig, args: argparse.Namespace, *, logdir: Path | Callable[[], Path],
                 resume_ckpt: Path | None) -> int:
    """Train; `logdir` is the folder of a resumed run, or a callable that makes a new one (called
    only once the data has been scanned and the model built, so a bad input leaves no folder)."""
    from ldm import checkpoint as ckpt_io

    pl.seed_everything(args.seed, workers=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    kw = trainer_kwargs(cfg, args)
    world_size = _world_size(kw["devices"])

    data = instantiate_from_config(cfg.data, path="data") if "data" in cfg else None
    plan = None
    if data is not None and hasattr(data, "plan_report"):  # scans the images before a model is built
        accumulate = int(kw.get("accumulate_grad_batches") or 1)
        text, plan = data.plan_report(world_size, kw.get("max_epochs"), accumulate)
        say(text if getattr(data.datasets()["train"], "debug_level", 0) >= 1 else _plan_summary(plan))
        _print_total_steps(plan, kw)

    model = _build_model(cfg)
    model.learning_rate = learning_rate(cfg, args, world_size)
    adapter = getattr(model, "network_config", None) is not None
    output_name = None
    if adapter:
        say(model.network.summary())
        output_name = model.network_config.output_name or args.name or "adapter"
        OmegaConf.update(cfg, "model.params.network.output_name", output_name)  # a resumed run keeps it
        if resume_ckpt is not None and not args.actual_resume:
            raise ConfigError("--resume: an adapter run's checkpoints hold the adapter only; pass the base model "
                              "again with --actual_resume")
    if args.actual_resume and (resume_ckpt is None or adapter):  # adapter checkpoints lack the frozen base
        path = Path(args.actual_resume.replace("\\", "/"))
        state_dict = ckpt_io.load_state_dict(path)
        if hasattr(model, "check_checkpoint"):  # warns where the file looks made for another prediction type
            model.check_checkpoint(state_dict, source=str(path))
        report = ckpt_io.load_into_model(model, state_dict, source=str(path))
        say(report.summary())
        if report.ema_from_weights:
            model.reset_ema()

    if callable(logdir):
        logdir = logdir()
    if launcher_rank() == 0:  # the processes of ranks > 0 share rank 0's folder (ldm.train.make_logdir_later)
        if plan is not None:
            (logdir / "dataset_plan.json").write_text(json.dumps(plan, indent=2, default=str), encoding="utf-8")
        OmegaConf.save(cfg, logdir / "configs" / f"{stamp}-project.yaml")
        flags = {"seed": args.seed, "devices": args.devices, "precision": args.precision, "scale_lr": args.scale_lr,
                 "actual_resume": str(Path(args.actual_resume).resolve()) if args.actual_resume else None}
        (logdir / "configs" / f"{stamp}-cli.json").write_text(json.dumps(flags, indent=2))
    use_fast_crc32c()  # else each sample grid's image stalls a host-bound step ~1 s (tensorboard_crc.py)
    logger = TensorBoardLogger(save_dir=str(logdir), name="", version="", default_hp_metric=False)
    callbacks = build_callbacks(cfg, logdir) + [RunProgressBar()]
    if wants_latent_cache(data):  # cache_latents: encode what the cache lacks before the first step
        callbacks.append(LatentCacheFiller(batch_size=data.batch_size))
    if adapter:
        callbacks.append(AdapterSaver(logdir, output_name,
                                      base_model=args.actual_resume, seed=args.seed, plan=plan))
    trainer = pl.Trainer(**kw, callbacks=callbacks, logger=logger,
                         default_root_dir=str(logdir), plugins=[checkpoint_io_for(cfg)],
                         use_distributed_sampler=False)
    if not args.train:
        say(f"Built the run in {logdir}; pass -t to train.")
        return 0
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    except torch.OutOfMemoryError as e:
        graphed = getattr(getattr(model, "_graphed", None), "active", False)  # cuda_graphs recorded
        print(f"error: {out_of_memory_advice(cfg, e, logdir, graphed)}", file=sys.stderr)
        return 3
    say(f"Done. Run folder: {logdir}\n  checkpoints: {logdir / 'checkpoints'}\n"
        f"  samples:     {logdir / 'images' / 'train'}\n  TensorBoard: tensorboard --logdir {logdir}")
    return 0


def out_of_memory_advice(cfg: DictConfig, error: BaseException, logdir: Path, graphed: bool = False) -> str:
    """What to change when the GPU runs out of memory, with the run's own values (`graphed`: the
    UNet's steps were replayed from CUDA graphs, whose pool holds one step's memory aside)."""
    unet = "model.params.unet_config.params.use_checkpoint"
    batch = OmegaConf.select(cfg, "data.params.batch_size")
    checkpointing = bool(OmegaConf.select(cfg, unet, default=False))
    fixes = [f"lower data.params.batch_size (now {batch})"]
    if graphed:
        fixes.insert(0, "set model.params.cuda_graphs=false (the graphs' memory pool holds ~one training step's "
                        "activations beside what eager work keeps)")
    if not checkpointing:
        fixes.append(f"set {unet}=true (gradient checkpointing: an SD 1.x step at batch 6 peaks at ~14.2 GiB "
                     f"instead of ~17.2, and runs 1.3-1.9x slower)")
    fixes.append("or merge a memory preset after the base config (configs/stable-diffusion/presets/vram_12gb.yaml "
                 "or vram_6gb.yaml)")
    return (f"the GPU ran out of memory ({str(error).splitlines()[0] if str(error) else 'torch.OutOfMemoryError'}). "
            f"To fit: {'; '.join(fixes)}. The run folder {logdir} keeps what was saved so far.")


def say(text: str) -> None:
    """Print once per run, not once per GPU process."""
    if launcher_rank() == 0:
        print(text)


def _build_model(cfg: DictConfig) -> pl.LightningModule:
    node = {"target": cfg.model.target, "params": cfg.model.get("params") or {}}
    return instantiate_from_config(node, path="model")


def _plan_summary(plan: dict) -> str:
    steps = plan["steps"]
    return (f"Data: {plan['training_images']} training images ({plan['held_out_images']} held out, "
            f"{len(plan['skipped'])} skipped), {len(plan['buckets'])} buckets, {plan['epoch']['samples']} samples "
            f"and {steps['batches_per_rank']} batches of {steps['batch_size']} per epoch per device "
            f"(set data.params.train.params.debug_level=1 for the full plan; it is in dataset_plan.json)"
            + (f"\n{plan['regularisation']['summary']}" if plan.get("regularisation") else ""))


def _print_total_steps(plan: dict, kw: dict[str, Any]) -> None:
    per_epoch = plan["steps"]["steps_per_epoch"]
    max_steps, max_epochs = kw.get("max_steps", -1), kw.get("max_epochs")
    if kw.get("max_time"):
        say(f"Training stops after lightning.trainer.max_time={kw['max_time']} at the latest")
    if max_steps not in (None, -1):
        say(f"Training for {max_steps} optimizer steps (lightning.trainer.max_steps; {per_epoch} per epoch)")
    elif max_epochs not in (None, -1):
        say(f"Training for {per_epoch * max_epochs} optimizer steps = {max_epochs} epochs x {per_epoch} steps")
    else:
        say(f"Training with no step or epoch limit ({per_epoch} steps per epoch): stop it with Ctrl-C")
