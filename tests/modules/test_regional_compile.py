"""model.params.compile: the UNet's and text encoder's blocks and the VAE encoder compiled in
place give the plain path's loss, gradients and latents, keep the state-dict names, and
several bucket shapes plus a no-grad pass (sampling) fit under the raised recompile limit
instead of falling back to eager.

The backend here is aot_eager (eager for the recompile test): the graphs torch.compile
captures, replayed through autograd without generating kernels (which would take minutes on
two CPU cores); what the inductor backend does to them is measured on the GPU
(doc/PERFORMANCE.md)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.regional_compile import ENTRIES_PER_BLOCK, compile_model, unet_blocks
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def tiny(lora: bool, **params):
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "tests/configs/tiny.yaml"),
                          OmegaConf.load(ROOT / "tests/configs/tiny_lora.yaml") if lora else {})
    cfg.model.params.update(params)
    torch.manual_seed(0)
    model = instantiate_from_config({"target": cfg.model.target, "params": cfg.model.params})
    if lora:
        with torch.no_grad():  # a non-zero ΔW, so the adapters' path shows in the loss
            for p in model.network.parameters():
                p.normal_(0, 0.1)
    return model


def step(model, side: int, seed: int = 3):
    """Loss and trainable gradients of one training step on a batch of 2 at latent side `side`."""
    g = torch.Generator().manual_seed(seed)
    model.noise_rng = torch.Generator().manual_seed(seed)
    batch = {"latent": torch.randn(2, 4, side, side, generator=g),
             "tokens": model.cond_stage_model.tokenize(["a photo of a dog", "a red cube"])}
    loss = model.shared_step(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def assert_same_step(compiled, plain) -> None:
    """The compiled model's training step (no recompile-limit fallback) gives the plain one's
    loss and gradients."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        loss_c, grads_c = step(compiled, 8)
    loss_p, grads_p = step(plain, 8)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-6)
    assert len(grads_c) == len(grads_p) > 0
    for a, b in zip(grads_c, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # ~40 s: dynamo traces every block
def test_compiled_blocks_give_the_plain_loss_and_gradients_and_keep_the_names():
    plain, compiled = tiny(lora=True), tiny(lora=True)  # adapters patch forwards inside the blocks
    names = list(compiled.state_dict())
    line = compile_model(compiled, backend="aot_eager")
    assert "UNet blocks" in line
    blocks = unet_blocks(compiled.model.diffusion_model) + compiled.cond_stage_model.blocks()
    assert all(b._compiled_call_impl is not None for b in blocks + [compiled.first_stage_model.encoder])
    assert list(compiled.state_dict()) == names  # in place: no _orig_mod. in any key
    assert_same_step(compiled, plain)
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1  # encoded in the step
    torch.testing.assert_close(compiled.batch_latents({"image": image}, mode=True),
                               plain.batch_latents({"image": image}, mode=True), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~30 s
def test_new_bucket_shapes_and_sampling_stay_compiled():
    model = tiny(True)
    compile_model(model, backend="eager")  # guards and recompiles are dynamo's: no need to trace autograd
    n = len(unet_blocks(model.model.diffusion_model))
    assert torch._dynamo.config.recompile_limit >= n * ENTRIES_PER_BLOCK
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for side in (8, 12, 16, 8):  # three buckets; the third shape reuses the dynamic graphs
            step(model, side)
        with torch.no_grad():  # what validation and the sample grids do
            model.model(torch.randn(1, 4, 8, 12), torch.tensor([10]),
                        model.get_learned_conditioning(["a cat"]))


def test_compile_must_be_a_boolean_or_reduce_overhead():
    with pytest.raises(ValueError, match="model.params.compile: expected true, false or reduce-overhead"):
        tiny(False, compile="yes")


def test_cuda_graphs_are_for_adapters_or_steps_in_backward_without_gradient_checkpointing():
    with pytest.raises(ValueError, match="reduce-overhead .* is for adapter training .*fused_backward: true"):
        tiny(False, compile="reduce-overhead")
    model = tiny(False, compile="reduce-overhead", optimizer={"name": "adamw_bf16", "fused_backward": True},
                 unet_precision="bf16", use_ema=False)  # the 12 GiB full fine-tune
    assert model.cudagraphs and model.network_config is None
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model.params.unet_config
    cfg.params.use_checkpoint = True
    with pytest.raises(ValueError, match="does not go with gradient checkpointing .*use_checkpoint"):
        tiny(True, compile="reduce-overhead", unet_config=cfg)


def test_cuda_graphs_refuse_gradient_accumulation(monkeypatch):
    """A graph's gradient memory is reused by the next step's replay: accumulating over
    batches is refused when the optimizer is configured, naming the trainer key."""
    from ldm.util import ConfigError

    model = tiny(True, compile="reduce-overhead")
    for accumulate, fails in ((1, False), (2, True)):
        trainer = SimpleNamespace(accumulate_grad_batches=accumulate, precision="32-true", max_epochs=1,
                                  datamodule=None, estimated_stepping_batches=10)
        monkeypatch.setattr(type(model), "trainer", property(lambda self, t=trainer: t))
        monkeypatch.setattr(model, "_trainer", trainer, raising=False)
        if fails:
            with pytest.raises(ConfigError, match="accumulate_grad_batches: 1"):
                model.configure_optimizers()
        else:
            assert model.configure_optimizers()["optimizer"] is not None


def test_cuda_graphs_cover_the_unet_blocks_only(monkeypatch):
    modes = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.__setitem__(id(self), kw["mode"]))
    model = tiny(True, compile="reduce-overhead")
    monkeypatch.setattr(type(model), "trainer", property(lambda self: SimpleNamespace(precision="32-true")))
    model.setup("fit")
    assert {modes[id(b)] for b in unet_blocks(model.model.diffusion_model)} == {"reduce-overhead"}
    others = model.cond_stage_model.blocks() + [model.first_stage_model.encoder]
    assert {modes[id(b)] for b in others} == {None}  # their no-grad calls would end a graph tree's step


def test_the_whole_unet_as_cuda_graphs_for_the_bench(monkeypatch):
    """bench/train_step.py --cudagraphs --whole_unet: one graph for the UNet, recorded."""
    modes = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.__setitem__(id(self), kw["mode"]))
    model = tiny(False)
    line = compile_model(model, cudagraphs=True, whole_unet=True)
    assert "the UNet as one graph (as CUDA graphs)" in line
    assert modes[id(model.model.diffusion_model)] == "reduce-overhead"
    assert not any(id(b) in modes for b in unet_blocks(model.model.diffusion_model))


