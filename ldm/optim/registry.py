"""The optimizers `model.params.optimizer.name` can pick, one builder each (OPTIMIZERS).

    adamw       torch.optim.AdamW, fused on CUDA. The default; what the SD fine-tunes used.
    adamw8bit   bitsandbytes' AdamW8bit (extra `adamw8bit`): AdamW with its two moments stored
                in 8 bits, about 75% less optimizer memory. For full fine-tunes on small GPUs.
    lion        lion_pytorch's Lion (extra `lion`): one moment, sign updates. Half AdamW's state;
                use a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's.
    prodigy     prodigyopt's Prodigy (extra `prodigy`): estimates its own step size; lr is a
                multiplier on that estimate and should stay about 1.0. Only the first param
                group's lr counts: the others are set to it, with a warning.
    adamw_bf16  AdamW for weights stored in bf16 (`model.params.unet_precision: bf16`): fp32
                arithmetic, weights and moments written back with stochastic rounding
                (ldm.optim.low_memory). 6 bytes per parameter of weights and state instead of 12.
    adamw8bit_bf16 adamw_bf16 with bitsandbytes' 8-bit moments (extra `adamw8bit`): its update on
                an fp32 copy of each weight, written back with stochastic rounding
                (ldm.optim.eight_bit). 4 bytes per parameter of weights and state; the 6 GiB preset.
    adamw_master AdamW on fp32 master copies of weights stored in bf16 (`unet_precision: bf16`):
                autocast's arithmetic without its per-step weight and gradient casts
                (ldm.optim.master_weights). fp32 AdamW's memory; checkpoints hold the masters.
    adafactor   torch.optim.Adafactor (transformers' Adafactor where torch has none): factored
                second moment, no first moment, the least state. Its step is
                min(lr, 1/sqrt(t)) x the parameter's RMS (relative step, parameter scaling):
                lr 1e-2 with a constant schedule is kohya's default (relative_step=True).

Every builder passes `betas`, `eps` and `weight_decay` only when they are set (null keeps the
class's own default) and refuses one the class has no use for. `args` go through unchanged,
checked against the class's signature. The optimizer's `built_with` holds the keyword
arguments it was built with besides params and lr (the adapter header records them).

A param group whose lr is 0 (the text encoder after `text_encoder_stop`) does not move
under any of these optimizers: AdamW, AdamW8bit and Lion scale both the update and the weight
decay by lr; torch's Adafactor caps its step at lr; Prodigy, which would still apply its
global step to such a group, is subclassed to leave it out of the step.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ldm.optim.schedules import DEFAULT_KEY
from ldm.util import ConfigError

if TYPE_CHECKING:
    from ldm.optim.optimizers import OptimizerConfig

SHARED = ("betas", "eps", "weight_decay")  # settings of the section that map onto class arguments


# name -> (the optional package it imports, the pip extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "adamw8bit": ("bitsandbytes", "adamw8bit"),
    "adamw8bit_bf16": ("bitsandbytes", "adamw8bit"),
    "lion": ("lion_pytorch", "lion"),
    "prodigy": ("prodigyopt", "prodigy"),
}


def _missing(module: str, extra: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}.name: this optimizer needs the optional package {module!r} ({why}); "
                       f"install it with: pip install \"everydream-ldm[{extra}]\"")


def import_optional(module: str, extra: str, key: str = DEFAULT_KEY) -> ModuleType:
    """Import the package an optional optimizer needs, or say which pip extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(module, extra, key, str(e)) from e


def check_installed(name: str, key: str = DEFAULT_KEY) -> None:
    """When the config is read: the package optimizer `name` needs is installed (found, not yet
    imported), so a missing one stops the run before the model and its weights are loaded."""
    if name in PACKAGES:
        module, extra = PACKAGES[name]
        # imported already, or findable; sys.modules[module] = None marks an import that fails
        if sys.modules.get(module) is None and importlib.util.find_spec(module) is None:
            raise _missing(module, extra, key, "not installed")


def _checked_args(optimizer_cls: type, cfg: OptimizerConfig, key: str,
                  own: tuple[str, ...] = SHARED) -> dict[str, Any]:
    """cfg.args, refusing keys that have their own setting or that the class does not take."""
    own_set = {"lr", *own}
    accepted = set(inspect.signature(optimizer_cls).parameters) - {"self", "params"}
    for name in cfg.args:
        if name in own_set:
            raise ConfigError(f"{key}.args.{name}: set it as {key}.{name} instead")
        if name not in accepted:
            raise ConfigError(f"{key}.args.{name}: not an argument of {optimizer_cls.__name__}; "
                              f"accepted: {', '.join(sorted(accepted - own_set))}")
    return dict(cfg.args)


