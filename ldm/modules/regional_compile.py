"""Regional torch.compile: each repeated block of the UNet and the text encoder compiled in place.

A training step at batch 8 on an H100-class GPU is bound by the host: the UNet and the
adapters issue ~10k small kernels, each costing more time to launch from Python than to
run (doc/PERFORMANCE.md). Compiling fuses the elementwise work around the convolutions,
matmuls and attention, and cuts the launches.

Why per block: the 25 UNet blocks (`input_blocks.*`, `middle_block`, `output_blocks.*`) and
the text encoder's layers are small graphs; identical ones (the 12 text-encoder layers) are
traced once, and a graph break or a failed lowering costs one block, not the model. The
plain full fine-tune step (`whole_unet_pays`) compiles the UNet as one graph instead: fused
across the blocks' seams it ran 1.03x faster at batch 32 on an H200 (doc/PERFORMANCE.md).

The VAE encoder runs in every step unless latents are cached (`cache_latents`), and at
512 px it is a third of the step's FLOPs (doc/PERFORMANCE.md): it is compiled whole, one
graph per image shape. The latent cache's one-off pass runs it uncompiled
(ldm.data.latent_cache), since each of its batch shapes would compile for a single use.

`compile: reduce-overhead` also records the UNet blocks as CUDA graphs (torch's CUDA graph
trees): a LoRA step at batch 8 is bound by the host's ~5,600 kernel launches, and a graph
replay launches a block's forward or backward at once (doc/PERFORMANCE.md); so is the
12 GiB full fine-tune at batch 6 (steps in the backward pass). The text encoder
and the VAE encoder are compiled without graphs: a graph tree takes each call that has no
backward pending for an earlier one as the start of a new step and reuses the memory of the
previous step's outputs, and a frozen encoder runs before the UNet without grad, so its
outputs would be overwritten. Evaluation (validation, sampling) runs without grad too; it
runs the blocks uncompiled (`LatentDiffusion.eval_scope`).

`nn.Module.compile` works in place, so parameter names (the state-dict contract with the
CompVis checkpoints) are unchanged.

Shapes are static (`dynamic=False`). All blocks share a few forward functions
(TimestepEmbedSequential.forward, the encoder layer's forward), and torch decides to compile
for dynamic shapes per function, so the second block's different width alone would turn
every later graph dynamic: slower kernels, and inductor (torch 2.14) fails to lower some of
these UNet graphs. Static graphs are cached per function, one entry per block, input shape
(bucket and batch size) and grad mode, so torch's default of 8 entries per function would
silently send most blocks back to eager mode. The limit is raised to

    blocks x 2 grad modes (training; validation and sampling) x SHAPES

so each block compiles for up to SHAPES different input shapes; beyond that torch warns
("hit config.recompile_limit") and the further shapes run eager.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch._functorch.config
from torch import nn

SHAPES = 8
ENTRIES_PER_BLOCK = 2 * SHAPES


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's repeated blocks: every input block, the middle block, every output block."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each block in place for static shapes; returns how many. Raises torch's
    per-function recompile limit to cover them."""
    blocks = list(blocks)
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=False)
    _raise_recompile_limit(len(blocks) * ENTRIES_PER_BLOCK)
    return len(blocks)


