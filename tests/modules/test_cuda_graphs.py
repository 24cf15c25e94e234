"""model.params.cuda_graphs: what a CPU can check of the UNet's steps replayed from CUDA graphs.

Recording and replaying need a GPU; bench/cuda_graphs_check.py trains the same steps eagerly
and from the graphs there and compares losses and weights (doc/performance/end-to-end.md).
Here: the config's refusals (each naming the key), the run's refusal of several GPUs, the
eager path on a CPU (the same loss and gradients as without the switch), and the gradients
the graphs add into (zero_grad in place; `.grad` tensors made the recorded ones again, with
the values autograd would add to)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.cuda_graphs import GraphedUNet, device_capacity, graphs_fit
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def tiny(**params):
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml")
    cfg.model.params.update(params)
    torch.manual_seed(0)
    return instantiate_from_config({"target": cfg.model.target, "params": cfg.model.params})


def loss_and_grads(model):
    model.noise_rng = torch.Generator().manual_seed(3)
    batch = {"latent": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
             "tokens": model.cond_stage_model.tokenize(["a photo of a dog", "a red cube"])}
    loss = model.shared_step(batch)
    loss.backward()
    return loss.detach(), [p.grad for p in model.model.parameters()]


@pytest.mark.parametrize("params, refused", [
    ({"compile": True}, "compile"),
    ({"cond_stage_trainable": True}, "a text encoder that trains"),
    ({"optimizer": {"name": "adamw_bf16", "fused_backward": True}, "unet_precision": "bf16"},
     "optimizer.fused_backward"),
    ({"unet_config": {"params": {"use_checkpoint": True}}}, "gradient checkpointing"),
])
def test_cuda_graphs_refuse_what_the_graphs_cannot_replay(params, refused):
    if "unet_config" in params:
        cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model.params.unet_config
        cfg.params.use_checkpoint = True
        params = {"unet_config": cfg}
    with pytest.raises(ValueError, match=f"model.params.cuda_graphs: true does not go with {refused}"):
        tiny(cuda_graphs=True, **params)


def test_cuda_graphs_refuse_adapters_and_values_that_are_not_booleans():
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny_lora.yaml").model.params
    with pytest.raises(ValueError, match="cuda_graphs: true does not go with adapters"):
        tiny(cuda_graphs=True, network=cfg.network)
    with pytest.raises(ValueError, match="model.params.cuda_graphs: expected true, false or auto, got 'yes'"):
        tiny(cuda_graphs="yes")


def attach_trainer(model, monkeypatch, world_size: int) -> None:
    """A stand-in trainer on `world_size` GPUs, as configure_optimizers reads it."""
    trainer = SimpleNamespace(world_size=world_size, accumulate_grad_batches=1, precision="32-true",
                              max_epochs=1, datamodule=None, estimated_stepping_batches=10)
    monkeypatch.setattr(type(model), "trainer", property(lambda self, t=trainer: t))
    monkeypatch.setattr(model, "_trainer", trainer, raising=False)


def test_cuda_graphs_train_on_one_gpu_only(monkeypatch):
    model = tiny(cuda_graphs=True)
    for world_size, fails in ((1, False), (2, True)):
        attach_trainer(model, monkeypatch, world_size)
        if fails:
            with pytest.raises(ConfigError, match="model.params.cuda_graphs: true trains on one GPU only"):
                model.configure_optimizers()
        else:
            assert model.configure_optimizers()["optimizer"] is not None


def test_auto_is_the_default_and_off_where_true_would_be_refused():
    assert tiny().cuda_graphs == "auto"
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny_lora.yaml").model.params
    assert tiny(network=cfg.network).cuda_graphs is False  # adapters: eager, no error
    assert tiny(compile=True).cuda_graphs is False
    assert tiny(cond_stage_trainable=True).cuda_graphs is False


def test_auto_is_off_on_several_gpus(monkeypatch):
    model = tiny()
    attach_trainer(model, monkeypatch, world_size=2)
    model.configure_optimizers()
    assert model.cuda_graphs is False


GIB = 2**30


@pytest.mark.parametrize("peak, allocated, capacity, fits", [
    (19.3, 12.9, 131.0, True),  # SD 1.x batch 6 on an H200: ~25.7 GiB projected
    (19.3, 12.9, 39.0, True),  # a 40 GB card
    (19.3, 12.9, 23.0, False),  # a 24 GB card
    (19.3, 12.9, 28.0, False),  # 25.7 > 0.9 x 28
])
def test_graphs_fit_projects_one_more_eager_step_of_working_memory(peak, allocated, capacity, fits):
    ok, projected, _ = graphs_fit(int(peak * GIB), int(allocated * GIB), int(capacity * GIB))
    assert ok is fits and projected == int(peak * GIB) + int(peak * GIB) - int(allocated * GIB)


def test_device_capacity_is_what_the_process_holds_and_what_is_free_within_its_cap(monkeypatch):
    from ldm.modules import cuda_graphs

    monkeypatch.setattr(cuda_graphs.torch.cuda, "mem_get_info", lambda: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(cuda_graphs.torch.cuda, "memory_reserved", lambda: 15 * GIB)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "get_per_process_memory_fraction", lambda: 1.0, raising=False)
    assert device_capacity() == 75 * GIB
    monkeypatch.setattr(cuda_graphs.torch.cuda, "get_per_process_memory_fraction", lambda: 0.25, raising=False)
    assert device_capacity() == 20 * GIB  # a cap as on a smaller card


def fake_graphs(monkeypatch, graphed: GraphedUNet, held_gib: list[float]) -> list[str]:
    """Run GraphedUNet's choices on a CPU: each call's memory held between steps from `held_gib`,
    recording and replaying stood in for; returns what each call did ("eager", "record", "replay")."""
    from ldm.modules import cuda_graphs

    calls, held = [], iter(held_gib)
    monkeypatch.setattr(graphed, "_replayable", lambda *a: True)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "memory_allocated", lambda: int(next(held) * GIB))

    def record(x, t, context):
        calls.append("record")
        graphed.pool = "recorded"
        return "graphs"
    monkeypatch.setattr(graphed, "_record", record)
    monkeypatch.setattr(cuda_graphs._Replay, "apply", lambda *a: calls.append("replay") or a[3])
    graphed.unet.forward = lambda x, t, context: calls.append("eager") or x
    return calls


def run_shapes(graphed: GraphedUNet, widths: list[int]) -> None:
    for w in widths:
        graphed(torch.ones(2, 4, 8, w), torch.zeros(2), torch.ones(2, 77, 8))


def test_recording_waits_until_the_memory_held_between_steps_stops_growing(monkeypatch):
    """The optimizer makes its state in the first step: the graphs are recorded after an eager
    step that ran beside it; then each new shape is recorded at its first call."""
    graphed = GraphedUNet(torch.nn.Linear(3, 2))
    calls = fake_graphs(monkeypatch, graphed, [2.0, 13.3, 13.3])  # read until the first recording
    run_shapes(graphed, [8, 8, 10, 12, 10, 8])
    assert calls == ["eager", "eager", "record", "replay", "record", "replay", "replay", "record", "replay"]


def test_with_cudnn_trials_on_each_new_shape_runs_eagerly_first(monkeypatch):
    graphed = GraphedUNet(torch.nn.Linear(3, 2))
    calls = fake_graphs(monkeypatch, graphed, [13.3, 13.3])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    run_shapes(graphed, [8, 8, 8, 10, 10])  # 8: the trials, then the two eager steps before recording
    assert calls == ["eager", "eager", "record", "replay", "eager", "record", "replay"]


def test_auto_stays_eager_for_the_run_where_the_pool_would_not_fit(monkeypatch):
    checked = []
    graphed = GraphedUNet(torch.nn.Linear(3, 2), auto=True)
    calls = fake_graphs(monkeypatch, graphed, [2.0, 13.3, 13.3])
    monkeypatch.setattr(graphed, "_pool_fits", lambda: checked.append(len(calls)) or False)
    run_shapes(graphed, [8, 8, 8, 10, 8])
    assert calls == ["eager"] * 5 and graphed.eager_only and not graphed.active
    assert checked == [2]  # once, at the third call: the first after the optimizer made its state


def test_on_a_cpu_the_switch_trains_eagerly_with_the_same_loss_and_gradients():
    plain, graphed = tiny(), tiny(cuda_graphs=True)
    loss_p, grads_p = loss_and_grads(plain)
    loss_g, grads_g = loss_and_grads(graphed)
    assert graphed._graphed is None  # nothing recorded: graphs need a CUDA GPU
    torch.testing.assert_close(loss_g, loss_p, rtol=0, atol=0)
    for a, b in zip(grads_g, grads_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_are_zeroed_in_place_once_graphs_exist():
    """The graphs add into the gradient tensors they were recorded with: Lightning's zero_grad
    zeroes them in place (all at once) once the model has its GraphedUNet, frees them before."""
    model = tiny(cuda_graphs=True)
    opt = torch.optim.SGD(model.model.parameters(), lr=0.1)
    loss_and_grads(model)
    model.optimizer_zero_grad(0, 0, opt)
    assert all(p.grad is None for p in model.model.parameters())
    loss_and_grads(model)
    grads = [p.grad for p in model.model.parameters()]
    model._graphed = GraphedUNet(model.model)
    model.optimizer_zero_grad(0, 1, opt)  # nothing recorded yet (or auto stayed eager): freed
    assert all(p.grad is None for p in model.model.parameters())
    for p, g in zip(model.model.parameters(), grads):
        p.grad = g
    model._graphed.pool = "recorded"  # as after the first recording
    model.optimizer_zero_grad(0, 2, opt)
    assert all(p.grad is g and not g.any() for p, g in zip(model.model.parameters(), grads))
    model.on_train_end()  # the graphs go, the gradients stay
    assert model._graphed is None and all(p.grad is g for p, g in zip(model.model.parameters(), grads))


def test_attach_grads_gives_the_recorded_tensors_the_values_autograd_would_add_to():
    """Before a backward replay each weight's .grad becomes its recorded tensor again: zeros
    where zero_grad set None, the values of another tensor (an eager step's) where .grad is one."""
    unet = torch.nn.Linear(3, 2)
    graphed = GraphedUNet(unet)
    recorded = [torch.full_like(p, 7.0) for p in graphed.params]  # stale values of an earlier step
    graphed._recorded = [(p, p.data_ptr(), g) for p, g in zip(graphed.params, recorded)]
    weight, bias = graphed.params
    weight.grad, bias.grad = None, torch.ones_like(bias)
    graphed.attach_grads()
    assert weight.grad is recorded[0] and not weight.grad.any()
    assert bias.grad is recorded[1] and torch.equal(bias.grad, torch.ones_like(bias))
    graphed.attach_grads()  # already attached: unchanged
    assert weight.grad is recorded[0] and bias.grad is recorded[1]


def test_a_weight_that_moved_since_recording_stops_the_run():
    unet = torch.nn.Linear(3, 2)
    graphed = GraphedUNet(unet)
    graphed._recorded = [(p, p.data_ptr(), torch.zeros_like(p)) for p in graphed.params]
    unet.weight.data = unet.weight.data.clone()  # re-cast or moved: new storage
    with pytest.raises(RuntimeError, match=r"a UNet weight of shape \(2, 3\) moved since its CUDA graphs"):
        graphed._check_weights()


def test_graphs_are_not_used_without_grad_or_on_a_cpu():
    """Validation and sampling (no grad) and CPU tensors run the UNet itself: nothing is seen or recorded."""
    calls = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, t, context):
            calls.append(x.shape)
            return x * self.w

    graphed = GraphedUNet(Net())
    x, t, c = torch.ones(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.ones(2, 77, 8)
    with torch.no_grad():
        graphed(x, t, c)
    graphed(x, t, c)
    assert len(calls) == 2 and not graphed.seen and not graphed.graphs
