"""`adamw8bit_bf16`: AdamW with 8-bit moments for weights stored in bf16 (the 6 GiB preset).

bitsandbytes' AdamW8bit stores each moment in 8 bits: blocks of 256 values, each scaled by
its largest magnitude (absmax) and coded on a dynamic (log-spaced) map of 256 values, which
keeps small moments precise. On bf16 weights, though, it rounds each update to the nearest
bf16 value, and a fine-tuning update (lr 1e-6 on weights of ~1e-2) is below half a bf16 step:
on the SD 1.x UNet it kept 51% of the movement at lr 1e-6 (doc/performance/memory.md, "bitsandbytes
against torchao").

Here bitsandbytes' own update runs on an fp32 copy of the weight, one chunk at a time, and
the result is written back with stochastic rounding (ldm.optim.low_memory.stochastic_round_),
as `adamw_bf16` writes its own. Per parameter: 2 bytes of weight and 2 of moments (plus 8
bytes per block of 256 for the two scales) instead of adamw_bf16's 2 + 4: 1.6 GiB less for the
SD 1.x UNet. Weights under MIN_8BIT_SIZE elements (biases, norms; bitsandbytes keeps those in
32 bits too) are updated by AdamWBF16 with bf16 moments, in packs or one fused kernel.

The state of an 8-bit weight, flat in the weight's element order (so the weight must be
contiguous: `channels_last` is refused with this optimizer):
    exp_avg, exp_avg_sq                 uint8 codes, one per element
    exp_avg_absmax, exp_avg_sq_absmax   fp32, one per block of BLOCK elements
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from bitsandbytes import functional as bnb_functional

from ldm.optim.low_memory import CHUNK, AdamWBF16, stochastic_round_

BLOCK = 256  # elements per absmax scale in bitsandbytes' blockwise optimizers
MIN_8BIT_SIZE = 4096  # smaller weights keep bf16 moments (bitsandbytes' min_8bit_size)
STATE_8BIT = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


@functools.lru_cache(maxsize=None)
def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' code maps: signed for the first moment, unsigned for the second."""
    return (bnb_functional.create_dynamic_map(signed=True).to(device),
            bnb_functional.create_dynamic_map(signed=False).to(device))


def _set_aside(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """load_state_dict pre-hook: take the 8-bit entries out of the state torch will load, which
    casts every state tensor to its weight's dtype (uint8 codes and fp32 scales to bf16)."""
    aside = {i: {k: s[k] for k in STATE_8BIT} for i, s in state_dict["state"].items() if STATE_8BIT[2] in s}
    if not aside:
        return None
    optimizer.__dict__["_8bit_aside"] = aside
    state = {i: {k: v for k, v in s.items() if i not in aside or k not in STATE_8BIT}
             for i, s in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _put_back(optimizer: torch.optim.Optimizer) -> None:
    """load_state_dict post-hook: the 8-bit entries, as saved, on their weights' devices (the
    saved state is keyed by the weights' positions in the param groups)."""
    aside = optimizer.__dict__.pop("_8bit_aside", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, values in (aside or {}).items():
        optimizer.state[params[i]].update({k: v.to(params[i].device) for k, v in values.items()})
    for p in params:  # a resume from another optimizer's checkpoint: say so now, not at the first step
        if p.numel() >= MIN_8BIT_SIZE and optimizer.state.get(p):
            _check_state(p, optimizer.state[p])


def _check_state(p: torch.Tensor, state: dict[str, Any]) -> None:
    if any(name not in state or state[name].dtype != (torch.float32 if "absmax" in name else torch.uint8)
           for name in STATE_8BIT):
        raise ValueError(f"adamw8bit_bf16: the optimizer state of a weight of shape {tuple(p.shape)} is not "
                         f"8-bit AdamW's (keys {sorted(state)}); it was saved by another optimizer. Resume "
                         f"with the optimizer that saved it, or start from the weights only (--actual_resume)")


def keep_8bit_state_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer.load_state_dict` restore 8-bit moments exactly (also for the
    StepInBackward wrapper, which is what a checkpoint saves and loads)."""
    optimizer.register_load_state_dict_pre_hook(_set_aside)
    optimizer.register_load_state_dict_post_hook(_put_back)


class AdamW8bitBF16(AdamWBF16):
    """AdamW with bitsandbytes' 8-bit blockwise moments, written back to bf16 weights with
    stochastic rounding (fp32 weights: bitsandbytes' update as it is)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        keep_8bit_state_on_load(self)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.numel() >= MIN_8BIT_SIZE:
                    self._update_8bit(p, group)
            self._step_group(group, [p for p in params if p.numel() < MIN_8BIT_SIZE])
        return loss

    def _state_8bit(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            blocks = -(-p.numel() // BLOCK)
            state["step"] = 0
            for name in STATE_8BIT:  # absmax 0: every code decodes to 0, the moments' start
                state[name] = torch.zeros(p.numel() if "absmax" not in name else blocks, device=p.device,
                                          dtype=torch.float32 if "absmax" in name else torch.uint8)
        else:
            _check_state(p, state)
        if not (p.is_contiguous() and p.grad.is_contiguous()):
            raise ValueError(f"adamw8bit_bf16: a weight of shape {tuple(p.shape)} or its gradient is not "
                             f"contiguous; its 8-bit moments follow the element order (channels_last: false)")
        return state

    def _update_8bit(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One weight in chunks of CHUNK elements (a multiple of BLOCK, so each chunk owns
        whole blocks and their scales): its fp32 copy updated by bitsandbytes, rounded back."""
        state = self._state_8bit(p)
        state["step"] += 1
        (b1, b2), qmap1, qmap2 = group["betas"], *_maps(p.device)
        m, v, m_absmax, v_absmax = (state[name] for name in STATE_8BIT)
        for start in range(0, p.numel(), CHUNK):
            end = min(start + CHUNK, p.numel())
            blocks = slice(start // BLOCK, -(-end // BLOCK))
            w = p.view(-1)[start:end]
            w32 = w.float()  # fp32 weights: w itself, updated in place
            bnb_functional.optimizer_update_8bit_blockwise(  # "adam" with decoupled weight decay: AdamW
                "adam", p.grad.view(-1)[start:end].float(), w32, m[start:end], v[start:end], b1, b2, 0.0, 0.0,
                group["eps"], state["step"], group["lr"], qmap1, qmap2, m_absmax[blocks], v_absmax[blocks],
                weight_decay=group["weight_decay"])
            if w32 is not w:
                stochastic_round_(w, w32)
        if p.dtype == torch.float32:
            torch.autograd.graph.increment_version(p)  # written by bitsandbytes' kernel: say so
