"""Reading and writing Stable Diffusion 1.x / 2.x checkpoint files.

Files come from the internet, so `.ckpt` / `.pt` / `.pth` files (pickles) are
read with `torch.load(weights_only=True)` plus a short allow-list of harmless
objects that Lightning and CompVis checkpoints carry; anything else is refused,
never loaded unsafely. `.safetensors` files hold tensors only.

State-dict keys follow the CompVis layout, which other tools read::

    model.diffusion_model.*        unet
    first_stage_model.*            vae
    cond_stage_model.*             text_encoder (SD1: .transformer.text_model.*, SD2: .model.*)
    model_ema.*                    ema   (UNet path without dots: model_ema.diffusion_modelinput_blocks00weight)
    betas, alphas_cumprod, ...     schedule
    anything else                  other

Public API: `load_state_dict`, `load_checkpoint_file`, `group_of`,
`use_ema_weights`, `load_into_model` (-> `LoadReport`), `save_checkpoint`.
"""
from __future__ import annotations

import collections
import os
import pathlib
import pickle
import re
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import omegaconf
import safetensors
import safetensors.torch
import torch
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

GROUPS = ("unet", "vae", "text_encoder", "ema", "schedule", "other")
NETWORK_GROUPS = ("unet", "vae", "text_encoder")  # weights a model cannot do without
_GROUP_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.": "text_encoder",
    "model_ema.": "ema",
}
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
})

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
ADAPTER_PREFIX = "network."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")  # kept in full precision on save
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
POSITION_IDS_KEY = SD1_TEXT_PREFIX + "embeddings.position_ids"
CLIP_CONTEXT_LENGTH = 77


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs objects outside the allow-list; it was not loaded."""


# --------------------------------------------------------------------------- allow-list
# Objects a weights-only unpickler may rebuild besides tensors and plain containers,
# each seen in real checkpoints. None of them runs code or touches files when rebuilt.
_NUMPY_SCALARS = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.float16, np.float32, np.float64)
_SAFE_GLOBALS: list[Any] = [
    # numpy scalars and dtypes (e.g. `global_step` saved as np.int64); numpy 1.x wrote `numpy.core`
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(t)) for t in _NUMPY_SCALARS),
    # OmegaConf configs in Lightning's `hyper_parameters`, and the types their metadata names
    omegaconf.DictConfig, omegaconf.ListConfig, Metadata, ContainerMetadata, AnyNode,
    typing.Any, dict, list, int, collections.defaultdict,
    # paths in `hyper_parameters`; a Windows path cannot be concrete on POSIX, so it stays pure
    pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
    # Lightning 1.x keyed `callbacks` by callback class: the key becomes the class's name
    ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
     "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, MemoryError):
            raise
        except pickle.UnpicklingError as e:
            raise _refusal_or_corruption(path, e) from None
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, the file may be "
                                  f"truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from e


def _refusal_or_corruption(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """Tell a pickle that wants forbidden objects apart from a damaged file."""
    # torch's message: generic advice, the reason (after "WeightsUnpickler error:" or a blank
    # line), then a pointer to its docs
    text = str(error).partition("Check the documentation")[0]
    reason = text.partition("WeightsUnpickler error:")[2] or text.partition("\n\n")[2]
    reason = " ".join(reason.split())
    try:  # lists every forbidden global at once; only works on the zip format
        offending = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        offending = re.findall(r"GLOBAL (\S+)", reason)[:1]
    if not offending and not re.search(r"GLOBAL|allowlist|unrecognized function", reason):
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint, the file may be "
                               f"truncated or corrupt ({reason or _first_line(error)})")
    what = f"the Python global(s) {', '.join(offending)}" if offending else f"an object torch refused ({reason})"
    return UnsafeCheckpointError(
        f"{path}: refused to load: it needs {what}, outside the allow-list of harmless "
        "checkpoint objects. .ckpt/.pt files are pickles, and unpickling can run arbitrary code, "
        "so only tensors and known-safe objects are loaded. If you trust this file, convert it "
        "to .safetensors with a trusted tool and use that file instead.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


# --------------------------------------------------------------------------- loading
def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a checkpoint file")
    if path.suffix.lower() not in (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX):
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}, expected one of "
                              f"{', '.join((*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX))}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    return path


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """The whole top-level dict of a checkpoint (`state_dict`, `global_step`, `epoch`, ...).

    A .safetensors file's top level is its dict of tensors.
    """
    path = _checked_path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file, it may be "
                                  f"truncated or corrupt ({e})") from e
    top = _torch_load(path)
    if not isinstance(top, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(top).__name__}")
    return dict(top)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from `state_dict` (up to twice); other entries dropped."""
    state_dict: Mapping = load_checkpoint_file(path)
    for _ in range(2):
        if isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


