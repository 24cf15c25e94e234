"""The UNet's training forward and backward replayed from CUDA graphs, one pair per input shape.

Why: an eager SD 1.x step at batch 6 launches ~4,500 kernels, and on an H100-class GPU the
host's time to launch them (~110 ms) is as long as the GPU's time to run them: the step runs
at the host's speed, which varies from one machine to the next and drifts within a run
(doc/performance/end-to-end.md). A CUDA graph records the kernels once and launches them all
with one call, so the step runs at the GPU's speed and the host is free for the rest of the
run (the loader, the logger, the checkpoint writer). No compiler is involved: the graphs replay
the eager kernels, and recording a new shape takes about one step's host time, not the
minutes `compile` needs per bucket.

How:
- the first training calls run eagerly until the memory held between steps stops growing (the
  first sets up cuBLAS and cuDNN, the optimizer makes its state in it): usually two;
- then each input shape (the bucket's latent size, batch size and autocast state) is recorded
  at its first call: the forward into one graph and the backward into another, all in one
  memory pool that all shapes share (only one shape's graphs run at a time, so each shape's
  activations reuse the same memory: the pool holds about the largest shape's, not the sum);
  with cuDNN's trials on (`lightning.trainer.benchmark`) a shape's first call runs eagerly
  first, as the trials cannot run inside a recording;
- every later call copies the inputs into the recorded ones and replays. The forward's output
  is the recorded output tensor; autograd calls the backward graph with the output's gradient.

The backward graph adds each weight's gradient into a gradient tensor recorded with it, kept
for the run. Before each backward replay those tensors become the weights' `.grad` again:
zeroed where `.grad` was set to None (Lightning does before validation; once graphs exist,
the model's `optimizer_zero_grad` zeroes in place instead), holding its values where `.grad`
is another tensor (an eager step's), so the replay adds exactly as autograd would. A weight
whose storage moved (the UNet moved or re-cast during training) stops the run: the graphs
would read memory it no longer uses.

Memory: the pool holds the recorded step's activations apart from the memory eager work
(validation, sample grids, the VAE's encoding in the step) keeps; each recording starts by
returning the allocator's cache to the driver (torch.cuda.graph does). SD 1.x at batch 6 held
21.2 GiB reserved with the graphs against 18.7 eager, with main.py's allocator setting
(expandable segments; 25-28 GiB without it, where the pool's blocks of one shape's sizes do not
fit the next shape's). With `auto` the graphs are recorded only where that surely fits: before
the first recording, `graphs_fit` projects the memory held with the pool from what the eager
steps held, against what this process can have of the GPU; where it does not fit, the run stays
eager (on a 24 GB card with the fine-tune configs' batch 6, where `true` fits with ~1.8 GiB to
spare: doc/performance/end-to-end.md).

What it does not do (`true` refuses these, `auto` stays eager with them): a text encoder
that trains (the context's gradient), adapters, gradient checkpointing, optimizer steps in the
backward pass, `compile`, and several GPUs (the data-parallel gradient hooks run on eager
backward only). Validation and sampling run without grad and stay eager.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn


@dataclass
class _Graphs:
    """One input shape's recorded forward and backward and the tensors they read and write."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor
    grad_out: torch.Tensor
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph


class _Replay(torch.autograd.Function):
    """The recorded forward as an autograd node whose backward replays the recorded backward.
    `anchor` (a trained weight) makes the output require grad; its gradient, like every
    weight's, is added by the backward graph, so none is returned."""

    @staticmethod
    def forward(ctx, owner: GraphedUNet, graphs: _Graphs, x, t, context, anchor):  # noqa: ARG004
        graphs.x.copy_(x)
        graphs.t.copy_(t)
        graphs.context.copy_(context)
        graphs.forward.replay()
        ctx.owner, ctx.graphs = owner, graphs
        return graphs.out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.owner.attach_grads()
        ctx.graphs.grad_out.copy_(grad_out)
        ctx.graphs.backward.replay()
        return None, None, None, None, None, None


