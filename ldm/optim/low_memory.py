"""Two ways to train the full UNet in less memory (doc/performance/memory.md, the 6 GiB target).

`AdamWBF16` (optimizer name `adamw_bf16`): AdamW for weights stored in bf16. Each update is
computed in fp32 and written back to the bf16 weight, and to its bf16 moments, with
stochastic rounding: rounded up with probability equal to the fraction cut off, so the
expected stored value is the exact one. With round-to-nearest, fine-tuning updates (lr 1e-6
on weights of ~1e-2) are below half a bf16 step (2^-9 relative) and vanish. 2 + 4 bytes per
parameter instead of fp32 AdamW's 4 + 8, gradients 2 instead of 4. For fp32 parameters it is
plain AdamW.

On a GPU with Triton, one kernel updates every weight of a step (ldm/optim/triton_adamw.py).
Elsewhere, weights smaller than CHUNK elements are updated in packs, concatenated: per-weight
updates of ~25 kernels each made the batch-1 step wait on the host (doc/PERFORMANCE.md). With
`model.params.compile: true` each update runs as one compiled kernel (`compile_updates`),
which has no fp32 temporaries, so packs (and the backward pass's buckets) grow to PACK_BYTES
per tensor: each compiled call costs the host ~0.3 ms, more than its kernel takes the GPU;
otherwise larger weights are updated in chunks, which bounds the fp32 temporaries.

`StepInBackward` (`optimizer.fused_backward: true`): one optimizer per bucket of consecutive
parameters (at most CHUNK elements, PACK_BYTES with compiled updates, or one larger parameter),
stepped from the parameters' post-accumulate-grad hooks as soon as the bucket's last gradient
is complete (at the end of the backward pass for a bucket some of whose parameters got none),
and the bucket's gradients are then freed; the full set of gradients (3.4 GB in fp32 for
SD 1.x) never exists at once. Buckets, not single parameters, so that an optimizer step covers many
small weights at once: SD 1.x has 686 UNet weights, most of them biases and norms.
It wraps whichever optimizer the config names and presents one torch Optimizer to Lightning:
its param groups carry the schedule's learning rates (copied to the per-bucket optimizers at
each step), its state is theirs (checkpoints save and resume it), and its `step(closure)`
only runs the closure, whose backward does the steps. Hence no gradient clipping (there is
never a full gradient to measure), no gradient accumulation, and no fp16 loss scaling.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ldm.optim import triton_adamw


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """dst (bf16) <- src (fp32) rounded stochastically; other dtypes are copied as they are.

    A bf16 number is the top 16 bits of an fp32 one. Adding uniform random bits to the 16
    that are cut off and truncating rounds away from zero with probability equal to the cut
    fraction (the sign is a separate bit, so this holds for both signs)."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16, generator=generator)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # -65536 = 0xFFFF0000: exact in bf16


def adamw_update_(w16: torch.Tensor, g16: torch.Tensor, m16: torch.Tensor, v16: torch.Tensor, *, lr: float,
                  b1: float, b2: float, eps: float, wd: float, bc1: float, bc2: float) -> None:
    """One AdamW step of weight w16 with gradient g16 and moments m16, v16 (same shape and
    dtype), in fp32, written back in place; bc1, bc2 = 1 - b1^t, 1 - b2^t. lr, wd, bc1 and
    bc2 are floats, or 0-d tensors in the compiled update, so they enter as plain products
    (a `value=` argument must be a Python number)."""
    g = g16.float()
    m = m16.float().lerp_(g, 1 - b1)                       # m = b1 m + (1-b1) g
    v = v16.float().mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1-b2) g²
    denom = (v / bc2).sqrt_().add_(eps)                    # sqrt(v / bc2) + eps
    w = w16.float().mul_(1 - lr * wd).sub_(torch.div(m, denom).mul_(lr / bc1))
    stochastic_round_(w16, w)
    stochastic_round_(m16, m)
    stochastic_round_(v16, v)


CHUNK = 1 << 22  # elements updated at once in eager mode: the fp32 temporaries stay ~6 x 16 MB
PACK_BYTES = 1 << 25  # compiled updates: bytes per tensor of a pack (32 MiB: 16M bf16, 8M fp32 elements)


