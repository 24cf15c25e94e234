"""The `model.params.network` config section: which adapter to train and how it is saved.

    network:
      algo: lora              # lora | locon | loha | lokr
      dim: 16                 # rank of Linear and 1x1-conv adapters
      alpha: 8                # ΔW is scaled by alpha / dim
      conv_dim: null          # rank of 3x3-conv adapters (ResBlocks, down/upsamplers): locon
      conv_alpha: null        #   null: dim, and alpha in the same alpha/dim ratio; loha/lokr wrap convs only when set
      factor: -1              # lokr: w1's side (-1: as close to sqrt as the layer allows)
      targets: [unet, text_encoder]
      dropout: 0.0            # see ldm.modules.adapters.modules
      rank_dropout: 0.0
      module_dropout: 0.0
      unet_lr: null           # null: model.base_learning_rate
      text_encoder_lr: null   # null: unet_lr
      network_weights: null   # an adapter file (ours or kohya's) to continue from
      training_comment: ""
      output_name: null       # null: the run name (-n), else "adapter"
      save_every_n_epochs: 1  # <output_name>-000001.safetensors, ...; 0: only the final file
      save_precision: fp16    # fp16 | bf16 | fp32
      base_precision: auto    # frozen UNet/VAE/text encoder: auto (the autocast dtype) | fp16 | bf16 | fp32

Every key is documented in doc/CONFIG.md; an unknown key is an error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.modules.adapters.modules import ALGOS
from ldm.util import ConfigError, section_values

TARGETS = ("unet", "text_encoder")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class NetworkConfig:
    algo: str = "lora"
    dim: int = 16
    alpha: float = 8.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    factor: int = -1
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    network_weights: str | None = None
    training_comment: str = ""
    output_name: str | None = None
    save_every_n_epochs: int = 1
    save_precision: str = "fp16"
    base_precision: str = "auto"

    @property
    def wraps_convs(self) -> bool:
        """Whether ResBlock and up/down-sampling layers are wrapped (kohya's LoCon module set)."""
        return self.algo == "locon" or self.conv_dim is not None

    @property
    def conv_rank(self) -> tuple[int, float]:
        """(rank, alpha) of the 3x3-conv adapters."""
        dim = self.conv_dim if self.conv_dim is not None else self.dim
        alpha = self.conv_alpha if self.conv_alpha is not None else dim * self.alpha / self.dim  # same alpha/r
        return dim, alpha

    @property
    def dropouts(self) -> dict[str, float]:
        return {"dropout": self.dropout, "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout}

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], key: str = "model.params.network") -> NetworkConfig:
        v = section_values(cls, node, key, "adapter settings")

        def number(name: str, *, integer: bool = False, low: float = 0.0, high: float | None = None,
                   optional: bool = False, strict_low: bool = False) -> Any:
            value = v[name]
            if value is None and optional:
                return None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (value > low if strict_low else value >= low) and (high is None or value <= high)
            ok = ok and (not integer or float(value).is_integer())
            if not ok:
                kind = "an integer" if integer else "a number"
                bound = f"{'>' if strict_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
                raise ConfigError(f"{key}.{name}: expected {kind} {bound}{' or null' if optional else ''}, "
                                  f"got {value!r}")
            return int(value) if integer else float(value)

        algo = v["algo"]
        if algo not in ALGOS:
            raise ConfigError(f"{key}.algo: expected one of {', '.join(ALGOS)}, got {algo!r}")
        targets = v["targets"]
        if isinstance(targets, str):
            targets = [targets]
        if (not isinstance(targets, (list, tuple)) or not targets
                or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets)):
            raise ConfigError(f"{key}.targets: expected a non-empty list of {', '.join(TARGETS)}, got {v['targets']!r}")
        if algo == "lora" and v["conv_dim"] is not None:
            raise ConfigError(f"{key}.conv_dim: algo lora wraps no 3x3 convolutions; use algo: locon "
                              f"(kohya's LoRA with conv_dim)")
        for name, table in (("save_precision", PRECISIONS), ("base_precision", {"auto": None, **PRECISIONS})):
            if v[name] not in table:
                raise ConfigError(f"{key}.{name}: expected one of {', '.join(table)}, got {v[name]!r}")
        for name in ("network_weights", "output_name"):
            if v[name] is not None and (not isinstance(v[name], str) or not v[name].strip()):
                raise ConfigError(f"{key}.{name}: expected a non-empty string or null, got {v[name]!r}")
        if v["output_name"] is not None and any(c in v["output_name"] for c in "/\\"):
            raise ConfigError(f"{key}.output_name: a file name without folders, got {v['output_name']!r}")
        factor = v["factor"]
        if not isinstance(factor, int) or isinstance(factor, bool) or (factor != -1 and factor < 1):
            raise ConfigError(f"{key}.factor: expected -1 or an integer >= 1, got {factor!r}")
        return cls(
            algo=algo,
            dim=number("dim", integer=True, low=1),
            alpha=number("alpha", strict_low=True),
            conv_dim=number("conv_dim", integer=True, low=1, optional=True),
            conv_alpha=number("conv_alpha", strict_low=True, optional=True),
            factor=factor,
            targets=tuple(t for t in TARGETS if t in targets),
            dropout=number("dropout", high=0.99),
            rank_dropout=number("rank_dropout", high=0.99),
            module_dropout=number("module_dropout", high=1.0),
            unet_lr=number("unet_lr", strict_low=True, optional=True),
            text_encoder_lr=number("text_encoder_lr", strict_low=True, optional=True),
            network_weights=v["network_weights"],
            training_comment=str(v["training_comment"] or ""),
            output_name=v["output_name"],
            save_every_n_epochs=number("save_every_n_epochs", integer=True, low=0),
            save_precision=v["save_precision"],
            base_precision=v["base_precision"],
        )

    def kohya_module_and_args(self) -> tuple[str, dict[str, str]]:
        """`ss_network_module` and `ss_network_args` as kohya/LyCORIS write them."""
        args: dict[str, str] = {}
        if self.wraps_convs:
            conv_dim, conv_alpha = self.conv_rank
            args.update(conv_dim=str(conv_dim), conv_alpha=_num(conv_alpha))
        if self.rank_dropout:
            args["rank_dropout"] = _num(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = _num(self.module_dropout)
        if self.algo in ("lora", "locon"):
            return "networks.lora", args
        args["algo"] = self.algo
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
        return "lycoris.kohya", args


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def base_dtype(base_precision: str, trainer_precision: str) -> torch.dtype:
    """The frozen base's dtype: `auto` follows the trainer's autocast (bf16/fp16), else fp32."""
    if base_precision != "auto":
        return PRECISIONS[base_precision]
    if trainer_precision.startswith("bf16"):
        return torch.bfloat16
    if trainer_precision.startswith("16"):
        return torch.float16
    return torch.float32
