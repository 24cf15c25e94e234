"""fp32 master weights for a UNet stored in bf16 (`optimizer.name: adamw_master`).

Under bf16 autocast each product casts its fp32 weight to bf16 in the forward pass (again in
gradient checkpointing's recomputed forward), and each weight's bf16 gradient is cast to fp32
in the backward pass: 12 bytes of memory traffic per parameter per step, and a kernel launch
per weight each time. Here the UNet's weights are stored in bf16 and the optimizer keeps
their fp32 copies (master weights, as apex's and Megatron's mixed precision do): it reads each
bf16 gradient, updates the fp32 master and moments, and writes the master's bf16 rounding
back to the weight. The arithmetic is autocast's: the forward pass sees the same bf16 values
(autocast rounds to nearest, as the write-back does; our norms take bf16 weights under
autocast too), the gradients are the same bf16 products, and AdamW runs in fp32 on fp32
weights. Memory per parameter is fp32 AdamW's 16 bytes: weight 2, gradient 2, master 4,
moments 8.

`MasterWeights(module)` keeps the fp32 values of a module's parameters as masters and casts
the parameters to bf16. The module's state_dict shows the masters under the parameters' names,
so checkpoints and pruned files hold full-precision weights, not their bf16 rounding, and its
load_state_dict sets the masters from the file's values. The masters move to the parameters'
device at the first optimizer step.

`AdamWMaster` is AdamW over such parameters (fp32 parameters are their own masters). On a GPU
with Triton a step is one kernel over all weights (triton_adamw) that reads each bf16
gradient and writes master, moments and weight in one pass: 28 bytes per parameter, as fused
fp32 AdamW. Otherwise it is torch's fused AdamW on the masters (the gradients cast to fp32, at
most TEMP_ELEMENTS at a time) and one multi-tensor copy back to the weights.
Its state_dict holds step counts and fp32 moments (the masters are saved as the model's
weights) and load_state_dict keeps the moments fp32 (torch casts them to the parameter's dtype).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.optim import triton_adamw
from ldm.optim.low_memory import _packs, _step_scalars
from ldm.util import ConfigError

TEMP_ELEMENTS = 1 << 26  # eager: gradients cast to fp32 at a time (256 MiB of temporaries)


class MasterWeights:
    """fp32 masters of `module`'s parameters, which are cast to `dtype` (see the module docstring)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.names: dict[str, nn.Parameter] = {}
        self.master: dict[nn.Parameter, torch.Tensor] = {}
        self._placed = False
        for name, p in module.named_parameters():
            if p.dtype != torch.float32:
                raise ValueError(f"MasterWeights: {name} is {p.dtype}, expected the fp32 weights to keep")
            self.master[p] = p.data  # the fp32 values themselves, no copy
            p.data = p.data.to(dtype)
            self.names[name] = p
        # plain functions: torch marks a public hook with an attribute, which a bound method cannot take
        module.register_state_dict_post_hook(lambda *args: self._state_dict_hook(*args))
        module.register_load_state_dict_pre_hook(lambda *args: self._load_hook(*args))

    def _state_dict_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
        for name, p in self.names.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.master[p]

    def _load_hook(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        with torch.no_grad():
            for name, p in self.names.items():
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and value.shape == p.shape:  # else load_state_dict says why
                    self.master[p].copy_(value)

    def place(self) -> None:
        """Each master on its parameter's device, in its memory layout (NHWC weights too); after
        the first call only if the module has moved since."""
        p, master = next(iter(self.master.items()), (None, None))
        if self._placed and (p is None or master.device == p.device):
            return
        for p, master in self.master.items():
            if master.device != p.device or master.stride() != p.stride():
                self.master[p] = torch.empty_like(p, dtype=torch.float32).copy_(master)
        self._placed = True


def check_master_trainer(trainer: Any, key: str) -> None:
    """Refuse what bf16 gradients cannot do as autocast's fp32 ones would."""
    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        raise ConfigError(f"{key}.name: adamw_master's gradients are bf16 and would be summed over batches in "
                          f"bf16; set lightning.trainer.accumulate_grad_batches: 1, or use adamw with "
                          f"model.params.unet_precision: fp32")
    if str(getattr(trainer, "precision", "")).startswith("16"):
        raise ConfigError(f"{key}.name: adamw_master keeps bf16 weights for bf16 autocast; set "
                          f"lightning.trainer.precision: bf16-mixed, or (GPUs without bf16) use adamw with "
                          f"model.params.unet_precision: fp32")


class AdamWMaster(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) on fp32 masters of bf16 weights (see the module docstring)."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.masters: MasterWeights | None = None  # use()

    def use(self, masters: MasterWeights) -> None:
        self.masters = masters

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        if p.dtype == torch.float32:
            return p
        if self.masters is None or p not in self.masters.master:
            raise RuntimeError(f"AdamWMaster: a {p.dtype} weight of shape {tuple(p.shape)} has no fp32 master")
        return self.masters.master[p]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.masters is not None:
            self.masters.place()
        for group in self.param_groups:
            hyper = group["lr"], *group["betas"], group["eps"], group["weight_decay"]
            by_step: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for k in self.MOMENTS:
                        state[k] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                by_step.setdefault((state["step"], p.device), []).append(p)
            for (t, device), params in by_step.items():
                self._step(params, t, device, *hyper)
        return loss

    def _columns(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """weights, gradients, masters, m, v."""
        return [params, [p.grad for p in params], [self._master(p) for p in params],
                *([self.state[p][k] for p in params] for k in self.MOMENTS)]

    def _step(self, params: list[torch.Tensor], t: int, device: torch.device, lr: float, b1: float, b2: float,
              eps: float, wd: float) -> None:
        """The weights the Triton kernel takes in one launch per kind (with a bf16 copy, or fp32
        weights that are their own masters), the rest fused."""
        kernel: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        rest = []
        for p in params:
            w, state = self._master(p), self.state[p]
            tensors = (w, p.grad, state["exp_avg"], state["exp_avg_sq"]) + ((p,) if w is not p else ())
            if triton_adamw.qualifies(tensors):
                kernel.setdefault(len(tensors), []).append(tensors)
            else:
                rest.append(p)
        for weights in kernel.values():
            # seed: unused, as nothing rounds at random
            triton_adamw.adamw_(weights, lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, step=t, seed=0)
        if rest:
            self._step_fused(rest, t, device, lr, b1, b2, eps, wd)

    def _step_fused(self, params: list[torch.Tensor], t: int, device: torch.device, lr: float, b1: float,
                    b2: float, eps: float, wd: float) -> None:
        """torch's fused AdamW on the masters, the gradients cast to fp32 a slice of the weights
        at a time, then the masters copied to the low-precision weights."""
        step = _step_scalars(device, (float(t),))[0]  # the kernel reads t for its bias corrections
        for chunk in _packs(params, TEMP_ELEMENTS):
            w16, g16, w, m, v = self._columns(chunk)
            g = [x.float() for x in g16]
            torch._fused_adamw_(w, g, m, v, [], [step] * len(w), lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False)
            low = [i for i, p in enumerate(chunk) if p.dtype != torch.float32]
            if low:
                torch._foreach_copy_([w16[i] for i in low], [w[i] for i in low])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts each floating state tensor to its parameter's dtype (bf16 here): keep the moments fp32."""
        moments = {i: {k: s[k] for k in self.MOMENTS if k in s} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        ours = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for i, p in zip(saved, ours):
            for k, value in moments.get(i, {}).items():
                self.state[p][k] = torch.empty_like(p, dtype=torch.float32).copy_(value)