def _chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching flat views of same-shape tensors, CHUNK elements each (writes go through).
    The largest SD 1.x weight has 29.5M elements: its whole-tensor fp32 temporaries were
    0.8 GiB of the 6 GiB budget (bench/memory_peak.py)."""
    if not all(x.is_contiguous() for x in tensors):
        return [tensors]
    return list(zip(*(x.view(-1).split(CHUNK) for x in tensors)))


def _adamw_update_scalars_(w16: torch.Tensor, g16: torch.Tensor, m16: torch.Tensor, v16: torch.Tensor,
                           scalars: torch.Tensor, b1: float, b2: float, eps: float) -> None:
    """adamw_update_ with the values that change between steps in one tensor, [lr, wd, bc1, bc2]:
    torch.compile specialises Python floats on some versions (2.11 guards on their values and
    recompiles at every step), never a tensor's values."""
    lr, wd, bc1, bc2 = scalars.unbind()
    adamw_update_(w16, g16, m16, v16, lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, bc1=bc1, bc2=bc2)


def _numel(p: torch.Tensor) -> int:
    return p.numel()


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _packs(params: list[torch.Tensor], limit: int,
           size: Callable[[torch.Tensor], int] = _numel) -> list[list[torch.Tensor]]:
    """Consecutive weights in packs of at most `limit` elements, or another `size`."""
    packs, total = [[]], 0
    for p in params:
        if packs[-1] and total + size(p) > limit:
            packs.append([])
            total = 0
        packs[-1].append(p)
        total += size(p)
    return packs


@functools.cache
def _compiled_update() -> Callable[..., None]:
    """_adamw_update_scalars_ compiled once per process (graphs are cached by dtype)."""
    return torch.compile(_adamw_update_scalars_, dynamic=True, fullgraph=True)


@functools.lru_cache(maxsize=4)
def _step_scalars(device: torch.device, values: tuple[float, ...]) -> torch.Tensor:
    """values as an fp32 tensor on device, made once per step and device (every weight's
    update in a step shares them); copied from pinned memory without waiting for the GPU."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x's memory as a 1-D tensor of its own (not a view, so torch.compile guards on the
    one size only, not on the shape of a base): every weight shares one compiled graph.
    Writes through it do not count as changes of x (its version): the caller bumps that."""
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(), (x.numel(),))