def test_cuda_graphs_mark_each_training_step_and_evaluate_uncompiled(monkeypatch):
    """Each training step tells the graph trees a new step begins; validation runs with the
    compiled code set aside (force_eager), training does not."""
    model = tiny(True, compile="reduce-overhead")
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("step"))
    real_stance = torch.compiler.set_stance

    def stance(name, **kw):
        events.append(name)
        return real_stance(name, **kw)
    monkeypatch.setattr(torch.compiler, "set_stance", stance)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    batch = {"latent": torch.randn(2, 4, 8, 8), "caption": ["a", "b"], "path": ["a.png", "b.png"],
             "tokens": model.cond_stage_model.tokenize(["a", "b"])}
    model.noise_rng = torch.Generator().manual_seed(0)
    model.training_step(batch, 0)
    assert events == ["step"]
    with torch.no_grad():
        model.validation_step(batch, 0)
    assert events == ["step", "force_eager"]


@pytest.mark.parametrize("params, checkpointing, whole", [
    ({}, False, True),  # the plain step: the UNet as one graph
    ({"optimizer": {"fused_backward": True}}, False, False),  # each block's gradients freed as its backward ends
    ({}, True, False),
])
def test_the_config_switch_compiles_at_setup_once(params, checkpointing, whole):
    model = tiny(False, compile=True, **params)
    unet = model.model.diffusion_model
    for m in unet.modules():  # unet_config.params.use_checkpoint
        if hasattr(m, "use_checkpoint"):
            m.use_checkpoint = checkpointing
    compiled = [unet] if whole else unet_blocks(unet)
    assert all(m._compiled_call_impl is None for m in compiled)  # not before the run is set up
    model.setup("fit")
    first = [m._compiled_call_impl for m in compiled]
    assert all(c is not None for c in first)
    others = [unet_blocks(unet)[0]] if whole else [unet]
    assert all(m._compiled_call_impl is None for m in others)  # never both
    model.setup("validate")  # Lightning sets up again for later stages: not compiled twice
    assert [m._compiled_call_impl for m in compiled] == first


def test_the_whole_compiled_unet_gives_the_plain_loss_and_gradients():
    plain, compiled = tiny(lora=False), tiny(lora=False)
    with torch.no_grad():  # the zero-initialised output layers random, so every weight gets gradient
        for a, b in zip(plain.model.parameters(), compiled.model.parameters()):
            if not a.any():
                a.normal_(0, 0.02)
                b.copy_(a)
    assert "the UNet as one graph" in compile_model(compiled, backend="aot_eager", whole_unet=True)
    assert_same_step(compiled, plain)


@pytest.mark.parametrize("params, match", [
    ({"activation_memory_budget": "yes"}, r"activation_memory_budget: expected a number in \(0, 1\], got 'yes'"),
    ({"activation_memory_budget": 0, "compile": True}, r"expected a number in \(0, 1\], got 0"),
    ({"activation_memory_budget": 1.5, "compile": True}, r"expected a number in \(0, 1\], got 1.5"),
    ({"activation_memory_budget": 0.5}, "activation_memory_budget: below 1 needs model.params.compile"),
])
def test_bad_memory_budgets_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        tiny(False, **params)


def test_the_memory_budget_reaches_the_partitioner_at_setup_and_resets():
    config = torch._functorch.config
    try:
        model = tiny(False, compile=True, activation_memory_budget=0.5)
        model.setup("fit")
        assert config.activation_memory_budget == 0.5
        tiny(False, compile=True).setup("fit")  # a later run in the process gets the default back
        assert config.activation_memory_budget == 1.0
    finally:
        config.activation_memory_budget = 1.0


@pytest.mark.slow  # ~20 s: the tiny UNet traced twice
def test_a_memory_budget_below_1_recomputes_and_gives_the_plain_loss_and_gradients():
    """The partitioner that honours the budget (inductor's) with eager kernels: the backward
    recomputes, the step is the plain one's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved = []

    def forward_compiler(gm, example_inputs):  # the forward graph's outputs: its result and what it saves
        saved.append(sum(n.meta["val"].numel() for n in gm.graph.find_nodes(op="output")[0].args[0]
                         if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)))
        return make_boxed_func(gm)
    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    elements = []
    try:
        for budget in (1.0, 0.1):
            torch._dynamo.reset()
            plain, compiled = tiny(lora=False), tiny(lora=False)
            compile_model(compiled, backend=backend, whole_unet=True, activation_memory_budget=budget)
            saved.clear()
            assert_same_step(compiled, plain)
            elements.append(sum(saved))
    finally:
        torch._functorch.config.activation_memory_budget = 1.0
    assert elements[1] < 0.9 * elements[0], elements  # fewer activations kept for the backward
