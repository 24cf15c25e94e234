"""AdapterNetwork: the set of adapters on a LatentDiffusion model, named as kohya names them.

    net = AdapterNetwork(model, NetworkConfig(algo="loha", dim=8, alpha=4))
    net.state_dict()   # {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": ..., ...}

Each adapter is a child module registered under its kohya key, so the network's
state_dict *is* the adapter file's tensors (ldm.modules.adapters.files adds the header).
Building the network patches the wrapped layers' forward; `remove()` undoes it. The
wrapped layers are the kohya module sets of `names.default_targets`; a `weights` file
(ours, kohya's, or the CompVis-named fallback) adds its own modules with its own ranks.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ldm.modules.adapters import names, openclip
from ldm.modules.adapters.config import NetworkConfig
from ldm.modules.adapters.modules import ADAPTERS, Adapter, from_tensors


class AdapterError(ValueError):
    """An adapter file does not fit the model; the message names the file and the keys."""


class AdapterNetwork(nn.Module):
    def __init__(self, model: nn.Module, cfg: NetworkConfig, weights: Mapping[str, torch.Tensor] | None = None,
                 source: str = "<weights>", *, fresh: bool = True):
        """`fresh=False`: only the modules `weights` holds (merging a file), none of cfg's targets."""
        super().__init__()
        self.cfg = cfg
        self.paths: dict[str, str] = {}  # kohya key -> module path in the model
        blocks = names.block_names(model.model.diffusion_model)
        candidates = _candidates(model, blocks)  # every wrappable module, under both key spellings
        wanted = [(names.kohya_key(path, blocks), path, module)
                  for path, module in names.default_targets(model, conv=cfg.wraps_convs)
                  if fresh and _group(path) in cfg.targets]
        from_file = _group_by_module(weights or {}, candidates, source)
        self.loaded_from_file = sorted(from_file)
        for key, path, module in wanted:
            if key not in from_file:
                self._add(key, path, self._fresh(module))
        for key, tensors in from_file.items():
            _, path, module = candidates[key]
            try:
                self._add(key, path, from_tensors(module, tensors, **cfg.dropouts))
            except ValueError as e:
                raise AdapterError(f"{source}: {key}: {e}") from e
        self._patched: list[nn.Module] = []  # OpenCLIP attention layers (openclip.py)
        by_attention: dict[str, dict[str, Adapter]] = {}
        for key, path in self.paths.items():
            if openclip.is_attention(path):
                owner, _, part = path.rpartition(".")
                by_attention.setdefault(owner, {})[part] = getattr(self, key)
            else:
                getattr(self, key).apply_to(model.get_submodule(path))
        for owner, parts in by_attention.items():
            mha = model.get_submodule(owner)
            openclip.patch_attention(mha, parts)
            self._patched.append(mha)

    def _fresh(self, module: nn.Module) -> Adapter:
        cls = ADAPTERS[self.cfg.algo]
        kernel = module.weight.shape[2:] if isinstance(module, nn.Conv2d) else ()
        dim, alpha = self.cfg.conv_rank if any(k > 1 for k in kernel) else (self.cfg.dim, self.cfg.alpha)
        extra = {"factor": self.cfg.factor} if self.cfg.algo == "lokr" else {}
        return cls(module, dim, alpha, **extra, **self.cfg.dropouts)

    def _add(self, key: str, path: str, adapter: Adapter) -> None:
        self.add_module(key, adapter)
        self.paths[key] = path

    # ---- views --------------------------------------------------------------------------
    def adapters(self) -> Iterable[tuple[str, Adapter]]:
        return ((key, getattr(self, key)) for key in self.paths)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"unet": [...], "text_encoder": [...]}: the optimizer's groups."""
        groups: dict[str, list[nn.Parameter]] = {"unet": [], "text_encoder": []}
        for key, adapter in self.adapters():
            groups[_group(self.paths[key])].extend(adapter.parameters())
        return groups

    def counts(self) -> dict[str, int]:
        """Modules per part, e.g. {"unet": 192, "text_encoder": 72}."""
        out = {"unet": 0, "text_encoder": 0}
        for path in self.paths.values():
            out[_group(path)] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        params = sum(p.numel() for p in self.parameters())
        algos = sorted({a.algo for _, a in self.adapters()})
        return (f"Adapter {'/'.join(algos)}: {c['unet']} UNet + {c['text_encoder']} text-encoder modules, "
                f"{params / 1e6:.2f} M trainable parameters (dim {self.cfg.dim}, alpha {self.cfg.alpha:g}"
                + (f", conv_dim {self.cfg.conv_rank[0]}, conv_alpha {self.cfg.conv_rank[1]:g}"
                   if self.cfg.wraps_convs else "") + ")")

    # ---- use ----------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        for _, adapter in self.adapters():
            adapter.multiplier = multiplier

    def set_generator(self, generator: torch.Generator | None) -> None:
        for _, adapter in self.adapters():
            adapter.generator = generator

    def remove(self) -> None:
        """Restore every wrapped layer's own forward."""
        for _, adapter in self.adapters():
            adapter.remove()
        for mha in self._patched:
            openclip.unpatch_attention(mha)
        self._patched = []

    def tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The file's tensors (alpha included), in `dtype`, on the CPU."""
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def merge_into(self, state_dict: dict[str, torch.Tensor], multiplier: float = 1.0) -> int:
        """W <- W + multiplier·ΔW for every adapter, in place in a CompVis `state_dict` (computed in
        fp32, stored in each weight's own dtype). Returns the number of weights changed."""
        for key, adapter in self.adapters():
            path = self.paths[key]
            wkey, rows = (openclip.weight_slot(path, adapter.out_features) if openclip.is_attention(path)
                          else (path + ".weight", None))
            if wkey not in state_dict:
                raise AdapterError(f"{key}: the checkpoint has no {wkey}")
            w = state_dict[wkey]
            merged = w.float()
            delta = multiplier * adapter.delta_weight().float().to(w.device)
            if rows is None:
                merged = merged + delta
            else:
                merged[rows] += delta
            state_dict[wkey] = merged.to(w.dtype)
        return len(self.paths)


