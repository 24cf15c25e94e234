"""The optimizer, built from the `model.params.optimizer` config section:

    optimizer:
      name: adamw            # a key of OPTIMIZERS: adamw, adamw8bit, adamw_bf16, adamw8bit_bf16,
                             #  adamw_master, lion, prodigy, adafactor
                             # (ldm.optim.registry says when to use which)
                             # (the UNet learning rate is model.base_learning_rate; LatentDiffusion
                             #  refuses `lr` here and fills it in)
      text_encoder_lr: null  # text encoder learning rate; null = same as lr
      text_encoder_stop: null  # stop training the text encoder after this many steps (int) or
                             #  this fraction of the run (float in (0, 1)); null = never
      weight_decay: null     # null = the optimizer's own default (AdamW: 0.01)
      betas: null            # null = the optimizer's own default (AdamW: [0.9, 0.999])
      eps: null              # null = the optimizer's own default (AdamW: 1e-8)
      args: {}               # further keyword arguments for the optimizer class
      fused_backward: false  # step buckets of weights in the backward pass, freeing their
                             #  gradients (ldm.optim.low_memory.StepInBackward)
      scheduler: constant    # see ldm.optim.schedules
      warmup: 0              # steps (int) or fraction of the run (float in [0, 1))
      num_cycles: 1          # cosine_with_restarts only
      power: 1.0             # polynomial only
      min_lr_ratio: 0.0      # floor of the decaying schedules, as a fraction of lr

Each optimizer is a builder in OPTIMIZERS (name -> function, ldm.optim.registry). Optimizers
from optional packages import them through `import_optional`, so a missing package ends in an
error that names the pip extra to install; reading the config already checks that the package
is installed (`check_installed`), before any model or weights are loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn

from ldm.optim.registry import OPTIMIZERS, check_installed, import_optional
from ldm.optim.schedules import DEFAULT_KEY, TEXT_ENCODER, check_schedule, check_text_encoder_stop, make_scheduler
from ldm.util import ConfigError, section_values

__all__ = ["OPTIMIZERS", "OptimizerConfig", "build_optimizer", "build_scheduler", "import_optional", "planned_steps",
           "schedule_steps"]

PARAM_GROUPS = ("unet", TEXT_ENCODER)  # the trainable parts, in param-group order


def _number(value: Any, key: str, *, positive: bool) -> float:
    """`value` as a float, checked to be > 0 (positive) or >= 0."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or value < 0 or (positive and value == 0):
        raise ConfigError(f"{key}: expected a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1.0e-6
    text_encoder_lr: float | None = None
    text_encoder_stop: int | float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    fused_backward: bool = False
    scheduler: str = "constant"
    warmup: int | float = 0
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float = 0.0

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None, key: str = DEFAULT_KEY) -> OptimizerConfig:
        """Parse and check a config section; every error names `{key}.<setting>`."""
        if node is None:
            return cls()
        values = section_values(cls, node, key, "optimizer settings")

        name = values["name"]
        if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
            raise ConfigError(f"{key}.name: unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
        check_installed(name.lower(), key)
        te_lr = values["text_encoder_lr"]
        betas, wd, eps = values["betas"], values["weight_decay"], values["eps"]
        if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
        args = values["args"] if values["args"] is not None else {}
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            raise ConfigError(f"{key}.args: expected a mapping of keyword arguments, got {args!r}")
        check_schedule(values["scheduler"], values["warmup"], values["num_cycles"], values["power"],
                       values["min_lr_ratio"], key)
        check_text_encoder_stop(values["text_encoder_stop"], key)
        if not isinstance(values["fused_backward"], bool):
            raise ConfigError(f"{key}.fused_backward: expected true or false, got {values['fused_backward']!r}")
        if values["fused_backward"] and name.lower() == "adamw_master":
            raise ConfigError(f"{key}.fused_backward: not with adamw_master (its masters are updated after the "
                              f"backward pass); use adamw_bf16 for steps in the backward pass, or set it false")
        if values["fused_backward"] and name.lower() == "prodigy":
            raise ConfigError(f"{key}.fused_backward: prodigy estimates one step size from all parameters "
                              f"together and cannot step them one by one; use another optimizer or set it false")
        return cls(
            name=name.lower(),
            lr=_number(values["lr"], f"{key}.lr", positive=True),
            text_encoder_lr=None if te_lr is None else _number(te_lr, f"{key}.text_encoder_lr", positive=True),
            text_encoder_stop=values["text_encoder_stop"],
            weight_decay=None if wd is None else _number(wd, f"{key}.weight_decay", positive=False),
            betas=None if betas is None else tuple(float(b) for b in betas),
            eps=None if eps is None else _number(eps, f"{key}.eps", positive=True),
            args=dict(args),
            fused_backward=values["fused_backward"],
            scheduler=values["scheduler"],
            warmup=values["warmup"],
            num_cycles=values["num_cycles"],
            power=float(values["power"]),
            min_lr_ratio=float(values["min_lr_ratio"]),
        )

    def group_lr(self, group: str) -> float:
        """Learning rate of a param group: the text encoder falls back to `lr`."""
        if group == "text_encoder" and self.text_encoder_lr is not None:
            return self.text_encoder_lr
        return self.lr


def build_optimizer(param_groups: Mapping[str, Iterable[nn.Parameter]], cfg: OptimizerConfig,
                    device_type: str, key: str = DEFAULT_KEY) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` ({"unet": params, "text_encoder": params}).

    Each non-empty part becomes one param group carrying its own lr and a "name"
    (which Lightning's LearningRateMonitor uses in the logged metric name).
    `device_type` is the parameters' device type ("cuda", "cpu", ...).
    """
    unknown = sorted(set(param_groups) - set(PARAM_GROUPS))
    if unknown:
        raise ValueError(f"build_optimizer: unknown param group(s) {', '.join(unknown)}; expected {PARAM_GROUPS}")
    groups = []
    for name in PARAM_GROUPS:
        params = list(param_groups.get(name, ()))
        if params:
            groups.append({"params": params, "lr": cfg.group_lr(name), "name": name})
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters (the UNet and text encoder are both frozen)")
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"{key}.name: unknown optimizer {cfg.name!r}; available: {', '.join(OPTIMIZERS)}")
    if cfg.fused_backward:
        from ldm.optim.low_memory import StepInBackward

        wrapper = StepInBackward(groups, lambda one: OPTIMIZERS[cfg.name](one, cfg, device_type, key))
        if cfg.name == "adamw8bit_bf16":  # the wrapper is what checkpoints load
            from ldm.optim.eight_bit import keep_8bit_state_on_load

            keep_8bit_state_on_load(wrapper)
        return wrapper
    return OPTIMIZERS[cfg.name](groups, cfg, device_type, key)


def match_state_layouts(optimizer: torch.optim.Optimizer) -> int:
    """Give each per-weight state tensor (AdamW's moments) its weight's memory layout; returns
    how many were copied. A resumed run restores the state as the file holds it (contiguous,
    as checkpoints are written), while `model.params.channels_last` stores weights NHWC: fused
    AdamW walks weight, gradient and moments as flat memory, so an NHWC weight with NCHW
    moments would be updated with another element's moments, silently."""
    copied = 0
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for name, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 1
                    and value.stride() != param.stride()):
                state[name] = torch.empty_like(param, dtype=value.dtype, device=value.device).copy_(value)
                copied += 1
    return copied


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int,
                    key: str = DEFAULT_KEY) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR for `cfg`'s schedule over `total_steps` optimizer steps (step it every step)."""
    if cfg.text_encoder_stop is not None and not any(g.get("name") == TEXT_ENCODER for g in optimizer.param_groups):
        rank_zero_warn(f"{key}.text_encoder_stop: the text encoder is not trained, so there is nothing to stop")
    return make_scheduler(optimizer, cfg.scheduler, total_steps, cfg.warmup, cfg.num_cycles, cfg.power,
                          cfg.min_lr_ratio, key, text_encoder_stop=cfg.text_encoder_stop)


def schedule_steps(trainer: Any) -> int | float:
    """The run's optimizer steps, the learning-rate schedule's length: counted from the data
    plan as trainer.estimated_stepping_batches counts them from the loader (max_epochs,
    max_steps, limit_train_batches, accumulation). That property iterates the training loader,
    and called in configure_optimizers (before on_fit_start) it would fork persistent workers
    holding datasets that the latent cache has not given their entries yet. Without a plan, or
    without an epoch limit, the trainer counts."""
    planned = planned_steps(trainer)
    return trainer.estimated_stepping_batches if planned is None else planned


def planned_steps(trainer: Any) -> int | float | None:
    """schedule_steps' count from the data plan; None without a plan or an epoch limit."""
    datasets = getattr(trainer.datamodule, "datasets", None)
    train = datasets()["train"] if datasets is not None else None
    if train is None or not hasattr(train, "batch_sampler") or trainer.max_epochs in (None, -1):
        return None
    batches = len(train.batch_sampler(trainer.world_size, trainer.global_rank))
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    total = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total
