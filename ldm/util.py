"""Building objects from `target:` / `params:` configs, the CompVis way.

A config node looks like::

    target: ldm.models.autoencoder.AutoencoderKL
    params: {embed_dim: 4, ...}

`instantiate_from_config(node, path="model.params.first_stage_config")` imports
`target`, calls it with `params`, and turns every failure into a `ConfigError`
that names the config path, so a typo in a YAML points at the line to fix.
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config node that cannot be turned into an object; the message names its path."""


def get_obj_from_str(target: str, path: str = "<config>") -> Any:
    """Import `package.module.Name` and return `Name`."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{path}.target: expected 'package.module.Name', got {target!r}")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{path}.target: cannot import module {module_name!r} ({e})") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{path}.target: module {module_name!r} has no {attr!r}") from None


def _to_plain(node: Any) -> Any:
    """OmegaConf containers become dicts/lists so constructors get plain Python values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _check_params(cls: Any, params: Mapping[str, Any], path: str) -> None:
    """Name an unknown key before the constructor fails with a bare TypeError."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = set(sig.parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"{path}.params: unknown key(s) {', '.join(unknown)} for {cls.__module__}.{cls.__qualname__}; "
            f"accepted keys: {', '.join(sorted(known))}"
        )
    missing = [n for n, p in sig.parameters.items()
               if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in params]
    if missing:
        raise ConfigError(f"{path}.params: missing required key(s) {', '.join(missing)} "
                          f"for {cls.__module__}.{cls.__qualname__}")


def instantiate_from_config(config: Any, path: str = "<config>", **extra: Any) -> Any:
    """Build `config.target(**config.params, **extra)`; errors name `path`."""
    config = _to_plain(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params', got {type(config).__name__}")
    unknown = sorted(set(config) - {"target", "params"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (a node has only 'target' and 'params')")
    if "target" not in config:
        raise ConfigError(f"{path}: missing 'target'")
    cls = get_obj_from_str(config["target"], path)
    params = dict(config.get("params") or {})
    params.update(extra)
    _check_params(cls, params, path)
    return cls(**params)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (Lightning sets RANK / LOCAL_RANK in
    the processes it starts for ranks > 0), before or without a process group: 0 otherwise."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def section_values(cls: Any, node: Any, key: str, what: str) -> dict[str, Any]:
    """A plain config section (`model.params.optimizer`, `...network`) checked against the fields
    of dataclass `cls`: {field: value}, the defaults filled in; an unknown key is an error
    naming `key` and the accepted keys."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}: expected a mapping of {what}, got {type(node).__name__}")
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(node) - set(accepted))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; accepted keys: {', '.join(accepted)}")
    defaults = cls()
    return {**{name: getattr(defaults, name) for name in accepted}, **node}