def _group(path: str) -> str:
    return "unet" if path.startswith(names.UNET_PREFIX) else "text_encoder"


Candidates = Mapping[str, tuple[str, str, nn.Module]]


def _candidates(model: nn.Module, blocks: Mapping[str, str]) -> dict[str, tuple[str, str, nn.Module]]:
    """Key -> (kohya key, path, module) for every module a file may name: by its kohya
    (diffusers-named) key or by the CompVis-named fallback; every UNet Linear/Conv2d and the
    text encoder's kohya set."""
    out = {}
    for path, module in [*names.all_unet_layers(model), *names.default_targets(model, conv=True)]:
        key = names.kohya_key(path, blocks)
        out[key] = out[names.compvis_key(path)] = (key, path, module)
    return out


def _group_by_module(weights: Mapping[str, torch.Tensor], candidates: Candidates,
                     source: str) -> dict[str, dict[str, torch.Tensor]]:
    """File tensors grouped per module under our (kohya) key; unknown modules are an error."""
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in weights.items():
        module_key, _, tensor_name = name.partition(".")
        if module_key not in candidates:
            unknown.append(module_key)
            continue
        by_key.setdefault(candidates[module_key][0], {})[tensor_name] = tensor
    if unknown:
        unknown = sorted(set(unknown))
        hint = ""
        if any(k.startswith(("lora_te1_", "lora_te2_")) for k in unknown):
            hint = " (lora_te1_/lora_te2_ keys are SDXL's; this model is SD 1.x/2.x)"
        elif any(k.startswith("lycoris_") for k in unknown):
            hint = " (lycoris_-prefixed keys: rename them to lora_unet_/lora_te_)"
        raise AdapterError(f"{source}: {len(unknown)} module(s) match no layer of this model{hint}: "
                           + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return by_key
