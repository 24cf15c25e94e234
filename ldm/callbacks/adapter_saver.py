"""Write the adapter as kohya-format .safetensors files during and after training.

    <run>/adapters/<output_name>-000001.safetensors   every network.save_every_n_epochs epochs
    <run>/adapters/<output_name>.safetensors          when training ends

Files are written atomically by rank 0, in network.save_precision, with the `ss_*` and
`modelspec.*` header (ldm.modules.adapters.files.kohya_metadata). They load unchanged in
AUTOMATIC1111 (`<lora:name:1>`) and ComfyUI, and continue a run with --network_weights.
"""
from __future__ import annotations

import datetime as _dt
import random
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl

from ldm.modules.adapters.config import PRECISIONS
from ldm.modules.adapters.files import kohya_metadata, model_hashes, write_adapter


class AdapterSaver(pl.Callback):
    def __init__(self, logdir: str | Path, output_name: str, *, base_model: str | None = None,
                 seed: int | None = None, plan: Mapping[str, Any] | None = None):
        self.dir = Path(logdir) / "adapters"
        self.output_name = output_name
        self.base_model = base_model
        self.seed = seed
        self.plan = dict(plan or {})
        self.session_id = random.SystemRandom().randrange(2**31)
        self.started_at: _dt.datetime | None = None
        self._base_hashes: dict[str, str] | None = None
        self.written: list[Path] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started_at = _dt.datetime.now()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = pl_module.network_config.save_every_n_epochs
        epoch = trainer.current_epoch + 1
        if every and epoch % every == 0 and not trainer.sanity_checking:
            self.save(trainer, pl_module, f"{self.output_name}-{epoch:06d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module, self.output_name, final=True)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stem: str, final: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        cfg = pl_module.network_config
        path = self.dir / f"{stem}.safetensors"
        metadata = kohya_metadata(cfg, self.run_info(trainer, pl_module, final))
        write_adapter(path, pl_module.network.tensors(PRECISIONS[cfg.save_precision]), metadata)
        self.written.append(path)
        if final:
            print(f"Adapter: {path} ({path.stat().st_size / 2**20:.1f} MiB)")

    def run_info(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> dict[str, Any]:
        """What the file's header records about this run (see kohya_metadata)."""
        opt = trainer.optimizers[0] if trainer.optimizers else None
        lrs = {g.get("name"): g.get("initial_lr", g["lr"]) for g in opt.param_groups} if opt else {}
        ocfg = pl_module.optimizer_config
        te = pl_module.cond_stage_model
        settings = self.plan.get("settings") or {}
        info = {
            "output_name": self.output_name,
            "v2": not hasattr(te, "transformer"),
            "v_prediction": pl_module.parameterization == "v",
            "resolution": settings.get("resolution"),
            "clip_skip": getattr(te, "clip_skip", None),
            "max_token_length": getattr(te, "max_token_length", None),
            "base_model": self.base_model,
            "base_hashes": self.base_hashes(),
            "seed": self.seed,
            "session_id": self.session_id,
            "started_at": self.started_at,
            "finished_at": _dt.datetime.now() if final else None,
            "steps": trainer.global_step,
            "epoch": trainer.current_epoch + (0 if final else 1),
            "max_steps": trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
            "num_epochs": trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None,
            "batches_per_epoch": trainer.num_training_batches if trainer.num_training_batches != float("inf") else None,
            "batch_size": settings.get("batch_size"),
            "world_size": trainer.world_size,
            "accumulate": trainer.accumulate_grad_batches,
            "precision": _kohya_precision(str(trainer.precision)),
            "gradient_checkpointing": bool(getattr(pl_module.model.diffusion_model, "use_checkpoint", False)),
            "max_grad_norm": trainer.gradient_clip_val,
            "learning_rate": pl_module.learning_rate,
            "unet_lr": lrs.get("unet"),
            "text_encoder_lr": lrs.get("text_encoder"),
            "optimizer": _optimizer_name(opt, ocfg),
            "scheduler": ocfg.scheduler,
            "warmup": ocfg.warmup,
            "prior_loss_weight": settings.get("prior_loss_weight"),
            "plan": self.plan,
            "model_fields": pl_module.kohya_fields() if hasattr(pl_module, "kohya_fields") else {},
        }
        return info

    def base_hashes(self) -> dict[str, str]:
        if self._base_hashes is None:
            path = Path(self.base_model) if self.base_model else None
            self._base_hashes = model_hashes(path) if path is not None and path.is_file() else {}
        return self._base_hashes


def _kohya_precision(precision: str) -> str:
    """Lightning's precision as kohya's --mixed_precision: no, fp16 or bf16."""
    return "bf16" if precision.startswith("bf16") else "fp16" if precision.startswith("16") else "no"


def _optimizer_name(opt: Any, ocfg: Any) -> str | None:
    """`torch.optim.adamw.AdamW(weight_decay=0.01,fused=True)`, kohya's style: the class (the first one of
    its MRO not from ldm, so a thin subclass reads as its package's) and the keyword arguments it was
    built with besides params and lr (ldm.optim.registry records them as `built_with`)."""
    if opt is None:
        return None
    args = getattr(opt, "built_with", None)
    if args is None:  # not from build_optimizer: the section's settings
        args = {k: getattr(ocfg, k) for k in ("weight_decay", "betas", "eps") if getattr(ocfg, k, None) is not None}
        args.update(dict(ocfg.args))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    cls = next((c for c in type(opt).__mro__ if not c.__module__.startswith("ldm.")), type(opt))
    text = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({text})" if text else "")
