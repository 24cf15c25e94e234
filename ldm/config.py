"""Run configuration: YAML files merged left to right, `key.path=value` overrides, validation.

Validation happens before anything heavy is built, and every problem names the
dotted key at fault:
  * top-level sections are `model`, `data` and `lightning`;
  * every `target:`/`params:` node is checked against its target's signature,
    recursively (so `model.params.unet_config.params.num_head` is caught at once);
  * `lightning.trainer` keys are checked against `pytorch_lightning.Trainer`;
  * an override must name a key that exists, or one the target accepts.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import ConfigError, get_obj_from_str

SECTIONS = {
    "model": {"base_learning_rate", "target", "params"},
    "data": {"target", "params"},
    "lightning": {"trainer", "callbacks", "modelcheckpoint"},
}
# Plain mappings whose keys their parser checks (OptimizerConfig, NetworkConfig).
CHECKED_SECTIONS = ("model.params.optimizer", "model.params.network")
# Trainer arguments main.py sets itself; a config that sets them would be overridden silently.
TRAINER_MANAGED = {"callbacks", "logger", "plugins", "default_root_dir", "use_distributed_sampler"}


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, OmegaConf errors, decoding errors
        raise ConfigError(f"{path}: cannot read YAML ({e})") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def parse_overrides(tokens: Iterable[str]) -> list[tuple[str, Any]]:
    """`a.b=c` tokens -> [(key, parsed value)], with YAML typing of the value."""
    out = []
    for tok in tokens:
        if "=" not in tok or tok.startswith("-"):
            raise ConfigError(f"unrecognised argument {tok!r}: overrides look like key.path=value "
                              f"(e.g. lightning.trainer.max_epochs=6)")
        key, _, raw = tok.partition("=")
        try:
            value = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.from_dotlist([f"v={raw}"]).v}))["v"]
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
        out.append((key.strip(), value))
    return out


def load_config(base: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge the `--base` YAMLs, apply overrides, validate; returns the resolved config."""
    files = list(base)
    if not files:
        raise ConfigError("no config given: pass --base configs/....yaml")
    cfg = OmegaConf.merge(*(load_yaml(f) for f in files))
    for key, value in parse_overrides(overrides):
        _check_override_key(cfg, key)
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    validate_config(cfg)
    return cfg


def _check_override_key(cfg: DictConfig, key: str) -> None:
    """An override may add a key only where a target's signature or the Trainer checks it."""
    if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
        return
    parent, _, leaf = key.rpartition(".")
    if not parent:
        raise ConfigError(f"override {key}: unknown top-level section (expected one of {', '.join(SECTIONS)})")
    if parent in ("lightning.trainer", "lightning.modelcheckpoint.params"):
        return  # checked against the Trainer's / ModelCheckpoint's signature
    if parent in CHECKED_SECTIONS:
        return  # checked, key by key, by the section's own parser
    owner = parent.rpartition(".")[0]
    if parent.endswith("params") and OmegaConf.select(cfg, f"{owner}.target" if owner else "target", default=None):
        return  # checked against the target's signature
    if OmegaConf.select(cfg, parent, default=None) is None:
        raise ConfigError(f"override {key}: {parent} does not exist in the config")
    raise ConfigError(f"override {key}: unknown key {leaf!r} under {parent}")


_MISSING = object()


def validate_config(cfg: DictConfig) -> None:
    for section in cfg:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown top-level section (expected {', '.join(SECTIONS)})")
        node = cfg[section]
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{section}: expected a mapping")
        for key in node:
            if key not in SECTIONS[section]:
                raise ConfigError(f"{section}.{key}: unknown key (expected {', '.join(sorted(SECTIONS[section]))})")
    if "model" not in cfg:
        raise ConfigError("model: the config has no model section")
    for section in ("model", "data"):
        if section in cfg:
            extra = {"base_learning_rate"} if section == "model" else set()
            validate_target_node(cfg[section], section, extra_keys=extra)
    lightning = cfg.get("lightning") or {}
    validate_trainer_args(lightning.get("trainer") or {}, "lightning.trainer")
    validate_checkpoint_args(lightning.get("modelcheckpoint") or {}, "lightning.modelcheckpoint")
    for name, cb in (lightning.get("callbacks") or {}).items():
        validate_target_node(cb, f"lightning.callbacks.{name}")