def compile_model(model: nn.Module, backend: str = "inductor", cudagraphs: bool = False,
                  whole_unet: bool = False, activation_memory_budget: float = 1.0) -> str:
    """Compile a LatentDiffusion's UNet (its blocks, or with `whole_unet` the UNet as one graph;
    recorded as CUDA graphs if asked), its text-encoder blocks and its VAE encoder; returns a
    line for the log. `activation_memory_budget` (torch's partitioner, process-wide): below 1
    the compiled backward recomputes cheap operations instead of keeping their outputs."""
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    unet = model.model.diffusion_model
    if whole_unet:
        compile_blocks([unet], backend, "reduce-overhead" if cudagraphs else None)
        what = "the UNet as one graph" + (" (as CUDA graphs)" if cudagraphs else "")
    else:
        n_unet = compile_blocks(unet_blocks(unet), backend, "reduce-overhead" if cudagraphs else None)
        what = f"{n_unet} UNet blocks" + (" (as CUDA graphs)" if cudagraphs else "")
    n_text = compile_blocks(model.cond_stage_model.blocks(), backend)
    compile_blocks([model.first_stage_model.encoder], backend)
    budget = f", activation memory budget {activation_memory_budget:g}" if activation_memory_budget < 1 else ""
    return (f"torch.compile ({backend}): {what}, {n_text} text-encoder layers and the VAE "
            f"encoder{budget}, compiled on first use (the first step takes a minute or more)")


def check_memory_budget(budget: Any, compiled: bool) -> float:
    """model.params.activation_memory_budget: a fraction in (0, 1] of the activations the
    compiled backward may keep; below 1 only with `compile` (its partitioner does the
    recomputing). At 0.99 a batch-32 SD 1.x step peaked at 30.2 instead of 35.6 GiB, ~2.5%
    slower (doc/PERFORMANCE.md)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"model.params.activation_memory_budget: expected a number in (0, 1], got {budget!r}")
    if budget < 1 and not compiled:
        raise ValueError("model.params.activation_memory_budget: below 1 needs model.params.compile "
                         "(the compiler chooses what the backward recomputes)")
    return float(budget)


def whole_unet_pays(cudagraphs: bool, fused_backward: bool, use_checkpoint: bool) -> bool:
    """Whether `compile: true` compiles the UNet as one graph: for the plain step, where it
    fuses across the blocks' seams (1.03x at batch 32 on an H200, doc/PERFORMANCE.md). Blocks
    stay separate graphs where the step depends on them: CUDA graphs record blocks; steps in
    the backward (`fused_backward`) free each block's gradients as its backward ends, which a
    single backward graph would only hand over at its end; and gradient checkpointing is
    measured with compiled blocks."""
    return not (cudagraphs or fused_backward or use_checkpoint)


def check_cudagraphs(adapters: bool, unet_config: Mapping[str, Any], fused_backward: bool = False) -> None:
    """compile: reduce-overhead where it is measured: adapter training, or a full fine-tune
    whose optimizer steps in the backward pass (each gradient is used and freed before the
    next step's graphs reuse its memory; no accumulation across steps), each without
    gradient checkpointing (a checkpointed block would replay its forward inside the backward)."""
    if not (adapters or fused_backward):
        raise ValueError("model.params.compile: reduce-overhead (CUDA graphs) is for adapter training "
                         "(a model.params.network section) or a full fine-tune with "
                         "model.params.optimizer.fused_backward: true; otherwise use compile: true")
    if (unet_config.get("params") or {}).get("use_checkpoint", False):
        raise ValueError("model.params.compile: reduce-overhead does not go with gradient checkpointing "
                         "(model.params.unet_config.params.use_checkpoint: true); use compile: true")
    if not hasattr(torch.compiler, "set_stance"):
        raise ValueError(f"model.params.compile: reduce-overhead needs torch >= 2.6 (this is {torch.__version__})")


def check_cudagraphs_trainer(trainer: Any) -> None:
    """A gradient comes out of CUDA graph memory that the next step's replay reuses, so it
    cannot be accumulated over batches: torch's graph trees then fail, or (some versions)
    sum overwritten values (pytorch/pytorch#169545)."""
    from ldm.util import ConfigError

    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        raise ConfigError("model.params.compile: reduce-overhead (CUDA graphs) cannot accumulate gradients over "
                          "batches; set lightning.trainer.accumulate_grad_batches: 1 (and a larger batch_size) "
                          "or use compile: true")


def _raise_recompile_limit(needed: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), needed))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * needed)
