"""The optimizer, built from the `model.params.optimizer` config section:

    optimizer:
      name: adamw            # a key of OPTIMIZERS
                             # (the UNet learning rate is model.base_learning_rate; LatentDiffusion
                             #  refuses `lr` here and fills it in)
      text_encoder_lr: null  # text encoder learning rate; null = same as lr
      weight_decay: 0.01
      betas: [0.9, 0.999]
      eps: 1.0e-8
      args: {}               # further keyword arguments for the optimizer class
      scheduler: constant    # see ldm.optim.schedules
      warmup: 0              # steps (int) or fraction of the run (float in [0, 1))
      num_cycles: 1          # cosine_with_restarts only
      power: 1.0             # polynomial only
      min_lr_ratio: 0.0      # floor of the decaying schedules, as a fraction of lr

Each optimizer is a builder in OPTIMIZERS (name -> function). Optimizers from
optional packages import them through `import_optional`, so a missing package
ends in an error that names the pip extra to install.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.optim.schedules import DEFAULT_KEY, check_schedule, make_scheduler
from ldm.util import ConfigError

PARAM_GROUPS = ("unet", "text_encoder")  # the trainable parts, in param-group order


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
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    args: Mapping[str, Any] = field(default_factory=dict)
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
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, Mapping):
            raise ConfigError(f"{key}: expected a mapping of optimizer settings, got {type(node).__name__}")
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(node) - set(accepted))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; "
                              f"accepted keys: {', '.join(accepted)}")
        defaults = cls()
        values = {**{f.name: getattr(defaults, f.name) for f in fields(cls)}, **node}

        name = values["name"]
        if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
            raise ConfigError(f"{key}.name: unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
        te_lr = values["text_encoder_lr"]
        betas = values["betas"]
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
        args = values["args"] if values["args"] is not None else {}
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            raise ConfigError(f"{key}.args: expected a mapping of keyword arguments, got {args!r}")
        check_schedule(values["scheduler"], values["warmup"], values["num_cycles"], values["power"],
                       values["min_lr_ratio"], key)
        return cls(
            name=name.lower(),
            lr=_number(values["lr"], f"{key}.lr", positive=True),
            text_encoder_lr=None if te_lr is None else _number(te_lr, f"{key}.text_encoder_lr", positive=True),
            weight_decay=_number(values["weight_decay"], f"{key}.weight_decay", positive=False),
            betas=tuple(float(b) for b in betas),
            eps=_number(values["eps"], f"{key}.eps", positive=True),
            args=dict(args),
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


def import_optional(module: str, extra: str, key: str = DEFAULT_KEY) -> ModuleType:
    """Import the package an optional optimizer needs, or say which pip extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}.name: this optimizer needs the optional package {module!r} ({e}); "
                          f"install it with: pip install \"everydream-ldm[{extra}]\"") from e


def _checked_args(optimizer_cls: type, cfg: OptimizerConfig, key: str) -> dict[str, Any]:
    """cfg.args, refusing keys that have their own setting or that the class does not take."""
    own = {"lr", "betas", "eps", "weight_decay"}
    accepted = set(inspect.signature(optimizer_cls).parameters) - {"self", "params"}
    for name in cfg.args:
        if name in own:
            raise ConfigError(f"{key}.args.{name}: set it as {key}.{name} instead")
        if name not in accepted:
            raise ConfigError(f"{key}.args.{name}: not an argument of {optimizer_cls.__name__}; "
                              f"accepted: {', '.join(sorted(accepted - own))}")
    return dict(cfg.args)


def _adamw(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if device_type == "cuda":
        kwargs["fused"] = True  # one kernel for all tensors; args.fused: false turns it off
    kwargs.update(_checked_args(torch.optim.AdamW, cfg, key))
    return torch.optim.AdamW(groups, **kwargs)


Builder = Callable[[list[dict[str, Any]], OptimizerConfig, str, str], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {
    "adamw": _adamw,
}


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
    return OPTIMIZERS[cfg.name](groups, cfg, device_type, key)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int,
                    key: str = DEFAULT_KEY) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR for `cfg`'s schedule over `total_steps` optimizer steps (step it every step)."""
    return make_scheduler(optimizer, cfg.scheduler, total_steps, cfg.warmup, cfg.num_cycles, cfg.power,
                          cfg.min_lr_ratio, key)