def validate_target_node(node: Any, path: str, extra_keys: set[str] = frozenset()) -> None:
    """Check `node.params` against `node.target`'s signature, recursing into nested target nodes."""
    if not isinstance(node, (DictConfig, Mapping)):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params'")
    unknown = set(node) - {"target", "params"} - set(extra_keys)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    if "target" not in node:
        raise ConfigError(f"{path}: missing 'target'")
    cls = get_obj_from_str(node["target"], path)
    params = node.get("params") or {}
    sig, hints = _signature(cls), _hints(cls)
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        for key in params:
            if key not in sig.parameters:
                raise ConfigError(f"{path}.params.{key}: unknown key for {node['target']} "
                                  f"(accepted: {', '.join(sorted(sig.parameters))})")
            _check_type(params[key], sig.parameters[key], hints, f"{path}.params.{key}")
    for key, value in params.items():
        if isinstance(value, (DictConfig, Mapping)) and "target" in value:
            validate_target_node(value, f"{path}.params.{key}")


def validate_trainer_args(trainer: Mapping[str, Any], path: str) -> None:
    import pytorch_lightning as pl

    sig, hints = inspect.signature(pl.Trainer.__init__), _hints(pl.Trainer.__init__)
    for key in trainer:
        if key in TRAINER_MANAGED:
            raise ConfigError(f"{path}.{key}: set by main.py; remove it from the config")
        if key not in sig.parameters or key == "self":
            raise ConfigError(f"{path}.{key}: not a pytorch_lightning.Trainer argument")
        _check_type(trainer[key], sig.parameters[key], hints, f"{path}.{key}")


def validate_checkpoint_args(node: Mapping[str, Any], path: str) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    for key in node:
        if key != "params":
            raise ConfigError(f"{path}.{key}: unknown key (expected params)")
    params = node.get("params") or {}
    sig, hints = inspect.signature(ModelCheckpoint.__init__), _hints(ModelCheckpoint.__init__)
    for key in params:
        if key == "dirpath":
            raise ConfigError(f"{path}.params.dirpath: set by main.py (<run folder>/checkpoints); remove it")
        if key not in sig.parameters or key == "self":
            raise ConfigError(f"{path}.params.{key}: not a pytorch_lightning ModelCheckpoint argument")
        _check_type(params[key], sig.parameters[key], hints, f"{path}.params.{key}")


def _signature(cls: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):
        return None


def _check_type(value: Any, param: inspect.Parameter, hints: Mapping[str, Any], path: str) -> None:
    """Catch the common bad value: text where a number or a boolean is expected."""
    expected = _scalar_types(hints.get(param.name, param.annotation), param.default)
    if value is None or not expected or isinstance(value, (dict, list, DictConfig, ListConfig)):
        return
    if isinstance(value, bool) and bool not in expected:
        ok = False
    else:
        ok = isinstance(value, tuple(expected)) or (float in expected and isinstance(value, int))
    if not ok:
        names = " or ".join(sorted(t.__name__ for t in expected))
        raise ConfigError(f"{path}: expected {names}, got {value!r}")


def _scalar_types(annotation: Any, default: Any) -> set[type]:
    """{int, float, bool, str} the parameter takes, or an empty set when unsure."""
    import typing

    scalars = {int, float, bool, str}
    if annotation in scalars:
        return {annotation}
    args = typing.get_args(annotation)
    if args and all(a in scalars or a is type(None) for a in args):
        return {a for a in args if a in scalars}
    if annotation is inspect.Parameter.empty and type(default) in scalars:
        return {type(default)}
    return set()


def _hints(fn: Any) -> Mapping[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:
        return {}


def to_plain(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