# --------------------------------------------------------------------------- key layout
def group_of(key: str) -> str:
    """Which part of the model a CompVis state-dict key belongs to (one of GROUPS)."""
    for prefix, group in _GROUP_PREFIXES.items():
        if key.startswith(prefix):
            return group
    return "schedule" if key in SCHEDULE_BUFFERS else "other"


def ema_key(unet_key: str) -> str:
    """`model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b` (CompVis LitEma naming)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def use_ema_weights(state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> dict:
    """A copy with every UNet weight replaced by its EMA counterpart and `model_ema.*` dropped."""
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    absent = [ema_key(k) for k in unet_keys if ema_key(k) not in state_dict]
    if absent:
        found = "has no EMA weights (model_ema.*)" if len(absent) == len(unet_keys) else "has an incomplete EMA set"
        raise CheckpointError(f"{source}: {found}; missing {_preview(absent)}")
    swapped = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    for k in unet_keys:
        swapped[k] = state_dict[ema_key(k)]
    return swapped


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} key(s): {shown}" + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _by_group(keys: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for k in keys:
        grouped.setdefault(group_of(k), []).append(k)
    return grouped


# --------------------------------------------------------------------------- into a model
@dataclass
class LoadReport:
    """What `load_into_model` did, key lists per group."""

    source: str
    loaded: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)     # model keys the file lacks (non-fatal ones)
    unexpected: dict[str, list[str]] = field(default_factory=dict)  # file keys the model has no place for
    ignored: list[str] = field(default_factory=list)                 # read but deliberately not copied
    ema_from_weights: bool = False  # the model has EMA, the file none: initialise EMA from the weights

    def summary(self) -> str:
        def counts(groups: dict[str, list[str]]) -> str:
            return " ".join(f"{g}={len(groups[g])}" for g in GROUPS if groups.get(g))

        lines = [f"{self.source}: loaded {counts(self.loaded) or 'nothing'}"]
        if self.missing:
            lines.append(f"  missing (kept the model's own values): {counts(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (not used): {counts(self.unexpected)}")
        if self.ignored:
            lines.append(f"  ignored: {', '.join(self.ignored)}")
        if self.ema_from_weights:
            lines.append("  no EMA weights in the file: EMA starts from the loaded weights")
        return "\n".join(lines)


def load_into_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                    use_ema: bool = False, source: str = "<state dict>") -> LoadReport:
    """Copy `state_dict` into `model`, casting to each target's dtype; checks everything first.

    Raises CheckpointError (a ValueError naming `source`) if a unet/vae/text_encoder weight is
    missing, a shape differs, or the file's EMA set is incomplete; the model is untouched then.
    SD1's `position_ids` is never copied: the model keeps its own arange(77).
    """
    if use_ema:
        state_dict = use_ema_weights(state_dict, source=source)
    # adapter weights (`network.*`, ldm.modules.adapters) never come from a base checkpoint
    targets = {k: v for k, v in model.state_dict().items() if not k.startswith(ADAPTER_PREFIX)}
    report = LoadReport(source, ignored=[POSITION_IDS_KEY] if POSITION_IDS_KEY in state_dict else [])

    missing = _by_group(k for k in targets if k not in state_dict and k != POSITION_IDS_KEY)
    fatal = {g: keys for g, keys in missing.items() if g in NETWORK_GROUPS}
    if fatal:
        raise CheckpointError(f"{source}: weights the model needs are missing from the file: "
                              + "; ".join(f"{g}: {_preview(keys)}" for g, keys in fatal.items()))
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(targets[k].shape)}"
                  for k, v in state_dict.items()
                  if k in targets and k != POSITION_IDS_KEY and v.shape != targets[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: {len(mismatched)} tensor(s) have the wrong shape: "
                              + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    model_ema = [k for k in targets if k.startswith(EMA_PREFIX)]
    if "ema" in missing and len(missing["ema"]) < len(model_ema):
        raise CheckpointError(f"{source}: has an incomplete EMA set; missing {_preview(missing['ema'])}")

    report.missing = missing
    report.unexpected = _by_group(k for k in state_dict if k not in targets and k != POSITION_IDS_KEY)
    report.ema_from_weights = bool(model_ema) and "ema" in missing
    with torch.no_grad():
        for k, target in targets.items():
            if k in state_dict and k != POSITION_IDS_KEY:
                target.copy_(state_dict[k])  # copy_ casts to the target's dtype and device
                report.loaded.setdefault(group_of(k), []).append(k)
    return report


# --------------------------------------------------------------------------- saving
def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    extra: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write `state_dict` atomically as .ckpt/.pt/.pth ({"state_dict": sd, **extra}) or .safetensors.

    `dtype` casts the floating-point network weights (and their EMA copies); integer tensors,
    schedule buffers and the EMA decay keep their dtype (fp16 would round a decay of 0.9999 to 1).
    SD1 files get a correct `position_ids` (arange(77), int64, [1, 77]).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX):
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}, expected one of "
                              f"{', '.join((*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX))}")
    extra = dict(extra or {})
    if suffix == SAFETENSORS_SUFFIX and extra:
        raise CheckpointError(f"{path}: .safetensors holds tensors only, cannot store extra "
                              f"entries {sorted(extra)}; save as .ckpt instead")
    if "state_dict" in extra:
        raise CheckpointError(f"{path}: `extra` must not contain a 'state_dict' entry")
    tensors = _prepared(state_dict, dtype, path)

    if suffix == SAFETENSORS_SUFFIX:
        _write_atomically(path, lambda tmp: safetensors.torch.save_file(
            _unshared(tensors), tmp, metadata={"format": "pt"}))
    else:
        _write_atomically(path, lambda tmp: torch.save({"state_dict": tensors, **extra}, tmp))


def _prepared(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None, path: Path) -> dict:
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        keep = not v.is_floating_point() or group_of(k) == "schedule" or k in EMA_COUNTERS
        tensors[k] = (v if dtype is None or keep else v.to(dtype)).contiguous()  # as other tools expect
    if any(k.startswith(SD1_TEXT_PREFIX) for k in tensors):
        position_ids = torch.arange(CLIP_CONTEXT_LENGTH, dtype=torch.int64)[None]  # [1, 77]
        old = tensors.get(POSITION_IDS_KEY)
        if old is None or old.dtype != torch.int64 or not torch.equal(old.cpu(), position_ids):
            tensors[POSITION_IDS_KEY] = position_ids
    return tensors


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with one storage each: safetensors refuses tensors that share memory."""
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.contiguous()
        storage = (v.device, v.untyped_storage().data_ptr())
        out[k] = v.clone() if storage in seen else v
        seen.add(storage)
    return out


def _write_atomically(path: Path, write: typing.Callable[[Path], None]) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: no partial file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    open(tmp, "xb").close()  # claim a fresh name; the final file gets the usual umask permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(directory)
    finally:
        os.close(directory)
