"""Adapters on the SD 2.x text encoder (an OpenCLIP text tower), named as kohya names them.

kohya trains SD 2.x through a transformers CLIP model, so its keys use transformers' names
for OpenCLIP's layers, and only the 23 blocks SD 2.x runs (the penultimate layer):

    cond_stage_model.model.transformer.resblocks.N.attn   q | k | v rows of in_proj_weight
        -> lora_te_text_model_encoder_layers_N_self_attn_{q,k,v}_proj
    ...resblocks.N.attn.out_proj     -> ..._self_attn_out_proj
    ...resblocks.N.mlp.c_fc / c_proj -> ..._mlp_fc1 / _mlp_fc2

nn.MultiheadAttention reads in_proj_weight and out_proj.weight itself (it never calls
out_proj), so its four adapters are applied by a patched forward that computes the same
attention with each projection's adapter output added. The paths of q/k/v name no real
module (`...attn.q_proj`); `weight_slot` says which rows of which tensor they change.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "cond_stage_model.model.transformer.resblocks."
PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def targets(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every adapter target in the blocks the encoder runs; q/k/v get a
    weightless stand-in Linear of their slice's shape (meta device: no memory)."""
    te = model.cond_stage_model
    blocks = te.model.transformer.resblocks
    for i, block in enumerate(blocks[: len(blocks) - te.layer_idx]):
        d = block.attn.embed_dim
        for part in PARTS[:3]:
            yield f"{PREFIX}{i}.attn.{part}", nn.Linear(d, d, bias=False, device="meta")
        yield f"{PREFIX}{i}.attn.out_proj", block.attn.out_proj
        yield f"{PREFIX}{i}.mlp.c_fc", block.mlp.c_fc
        yield f"{PREFIX}{i}.mlp.c_proj", block.mlp.c_proj


def kohya_key(path: str) -> str:
    block, _, rest = path[len(PREFIX):].partition(".")
    rest = {"attn.q_proj": "self_attn_q_proj", "attn.k_proj": "self_attn_k_proj", "attn.v_proj": "self_attn_v_proj",
            "attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}[rest]
    return f"lora_te_text_model_encoder_layers_{block}_{rest}"


def is_attention(path: str) -> bool:
    return path.startswith(PREFIX) and path.rpartition(".")[2] in PARTS


def weight_slot(path: str, dim: int) -> tuple[str, slice | None]:
    """The state-dict key a target's ΔW adds to, and the rows (q/k/v share in_proj_weight)."""
    owner, _, part = path.rpartition(".")
    if part == "out_proj":
        return f"{path}.weight", None
    i = PARTS.index(part)
    return f"{owner}.in_proj_weight", slice(i * dim, (i + 1) * dim)


def patch_attention(mha: nn.MultiheadAttention, adapters: dict[str, nn.Module]) -> None:
    """Make `mha` (self-attention, batch_first, as OpenCLIP uses it) add the adapters' outputs
    to its projections (`adapters`: part -> Adapter). The adapter products run apart from
    the frozen weights, as for every other layer, so a small ΔW is not lost in W's rounding."""
    d, h = mha.embed_dim, mha.num_heads
    if not mha.batch_first or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("adapters support OpenCLIP's batch-first self-attention only")

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key is value) or key_padding_mask is not None or need_weights:
            raise ValueError("adapted attention: self-attention with need_weights=False only")
        B, L, _ = query.shape                                     # [B, L, D]
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)  # [B, L, 3D]
        qkv = qkv + torch.cat([_delta(adapters.get(p), query, d) for p in PARTS[:3]], dim=-1)
        q, k, v = (t.reshape(B, L, h, d // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # [B, h, L, d/h]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=mha.dropout if mha.training else 0.0)
        a = a.transpose(1, 2).reshape(B, L, d)
        out = F.linear(a, mha.out_proj.weight, mha.out_proj.bias) + _delta(adapters.get("out_proj"), a, d)
        return out, None

    mha.forward = forward


def unpatch_attention(mha: nn.MultiheadAttention) -> None:
    mha.__dict__.pop("forward", None)


def _delta(adapter: nn.Module | None, x: torch.Tensor, d: int) -> torch.Tensor:
    """multiplier · (x ⊛ ΔW) [B, L, d] (Adapter.scaled_delta); zeros without an adapter or when off."""
    if adapter is None or adapter.multiplier == 0:
        return x.new_zeros(*x.shape[:-1], d)
    return adapter.scaled_delta(x).to(x.dtype)