def compile_updates(optimizer: torch.optim.Optimizer) -> int:
    """Run the updates of every AdamWBF16 in `optimizer` (itself, or the per-bucket ones of a
    StepInBackward) as one compiled kernel per weight or pack instead of ~25 small ones per
    chunk: no fp32 temporaries, so no chunks, and packs (buckets) of up to PACK_BYTES per
    tensor. One graph per dtype: weights are passed flat, sizes are dynamic and the step's
    scalars are graph inputs. Returns how many optimizers were switched."""
    if isinstance(optimizer, StepInBackward):
        if not all(isinstance(opt, AdamWBF16) for _, _, opt in optimizer._buckets):
            return 0
        optimizer.rebucket(PACK_BYTES, _nbytes)
        inner = [opt for _, _, opt in optimizer._buckets]
    else:
        inner = [optimizer] if isinstance(optimizer, AdamWBF16) else []
    for opt in inner:
        opt.compiled = True
    return len(inner)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with fp32 arithmetic on state kept in the parameter's dtype.
    On a GPU with Triton one kernel updates all weights of a step count (triton_adamw);
    otherwise each large weight in chunks, or compiled, and small ones in packs."""

    _instances = itertools.count()

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.compiled = False  # compile_updates
        # The fused kernel's roundings: seeds of its own (the global generator's draws stay as they
        # were), another sequence per optimizer (fused_backward makes one per bucket).
        self._seeds = torch.Generator().manual_seed(torch.initial_seed() + next(AdamWBF16._instances))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group, [p for p in group["params"] if p.grad is not None])
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update `params` (of `group`, each with a gradient): one fused kernel on a GPU with
        Triton; otherwise small weights in packs, larger ones in chunks or compiled."""
        limit, size = (PACK_BYTES, _nbytes) if self.compiled else (CHUNK, _numel)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        small: dict[tuple, list[torch.Tensor]] = {}  # packed by (step, dtype, device)
        fused: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}  # one kernel per (step, dtype, device)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)       # m, in p's dtype and memory format
                state["exp_avg_sq"] = torch.zeros_like(p)    # v
            state["step"] += 1
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if triton_adamw.qualifies(tensors):
                fused.setdefault((state["step"], p.dtype, p.device), []).append(tensors)
            elif size(p) < limit and all(x.is_contiguous() for x in tensors):
                small.setdefault((state["step"], p.dtype, p.device), []).append(p)
            else:
                self._update(tensors, lr, b1, b2, eps, wd, state["step"])
        for (t, _, _), weights in fused.items():
            seed = int(torch.randint(0, 1 << 62, (), generator=self._seeds))
            triton_adamw.adamw_(weights, lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, step=t, seed=seed)
        for (t, _, _), packed in small.items():
            for pack in _packs(packed, limit, size):
                self._update_pack(pack, lr, b1, b2, eps, wd, t)

    def _update(self, tensors: tuple[torch.Tensor, ...], lr: float, b1: float, b2: float, eps: float, wd: float,
                t: int) -> None:
        """One weight's update: weight, gradient, m, v."""
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        if self.compiled and all(x.is_contiguous() for x in tensors):
            scalars = _step_scalars(tensors[0].device, (lr, wd, bc1, bc2))
            _compiled_update()(*(_flat(x) for x in tensors), scalars, b1, b2, eps)
            for x in tensors[:1] + tensors[2:]:
                torch.autograd.graph.increment_version(x)  # changed through an alias: say so
            return
        for chunk in _chunks(*tensors):
            adamw_update_(*chunk, lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, bc1=bc1, bc2=bc2)

    def _update_pack(self, params: list[torch.Tensor], lr: float, b1: float, b2: float, eps: float, wd: float,
                     t: int) -> None:
        """Small weights updated as one: concatenated, updated, copied back (a few kernels
        instead of ~25 per weight; the batch-1 step was bound by launching them)."""
        columns = [params, [p.grad for p in params],  # weights, gradients, m, v
                   *([self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq"))]
        if len(params) == 1:
            return self._update(tuple(c[0] for c in columns), lr, b1, b2, eps, wd, t)
        flat = [torch.cat([x.view(-1) for x in column]) for column in columns]
        self._update(tuple(flat), lr, b1, b2, eps, wd, t)
        sizes = [p.numel() for p in params]
        for column, updated in zip(columns[:1] + columns[2:], flat[:1] + flat[2:]):
            torch._foreach_copy_([x.view(-1) for x in column], list(updated.split(sizes)))


class StepInBackward(torch.optim.Optimizer):
    """Optimizers stepped from the backward pass, one per bucket of parameters (see the module docstring)."""

    HYPER = ("lr", "weight_decay", "betas", "eps")

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        """`make(groups)` builds the named optimizer over a list of param groups (one here)."""
        super().__init__(groups, {})
        self._make = make
        self._ready: dict[int, set[torch.nn.Parameter]] = {}  # bucket -> parameters whose gradient is complete
        self._flush_queued = False
        self._hooks = []
        self.rebucket(CHUNK, _numel)
        self.built_with = getattr(next(iter(self.inner.values())), "built_with", {})

    def rebucket(self, limit: int, size: Callable[[torch.Tensor], int] = _numel) -> None:
        """(Re)build the buckets, of at most `limit` elements (or another `size`) each, with an
        inner optimizer each; the state (moments, step counts) stays with its parameters."""
        if self._ready:
            raise RuntimeError("StepInBackward.rebucket: a backward pass is in progress")
        self.remove_hooks()
        self.inner: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._buckets: list[tuple[dict[str, Any], list[torch.nn.Parameter], torch.optim.Optimizer]] = []
        for group in self.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for bucket in _packs(group["params"], limit, size):
                opt = self._make([{**hyper, "params": bucket}])
                for k in self.HYPER:  # the wrapper's group shows what the optimizer runs with
                    if k in opt.param_groups[0]:
                        group.setdefault(k, opt.param_groups[0][k])
                index = len(self._buckets)
                self._buckets.append((group, bucket, opt))
                for p in bucket:
                    self.inner[p] = opt
                    opt.state[p] = self.state[p]  # one dict: filled in place by the inner step
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(index)))

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def gradient_ready(p: torch.Tensor) -> None:
            if not self._flush_queued:  # runs when this backward pass ends
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
                self._flush_queued = True
            ready = self._ready.setdefault(index, set())
            ready.add(p)
            if len(ready) == len(self._buckets[index][1]):
                self._step_bucket(index)
        return gradient_ready

    def _step_bucket(self, index: int) -> None:
        """Step the bucket with the gradients it has, with the schedule's current lr, and free them."""
        group, bucket, opt = self._buckets[index]
        inner_group = opt.param_groups[0]
        for k in self.HYPER:
            if k in inner_group:
                inner_group[k] = group[k]
        opt.step()
        for p in bucket:
            p.grad = None
        del self._ready[index]

    def _flush(self) -> None:
        """The end of a backward pass: step the buckets some of whose parameters got no gradient."""
        self._flush_queued = False
        for index in list(self._ready):
            self._step_bucket(index)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The steps happen in the closure's backward; only run it."""
        if closure is None:
            return None
        self._flush_queued = False  # a backward pass that failed never ran its flush:
        for index in list(self._ready):  # its gradients would add to this step's
            for p in self._ready.pop(index):
                p.grad = None
        with torch.enable_grad():
            return closure()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for p, opt in self.inner.items():
            opt.state[p] = self.state[p]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def check_trainer(trainer: Any, key: str) -> None:
    """Refuse the trainer settings a step in the backward pass cannot honour."""
    from ldm.util import ConfigError

    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        raise ConfigError(f"{key}.fused_backward: each backward pass steps the weights, so gradients cannot be "
                          f"accumulated over batches; set lightning.trainer.accumulate_grad_batches: 1")
    if getattr(trainer, "gradient_clip_val", None):
        raise ConfigError(f"{key}.fused_backward: the gradient is never complete at once, so it cannot be clipped "
                          f"by its norm; remove lightning.trainer.gradient_clip_val")
    if str(getattr(trainer, "precision", "")).startswith("16"):
        raise ConfigError(f"{key}.fused_backward: fp16 loss scaling unscales and checks all gradients before the "
                          f"step; use precision bf16-mixed")


def unet_dtype(precision: str, use_ema: bool, optimizer: str) -> torch.dtype:
    """The UNet's storage dtype for `model.params.unet_precision`, checked against EMA and the optimizer."""
    key = "model.params.unet_precision"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"{key}: expected fp32 or bf16, got {precision!r}")
    if precision == "bf16" and use_ema:
        plain = " with optimizer.name: adamw" if optimizer == "adamw_master" else ""
        raise ValueError(f"{key}: an EMA of bf16 weights cannot take its 1e-4 steps; set use_ema: false, or "
                         f"unet_precision: fp32{plain}")
    if optimizer == "adamw_master" and precision != "bf16":
        raise ValueError(f"{key}: optimizer.name adamw_master keeps fp32 masters of bf16 weights; set "
                         f"unet_precision: bf16 (fp32 weights train with adamw)")
    if precision == "bf16" and optimizer not in ("adamw_bf16", "adamw8bit_bf16", "adamw_master"):
        rank_zero_warn(f"{key}: bf16 weights round away fine-tuning updates smaller than 1/512 of a weight; "
                       f"optimizer.name: adamw_bf16 rounds them stochastically and keeps them, adamw_master "
                       f"keeps fp32 master weights")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_channels_last(channels_last: Any, optimizer: str) -> bool:
    """`model.params.channels_last`, checked against the optimizer: without Triton, adamw_bf16
    packs and chunks flat views of contiguous weights, so NHWC weights would each take the slow
    whole-tensor path, with fp32 temporaries that break the low-memory peaks (its fused kernel
    takes either layout)."""
    key = "model.params.channels_last"
    if not isinstance(channels_last, bool):
        raise ValueError(f"{key}: expected true or false, got {channels_last!r}")
    if channels_last and optimizer == "adamw8bit_bf16":
        raise ValueError(f"{key}: not with optimizer.name: adamw8bit_bf16, whose 8-bit moments follow the "
                         f"weights' element order; set channels_last: false")
    if channels_last and optimizer == "adamw_bf16" and triton_adamw.triton is None:
        raise ValueError(f"{key}: with optimizer.name: adamw_bf16 it needs Triton, which this torch install lacks "
                         f"(without it the packed updates need contiguous weights); set channels_last: false")
    return channels_last