class GraphedUNet:
    """Calls `unet(x, t, context)`: eagerly where graphs do not apply (no grad, a CPU tensor,
    an input that needs a gradient) and before the first recording (`_record_now`); after it,
    from each shape's CUDA graphs, recorded at the shape's first call."""

    def __init__(self, unet: nn.Module, auto: bool = False):
        self.unet = unet
        self.auto = auto  # record only where the pool fits beside what eager work holds (graphs_fit)
        self.eager_only = False  # auto found it would not fit: every call eager
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("cuda_graphs: the UNet has no trained weights")
        self.graphs: dict[tuple, _Graphs] = {}
        self.seen: set[tuple] = set()  # shapes cuDNN's trials have run for (torch.backends.cudnn.benchmark)
        self._held: int | None = None  # memory allocated at the last eager call before the first recording
        self.pool = None  # made at the first recording
        self._recorded: list[tuple[nn.Parameter, int, torch.Tensor]] = []  # (weight, its address, its gradient)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, h, w] latents, t: [B] timesteps, context: [B, L, D] -> [B, C, h, w]
        if self.eager_only or not self._replayable(x, t, context):
            return self.unet(x, t, context)
        key = self._key(x, t, context)
        graphs = self.graphs.get(key)
        if graphs is None:
            if torch.backends.cudnn.benchmark and key not in self.seen:  # its trials cannot run in a recording
                self.seen.add(key)
                return self.unet(x, t, context)
            if self.pool is None and not self._record_now():
                return self.unet(x, t, context)
            graphs = self.graphs[key] = self._record(x, t, context)
        self._check_weights()
        return _Replay.apply(self, graphs, x, t, context, self.params[0])

    def _replayable(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> bool:
        return (x.is_cuda and torch.is_grad_enabled() and self.unet.training
                and not any(a.requires_grad for a in (x, t, context)))

    @property
    def active(self) -> bool:
        """Whether graphs have been recorded (their gradient tensors are kept from then on)."""
        return self.pool is not None

    def _record_now(self) -> bool:
        """Before the first recording: eager steps until the memory held between steps stops growing
        (the first step sets up cuBLAS and cuDNN, the optimizer makes its state in it), so that the
        last eager step ran beside everything a graphed one will; then, with auto, record only where
        the pool fits (`graphs_fit`), else stay eager for the run."""
        held, before = torch.cuda.memory_allocated(), self._held
        self._held = held
        if before is None or held > 1.01 * before:
            return False
        if self.auto and not self._pool_fits():
            self.eager_only = True
            return False
        return True

    def _pool_fits(self) -> bool:
        fits, projected, capacity = graphs_fit(torch.cuda.max_memory_reserved(), torch.cuda.memory_allocated(),
                                               device_capacity())
        gib = 2**30
        room = f"~{projected / gib:.1f} GiB with the graphs' pool, of the {capacity / gib:.1f} GiB the process can have"
        rank_zero_info("model.params.cuda_graphs: auto: " + (
            f"the UNet's training steps replayed from CUDA graphs ({room})" if fits else
            f"the UNet's training steps stay eager ({room}; 90% is the limit)"))
        return fits

    @staticmethod
    def _key(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple:
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return tuple((a.shape, a.stride(), a.dtype) for a in (x, t, context)) + (autocast,)

    def _record(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> _Graphs:
        """Record the forward and the backward for these inputs' shape. Records only: nothing
        runs until the caller replays."""
        if not self._recorded:  # the gradient tensors every backward graph adds into, kept for the run
            self._recorded = [(p, p.data_ptr(), p.grad if p.grad is not None else torch.zeros_like(p))
                              for p in self.params]
            self.pool = torch.cuda.graph_pool_handle()
        self._check_weights()
        self.attach_grads()  # the backward records in-place adds into these tensors
        static = [torch.empty_like(a).copy_(a) for a in (x, t, context)]
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # autocast as the caller has it, without its cache of cast weights: a cast recorded in
        # the graph must write into the pool, not into a cache entry freed after this step.
        # thread_local: the loader's pinning thread calls CUDA while this one records
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                            enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
            with torch.cuda.graph(forward, pool=self.pool, capture_error_mode="thread_local"):
                out = self.unet(*static)
        grad_out = torch.empty_like(out)
        with torch.cuda.graph(backward, pool=self.pool, capture_error_mode="thread_local"):
            out.backward(grad_out)
        return _Graphs(*static, out=out.detach(), grad_out=grad_out, forward=forward, backward=backward)

    def _check_weights(self) -> None:
        for p, address, _ in self._recorded:
            if p.data_ptr() != address:
                raise RuntimeError(f"cuda_graphs: a UNet weight of shape {tuple(p.shape)} moved since its CUDA graphs "
                                   f"were recorded; do not move or re-cast the UNet during training")

    def attach_grads(self) -> None:
        """Make each weight's `.grad` its recorded gradient tensor again, holding the value autograd
        would add to: zero for None, the values of another tensor (an eager step's) copied in."""
        stale = [(p, grad) for p, _, grad in self._recorded if p.grad is not grad]
        if not stale:
            return
        zeroed = [grad for p, grad in stale if p.grad is None]
        if zeroed:
            torch._foreach_zero_(zeroed)
        for p, grad in stale:
            if p.grad is not None:
                grad.copy_(p.grad)
            p.grad = grad

    def release(self) -> None:
        """Free the graphs and their memory pool (the weights keep their gradients)."""
        self.graphs.clear()
        self.seen.clear()
        self._recorded = []
        self.pool = None


def graphs_fit(peak_reserved: int, allocated: int, capacity: int, share: float = 0.9) -> tuple[bool, int, int]:
    """Whether the graphs' pool fits (bytes): the pool takes about what an eager training step
    took above the weights and optimizer state (`peak_reserved - allocated`, measured between
    two steps), on top of what eager work keeps reserved (`peak_reserved`), within `share` of
    what the process can have (`capacity`). Returns (fits, projected, capacity)."""
    projected = peak_reserved + max(peak_reserved - allocated, 0)
    return projected <= share * capacity, projected, capacity


def device_capacity() -> int:
    """Bytes of the current GPU this process can hold: what it holds plus what is free, within
    torch.cuda.set_per_process_memory_fraction's cap."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return min(free + torch.cuda.memory_reserved(), int(fraction * total))


def check_cuda_graphs(enabled: bool | str, *, compile: bool | str, adapters: bool, text_encoder_trains: bool,
                      fused_backward: bool, unet_config: dict) -> bool | str:
    """model.params.cuda_graphs against the rest of the model's config; returns it (True, False
    or "auto"). `auto` is off where `true` would be refused."""
    key = "model.params.cuda_graphs"
    if enabled != "auto" and not isinstance(enabled, bool):
        raise ValueError(f"{key}: expected true, false or auto, got {enabled!r}")
    if not enabled:
        return False
    refused = [(compile, "compile (its reduce-overhead mode records graphs of the compiled kernels)"),
               (adapters, "adapters (model.params.network: use compile: reduce-overhead)"),
               (text_encoder_trains, "a text encoder that trains (the graphs give the UNet's inputs no gradient)"),
               (fused_backward, "optimizer.fused_backward (its steps run inside the backward pass)"),
               ((unet_config.get("params") or {}).get("use_checkpoint", False),
                "gradient checkpointing (unet_config.params.use_checkpoint)")]
    for value, what in refused:
        if value and enabled == "auto":  # where it applies: these runs stay eager
            return False
        if value:
            raise ValueError(f"{key}: true does not go with {what}; set cuda_graphs: false or turn that off")
    return enabled


def check_cuda_graphs_trainer(trainer, enabled: bool | str) -> bool | str:
    """The data-parallel strategies reduce gradients from hooks of the eager backward, which a
    replayed graph does not call: `true` refuses several GPUs, `auto` is off there. Returns the
    setting for this run."""
    from ldm.util import ConfigError

    if getattr(trainer, "world_size", 1) <= 1:
        return enabled
    if enabled == "auto":
        return False
    raise ConfigError("model.params.cuda_graphs: true trains on one GPU only (the gradients of a replayed "
                      "backward are not reduced across GPUs); set cuda_graphs: false for several GPUs")
