"""One adapter per wrapped layer: LoRA (LoCon on convolutions), LoHa and LoKr.

Each adapter adds a learned ΔW to a frozen Linear or Conv2d weight W [out, in(, kh, kw)]:

    y = base(x) + multiplier * (x ⊛ ΔW)          (one fused add; alpha/r and the multiplier are Python numbers)

    LoRA  ΔW = up @ down * alpha/r           down [r, in(, kh, kw)], up [out, r(, 1, 1)]
    LoHa  ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * alpha/r        w*a [out, r], w*b [r, in·kh·kw]
    LoKr  ΔW = w1 ⊗ w2 (Kronecker) * alpha/r   w1 [a, c], w2 [out/a, in/c(, kh, kw)]
          (w2 = w2a @ w2b [out/a, r] @ [r, in/c·kh·kw] when r is small against w2's sides;
           a full w2 has no rank, and the loaders then scale by 1)

The parameter names are those of the kohya/LyCORIS files (`lora_down.weight`,
`hada_w1_a`, `lokr_w1`, ... and the 0-dim `alpha` buffer), so an adapter's state_dict is
its part of the file, and `from_tensors` rebuilds an adapter from a file's tensors.
ΔW always starts at zero: LoRA's `up`, LoHa's `w2a` and LoKr's w2 (or `w2b`) are zeros.

Dropouts (training only): `dropout` zeroes elements of the rank activations (LoRA) or of
the adapter's output (LoHa/LoKr), `rank_dropout` zeroes whole ranks (LoRA) or output
rows of ΔW (LoHa/LoKr) with the survivors rescaled, `module_dropout` skips the adapter
for the whole step. Their random draws come from `generator` (the model's noise stream),
so a resumed run draws what the uninterrupted one would have.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

ALGOS = ("lora", "locon", "loha", "lokr")


class Adapter(nn.Module):
    """Base class: the wrapped layer's geometry, alpha, dropouts and the forward patch."""

    algo = ""

    def __init__(self, base: nn.Module, dim: int, alpha: float | None, *, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d, not {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TypeError("adapters do not wrap grouped convolutions")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight_shape = tuple(base.weight.shape)  # [out, in(, kh, kw)]
        self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) if self.is_conv else {}
        self.dim = dim
        alpha = dim if alpha is None or alpha == 0 else alpha  # kohya: no alpha means scale 1
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # alpha as a Python number too: a scale held on the GPU costs a division, a cast and a
        # multiply per adapter per step (doc/performance/adapters.md: -9% operations per step)
        self.alpha_value = float(alpha)
        self.register_load_state_dict_post_hook(_refresh_alpha_value)
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.multiplier = 1.0
        self.generator: torch.Generator | None = None
        self._base: list[nn.Module] = []  # a list, so the frozen layer is not a submodule

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_flat(self) -> int:
        """in · kh · kw: the width of a flattened weight row."""
        return math.prod(self.weight_shape[1:])

    @property
    def scale(self) -> float:
        """alpha / r, the factor the loaders apply to ΔW."""
        return self.alpha_value / self.dim

    @property
    def output_factor(self) -> float:
        """What `delta`'s output is multiplied by: the multiplier, and alpha/r where `delta`
        leaves it out (LoRA applies it to the output, the other algorithms to ΔW)."""
        return self.multiplier

    # ---- what each algorithm defines ----------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in the wrapped weight's shape, alpha/r applied, multiplier not applied."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x ⊛ ΔW, alpha/r included, multiplier not (dropouts applied while training). The
        default goes through ΔW."""
        w = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            w = w * self._keep_mask((w.shape[0],) + (1,) * (w.dim() - 1), self.rank_dropout, w)
        x = _to_param_dtype(x, w)
        y = F.conv2d(x, w, **self.conv_args) if self.is_conv else F.linear(x, w)
        if self.training and self.dropout > 0:
            y = y * self._keep_mask(y.shape, self.dropout, y)
        return y

    # ---- wrapping ------------------------------------------------------------------
    def apply_to(self, base: nn.Module) -> None:
        """Patch `base.forward` to add this adapter's output."""
        if tuple(base.weight.shape) != self.weight_shape:
            raise ValueError(f"adapter for a {list(self.weight_shape)} weight applied to {list(base.weight.shape)}")
        self._base = [base]
        base_forward = base.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = base_forward(x)
            if self.multiplier == 0:
                return y
            return torch.add(y, self._dropped(self.delta(x), x).to(y.dtype), alpha=self.output_factor)

        base.forward = forward

    def remove(self) -> None:
        """Undo `apply_to`: the layer's own forward again."""
        for base in self._base:
            base.__dict__.pop("forward", None)
        self._base = []

    def scaled_delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier · (x ⊛ ΔW), zeroed for the step when module dropout skips the adapter."""
        return self._dropped(self.delta(x), x) * self.output_factor

    def _dropped(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out`, zeroed when module dropout skips the adapter for this step. The skip is a 0-dim
        mask on the device rather than a Python branch: deciding on the host would read a GPU
        value back once per adapter per step."""
        if self.training and self.module_dropout > 0:
            keep = torch.rand((), generator=self._gen(x), device=x.device) >= self.module_dropout
            out = out * keep.to(out.dtype)
        return out

    # ---- random draws ----------------------------------------------------------------

    def _keep_mask(self, shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
        """Bernoulli(1-p) mask / (1-p), in `like`'s dtype and device."""
        keep = torch.rand(shape, generator=self._gen(like), device=like.device) >= p
        return keep.to(like.dtype) / (1.0 - p)

    def _gen(self, like: torch.Tensor) -> torch.Generator | None:
        return self.generator if self.generator is not None and self.generator.device == like.device else None


def _refresh_alpha_value(adapter: Adapter, incompatible_keys) -> None:
    """After load_state_dict: the Python alpha follows the loaded buffer (read once, not per step)."""
    adapter.alpha_value = float(adapter.alpha)


def _to_param_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """x for a product with an adapter weight: autocast casts both itself; otherwise the
    product runs in the adapter's dtype (fp32), whatever the frozen base's dtype is."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(param.dtype)


class LoRA(Adapter):
    """LoRA on a Linear, LoCon on a Conv2d (down has the layer's kernel, up is 1×1)."""

    algo = "lora"

    def __init__(self, base: nn.Module, dim: int, alpha: float | None, **dropouts: float):
        super().__init__(base, dim, alpha, **dropouts)
        out, inp = self.weight_shape[:2]
        if self.is_conv:
            self.lora_down = nn.Conv2d(inp, dim, self.weight_shape[2:], bias=False, **self.conv_args)
            self.lora_up = nn.Conv2d(dim, out, 1, bias=False)
        else:
            self.lora_down = nn.Linear(inp, dim, bias=False)
            self.lora_up = nn.Linear(dim, out, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        down = self.lora_down.weight.flatten(1)         # [r, in·kh·kw]
        up = self.lora_up.weight.flatten(1)             # [out, r]
        return (up @ down).reshape(self.weight_shape) * self.scale

    @property
    def output_factor(self) -> float:
        return self.multiplier * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) with the dropouts; alpha/r is in output_factor."""
        down, up = self.lora_down.weight, self.lora_up.weight  # F.* directly: no module-call overhead
        x = _to_param_dtype(x, down)
        h = F.conv2d(x, down, **self.conv_args) if self.is_conv else F.linear(x, down)  # [B, r, H, W] or [..., r]
        if self.training and self.dropout > 0:
            h = h * self._keep_mask(h.shape, self.dropout, h)
        if self.training and self.rank_dropout > 0:
            shape = [h.shape[0]] + [1] * (h.dim() - 1)
            shape[1 if self.is_conv else -1] = self.dim
            h = h * self._keep_mask(tuple(shape), self.rank_dropout, h)
        return F.conv2d(h, up) if self.is_conv else F.linear(h, up)


class LoHa(Adapter):
    """LoHa: the Hadamard product of two rank-r factorizations (effective rank up to r²)."""

    algo = "loha"

    def __init__(self, base: nn.Module, dim: int, alpha: float | None, **dropouts: float):
        super().__init__(base, dim, alpha, **dropouts)
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_features, dim))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, self.in_flat))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_features, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, self.in_flat))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # [out, in·kh·kw]
        return w.reshape(self.weight_shape) * self.scale


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """n = a·b with a <= b: a = factor when it divides n, else a as close to √n as allowed
    (a <= factor when factor > 0)."""
    if factor > 0 and n % factor == 0:
        return tuple(sorted((factor, n // factor)))
    limit = n if factor <= 0 else factor
    best = 1
    for a in range(1, math.isqrt(n) + 1):
        if n % a == 0 and a <= limit:
            best = a
    return best, n // best


class LoKr(Adapter):
    """LoKr: ΔW = w1 ⊗ w2; w1 [a, c] is small and full, w2 [out/a, in/c] is full or rank r."""

    algo = "lokr"

    def __init__(self, base: nn.Module, dim: int, alpha: float | None, *, factor: int = -1,
                 w1_shape: tuple[int, int] | None = None, full_w2: bool | None = None, **dropouts: float):
        super().__init__(base, dim, alpha, **dropouts)
        out, inp, *kernel = self.weight_shape
        if w1_shape is None:
            w1_shape = (factorization(out, factor)[0], factorization(inp, factor)[0])
        a, c = w1_shape
        if out % a or inp % c:
            raise ValueError(f"lokr_w1 {list(w1_shape)} does not divide the weight {list(self.weight_shape)}")
        b, d = out // a, inp // c
        self.full_w2 = dim >= max(b, d) / 2 if full_w2 is None else full_w2
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, dim))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, d * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha_value / self.dim if not self.full_w2 else 1.0

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2.flatten(1) if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b  # [b, d·kh·kw]
        return torch.kron(self.lokr_w1, w2).reshape(self.weight_shape) * self.scale


ADAPTERS: dict[str, type[Adapter]] = {"lora": LoRA, "locon": LoRA, "loha": LoHa, "lokr": LoKr}


def algo_of(tensor_names: set[str]) -> str:
    """Which algorithm a file's tensors for one module belong to ("lora", "loha" or "lokr")."""
    if "lora_down.weight" in tensor_names:
        return "lora"
    if "hada_w1_a" in tensor_names:
        return "loha"
    if "lokr_w1" in tensor_names:
        return "lokr"
    raise ValueError(f"tensors {sorted(tensor_names)} are not a LoRA, LoHa or LoKr module we can train "
                     "(Tucker 'lora_mid'/'hada_t1', 'lokr_w1_a' and DoRA 'dora_scale' are not supported)")


UNSUPPORTED = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2", "lokr_w1_a", "dora_scale")


def from_tensors(base: nn.Module, tensors: Mapping[str, torch.Tensor], **dropouts: float) -> Adapter:
    """An adapter for `base` with the rank, alpha and values of one module's file tensors."""
    names = set(tensors)
    odd = sorted(names & set(UNSUPPORTED))
    if odd:
        raise ValueError(f"{', '.join(odd)}: this variant (Tucker, DoRA or a factored lokr_w1) is not supported")
    algo = algo_of(names)
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if algo == "lora":
        adapter: Adapter = LoRA(base, tensors["lora_down.weight"].shape[0], alpha, **dropouts)
    elif algo == "loha":
        adapter = LoHa(base, tensors["hada_w1_b"].shape[0], alpha, **dropouts)
    else:
        full = "lokr_w2" in names
        dim = 1 if full else tensors["lokr_w2_a"].shape[1]  # a full w2 has no rank: scale 1
        adapter = LoKr(base, dim, alpha, w1_shape=tuple(tensors["lokr_w1"].shape), full_w2=full, **dropouts)
    own = adapter.state_dict()
    missing = sorted(set(own) - names - {"alpha"})
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing)}")
    for name, value in tensors.items():
        if name in own and name != "alpha" and value.numel() != own[name].numel():
            raise ValueError(f"{name}: {list(value.shape)} does not fit a {list(adapter.weight_shape)} weight "
                             f"(expected {list(own[name].shape)})")
    with torch.no_grad():
        for name, value in tensors.items():
            if name in own and name != "alpha":
                own[name].copy_(value.reshape(own[name].shape))
    return adapter