def _kwargs(optimizer_cls: type, cfg: OptimizerConfig, key: str, own: tuple[str, ...] = SHARED,
            defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The set shared settings the class takes (`own`), the builder's defaults, then cfg.args."""
    kwargs: dict[str, Any] = {}
    for name in SHARED:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in own:
            raise ConfigError(f"{key}.{name}: {cfg.name} ({optimizer_cls.__name__}) has no such setting; "
                              f"leave it unset (null)")
        kwargs[name] = tuple(value) if name == "betas" else value
    kwargs.update(defaults or {})
    kwargs.update(_checked_args(optimizer_cls, cfg, key, own))
    return kwargs


def _make(optimizer_cls: type, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    opt = optimizer_cls(groups, lr=groups[0]["lr"], **kwargs)  # each group carries its own lr
    opt.built_with = dict(kwargs)
    return opt


def _adamw(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    defaults = {"fused": True} if device_type == "cuda" else {}  # one kernel for all tensors
    return _make(torch.optim.AdamW, groups, _kwargs(torch.optim.AdamW, cfg, key, defaults=defaults))


def _adamw8bit(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    cls = import_optional(*PACKAGES["adamw8bit"], key).optim.AdamW8bit
    return _make(cls, groups, _kwargs(cls, cfg, key))


def _lion(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    cls = import_optional(*PACKAGES["lion"], key).Lion
    return _make(cls, groups, _kwargs(cls, cfg, key, own=("betas", "weight_decay")))


@functools.lru_cache(maxsize=None)
def _prodigy_class(base: type) -> type:
    """Prodigy that leaves param groups with lr 0 out of the step.

    Prodigy applies one global step size (from the largest group lr) to every group, so a group
    whose lr drops to 0 after training would keep moving on its stale moments. Here such groups'
    gradients are set aside for the step (after the closure, which makes them) and put back.
    """
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = [(p, p.grad) for g in self.param_groups if g["lr"] == 0 for p in g["params"]]
        for p, _ in held:
            p.grad = None
        try:
            base.step(self, None)
        finally:
            for p, grad in held:
                p.grad = grad
        return loss

    return type(base.__name__, (base,), {"step": step, "__doc__": _prodigy_class.__doc__})


def _prodigy(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    cls = _prodigy_class(import_optional(*PACKAGES["prodigy"], key).Prodigy)
    lr = groups[0]["lr"]
    if not 0.1 <= lr <= 10.0:
        rank_zero_warn(f"{key}: prodigy estimates the step size itself and its learning rate is a multiplier "
                       f"on it, best about 1.0 (model.base_learning_rate, or network.unet_lr); got {lr:g}")
    others = {g["name"]: g["lr"] for g in groups[1:] if g["lr"] != lr}
    if others:
        rank_zero_warn(f"{key}: prodigy takes one learning rate, the first param group's ({groups[0]['name']}: "
                       f"{lr:g}); " + ", ".join(f"{n}'s {v:g}" for n, v in others.items()) + " is not used")
        for g in groups:
            g["lr"] = lr
    return _make(cls, groups, _kwargs(cls, cfg, key))


TRANSFORMERS_ONLY = ("relative_step", "scale_parameter", "warmup_init", "clip_threshold", "decay_rate", "beta1")


def _adafactor(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str, key: str) -> torch.optim.Optimizer:
    own = ("weight_decay",)  # its eps is a pair (eps1, eps2): args.eps
    cls = getattr(torch.optim, "Adafactor", None)
    if cls is not None:
        foreign = [a for a in cfg.args if a in TRANSFORMERS_ONLY]
        if foreign:
            raise ConfigError(f"{key}.args.{foreign[0]}: an argument of transformers' Adafactor; torch.optim.Adafactor "
                              f"always takes the relative step min(lr, 1/sqrt(t)) scaled by the parameter's RMS, so "
                              f"lr 1e-2 is kohya's default and a smaller lr a fixed step (scaled by the RMS)")
        return _make(cls, groups, _kwargs(cls, cfg, key, own))
    from transformers.optimization import Adafactor  # torch < 2.5: the same algorithm, no 1/sqrt(t) cap
    defaults = dict(relative_step=False, scale_parameter=True, warmup_init=False)
    return _make(Adafactor, groups, _kwargs(Adafactor, cfg, key, own, defaults))


def _adamw_bf16(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str,
                key: str) -> torch.optim.Optimizer:
    from ldm.optim.low_memory import AdamWBF16

    return _make(AdamWBF16, groups, _kwargs(AdamWBF16, cfg, key))


def _adamw8bit_bf16(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str,
                    key: str) -> torch.optim.Optimizer:
    import_optional(*PACKAGES["adamw8bit_bf16"], key)
    from ldm.optim.eight_bit import AdamW8bitBF16

    return _make(AdamW8bitBF16, groups, _kwargs(AdamW8bitBF16, cfg, key))


def _adamw_master(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str,
                  key: str) -> torch.optim.Optimizer:
    from ldm.optim.master_weights import AdamWMaster

    return _make(AdamWMaster, groups, _kwargs(AdamWMaster, cfg, key))


Builder = Callable[[list[dict[str, Any]], "OptimizerConfig", str, str], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adamw_bf16": _adamw_bf16,
    "adamw8bit_bf16": _adamw8bit_bf16,
    "adamw_master": _adamw_master,
    "lion": _lion,
    "prodigy": _prodigy,
    "adafactor": _adafactor,
}
