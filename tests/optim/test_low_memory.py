"""adamw_bf16 (stochastic rounding), optimizer steps in the backward pass (fused_backward), and
bf16 UNet weights, alone and through main.py."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.optim.low_memory import AdamWBF16, StepInBackward, check_trainer, stochastic_round_
from ldm.optim.optimizers import OptimizerConfig, build_optimizer, build_scheduler
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("x, lo, hi", [(1.0 + 0.3 * 2**-7, 1.0, 1.0 + 2**-7),       # bf16 spacing 2^-7 in [1, 2)
                                         (-3.0 - 0.7 * 2**-6, -3.0 - 2**-6, -3.0)])  # 2^-6 in [2, 4)
def test_stochastic_rounding_lands_on_the_two_neighbours_with_the_right_mean(x, lo, hi):
    src = torch.full((200_000,), x)
    dst = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(dst, src, torch.Generator().manual_seed(0))
    assert set(dst.float().unique().tolist()) == {lo, hi}
    assert abs(dst.float().mean().item() - x) < 0.01 * (hi - lo)  # unbiased (the mean's std is 0.001 steps)


@pytest.mark.parametrize("chunk", [1 << 22, 5])  # whole tensors; the [4, 8] weight in 7 pieces
def test_adamw_bf16_is_adamw_on_fp32_weights(chunk, monkeypatch):
    monkeypatch.setattr("ldm.optim.low_memory.CHUNK", chunk)
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    b = copy.deepcopy(a)
    opt_a = AdamWBF16(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_adamw_bf16_keeps_updates_smaller_than_a_bf16_step():
    """lr 1e-4 on weights of 1.0: each step moves a weight by ~1e-4, under half the bf16 spacing
    (2^-8 = 3.9e-3) there; plain AdamW on bf16 weights loses every step, adamw_bf16 keeps them."""
    torch.manual_seed(0)
    steps, lr = 200, 1e-4
    moved = {}
    for name, make in (("sr", lambda p: AdamWBF16([p], lr=lr, weight_decay=0.0)),
                       ("nearest", lambda p: torch.optim.AdamW([p], lr=lr, weight_decay=0.0, foreach=False))):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = make(p)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # a constant gradient: Adam's step is lr every time
            opt.step()
        moved[name] = (1.0 - p.float()).mean().item()
    assert moved["nearest"] == 0.0
    assert moved["sr"] == pytest.approx(steps * lr, rel=0.1)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sched=None) -> None:
    for step in steps:
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))

        def closure():
            loss = model(x).square().mean()
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16"])
def test_steps_in_backward_equal_the_usual_step_with_the_schedule_and_free_the_gradients(name):
    cfg = OptimizerConfig.from_mapping({"name": name, "scheduler": "linear", "warmup": 2})
    fused_cfg = OptimizerConfig.from_mapping({"name": name, "scheduler": "linear", "warmup": 2, "fused_backward": True})
    plain, fused = mlp(), mlp()
    opt = build_optimizer({"unet": plain.parameters()}, cfg, "cpu")
    fopt = build_optimizer({"unet": fused.parameters()}, fused_cfg, "cpu")
    assert isinstance(fopt, StepInBackward) and len(fopt.inner) == 4
    run(plain, opt, range(6), build_scheduler(opt, cfg, 6))
    run(fused, fopt, range(6), build_scheduler(fopt, fused_cfg, 6))
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.grad is None  # freed as soon as it was used


def test_adamw_bf16_packs_small_weights_by_step_count_and_still_is_adamw(monkeypatch):
    """Weights under CHUNK elements are updated concatenated, in packs of at most CHUNK; a
    weight that skipped steps (no gradient) has its own bias correction, so its own pack."""
    monkeypatch.setattr("ldm.optim.low_memory.CHUNK", 18)  # weights of 32 (alone), 4 + 12 (a pack), 3
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    opt_a = AdamWBF16(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    packed, real = [], AdamWBF16._update_pack
    monkeypatch.setattr(AdamWBF16, "_update_pack",
                        lambda self, params, *args: packed.append(len(params)) or real(self, params, *args))
    for step in range(4):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).square().mean().backward()
            if step % 2:
                model[1].bias.grad = None  # skips this step
            opt.step()
            opt.zero_grad()
    assert packed == [2, 1, 2, 2, 1, 2]  # 4+12 | 3, then without the 3, then the 3 at its own step 2
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_steps_in_backward_go_by_bucket_and_step_a_bucket_with_a_parameter_left_out(monkeypatch):
    """Buckets of consecutive weights step when their last gradient is complete; a bucket with
    a weight that gets no gradient (an unused layer) steps at the end of the backward pass."""
    monkeypatch.setattr("ldm.optim.low_memory.CHUNK", 60)  # mlp weights 96, 16, 48, 3 and unused 6, 2
    cfg = OptimizerConfig.from_mapping({"name": "adamw"})
    fused_cfg = OptimizerConfig.from_mapping({"name": "adamw", "fused_backward": True})
    plain = mlp().append(nn.Linear(3, 2))  # the last layer is never called: no gradient
    fused = copy.deepcopy(plain)
    opt = build_optimizer({"unet": plain.parameters()}, cfg, "cpu")
    fopt = build_optimizer({"unet": fused.parameters()}, fused_cfg, "cpu")
    assert [len(bucket) for _, bucket, _ in fopt._buckets] == [1, 1, 4]  # 96 | 16 | 48 3 6 2
    steps = []
    for _, bucket, inner in fopt._buckets:
        inner.register_step_post_hook(lambda o, args, kwargs, n=len(steps): steps.append(n))
    for model, o in ((plain, opt), (fused, fopt)):
        for step in range(3):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            o.step(lambda: model[:3](x).square().mean().backward())
            o.zero_grad()
    assert len(steps) == 3 * 3  # every bucket once per step, the one with the unused weights included
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.grad is None


def test_steps_in_backward_resume_from_their_state_dict():
    cfg = OptimizerConfig.from_mapping({"name": "adamw", "fused_backward": True})
    straight = mlp()
    opt = build_optimizer({"unet": straight.parameters()}, cfg, "cpu")
    run(straight, opt, range(5))

    first = mlp()
    opt1 = build_optimizer({"unet": first.parameters()}, cfg, "cpu")
    run(first, opt1, range(3))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    assert len(saved_opt["state"]) == 4 and "exp_avg" in saved_opt["state"][0]
    opt1.remove_hooks()

    resumed = mlp()
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer({"unet": resumed.parameters()}, cfg, "cpu")
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, range(3, 5))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_settings_a_step_in_backward_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="fused_backward: prodigy"):
        OptimizerConfig.from_mapping({"name": "prodigy", "fused_backward": True})
    with pytest.raises(ConfigError, match="fused_backward: expected true or false"):
        OptimizerConfig.from_mapping({"fused_backward": "yes"})

    class Trainer:
        accumulate_grad_batches, gradient_clip_val, precision = 1, None, "bf16-mixed"
    check_trainer(Trainer(), "k")
    for field, value, message in (("accumulate_grad_batches", 2, "accumulate_grad_batches: 1"),
                                  ("gradient_clip_val", 1.0, "gradient_clip_val"),
                                  ("precision", "16-mixed", "bf16-mixed")):
        t = Trainer()
        setattr(t, field, value)
        with pytest.raises(ConfigError, match=message):
            check_trainer(t, "k")


def test_bf16_unet_settings_are_checked():
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    node = {"target": cfg.target, "params": {**cfg.params, "unet_precision": "bf16", "use_ema": True}}
    with pytest.raises(ValueError, match="unet_precision: an EMA of bf16"):
        instantiate_from_config(node)
    node["params"]["unet_precision"] = "fp16"
    with pytest.raises(ValueError, match="unet_precision: expected fp32 or bf16"):
        instantiate_from_config(node)


def test_compile_updates_rebuckets_by_bytes_and_the_steps_keep_their_state(monkeypatch):
    """compile_updates grows the buckets to PACK_BYTES per tensor (bf16 weights count half the
    bytes of fp32 ones), keeping moments and step counts: three steps in 4-element buckets
    and two in the larger ones are five of plain AdamW. Rebucketing only builds buckets; no
    update runs compiled here (the compiled update has its own test below)."""
    from ldm.optim import low_memory

    monkeypatch.setattr(low_memory, "CHUNK", 60)  # eager buckets: 96 | 16 | 48 3 (mlp's weights)
    cfg = OptimizerConfig.from_mapping({"name": "adamw_bf16", "fused_backward": True})
    plain, fused = mlp(), mlp()
    opt = build_optimizer({"unet": plain.parameters()}, OptimizerConfig.from_mapping({"name": "adamw"}), "cpu")
    fopt = build_optimizer({"unet": fused.parameters()}, cfg, "cpu")
    assert [len(bucket) for _, bucket, _ in fopt._buckets] == [1, 1, 2]
    run(plain, opt, range(5))
    run(fused, fopt, range(3))
    monkeypatch.setattr(low_memory, "PACK_BYTES", 4 * 120)  # 120 fp32 elements: 96 16 | 48 3
    fopt.rebucket(low_memory.PACK_BYTES, low_memory._nbytes)
    assert [len(bucket) for _, bucket, _ in fopt._buckets] == [2, 2]
    assert all(s["step"] == 3 for s in fopt.state.values()) and len(fopt.state) == 4
    assert all(inner.state[p] is fopt.state[p] for p, inner in fopt.inner.items())
    run(fused, fopt, range(3, 5))
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert low_memory.compile_updates(fopt) == 2 and all(inner.compiled for _, _, inner in fopt._buckets)
    half = [p.detach().to(torch.bfloat16) for p in fused.parameters()]  # 192 32 96 6 bytes
    assert [len(pack) for pack in low_memory._packs(half, 200, low_memory._nbytes)] == [1, 3]  # 192 | 32 96 6
    fopt.remove_hooks()


@pytest.mark.parametrize("compile", [False, True])
def test_compile_switch_compiles_the_adamw_bf16_update(compile):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(ROOT / "tests/configs/tiny.yaml").model
    optimizer = {"name": "adamw_bf16", "fused_backward": True}
    node = {"target": cfg.target,
            "params": {**cfg.params, "use_ema": False, "compile": compile, "optimizer": optimizer}}
    model = instantiate_from_config(node)
    model.learning_rate = 1e-4
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, StepInBackward) and all(inner.compiled == compile for inner in opt.inner.values())
    opt.remove_hooks()


@pytest.mark.slow  # a main.py run of the tiny model, ~10 s
@pytest.mark.parametrize("optimizer", ["adamw_bf16", "adamw8bit_bf16"])
def test_main_trains_a_bf16_unet_with_steps_in_backward_and_resumes(tmp_path, optimizer):
    from ldm.train import main
    from scripts.make_shapes import make_shapes

    make_shapes(tmp_path / "shapes", count=6, size=64, seed=0)
    base = ["--base", str(ROOT / "tests/configs/tiny.yaml"), str(ROOT / "tests/configs/tiny_run.yaml")]
    opts = ["model.params.unet_precision=bf16", f"model.params.optimizer.name={optimizer}",
            "model.params.optimizer.fused_backward=true", "lightning.trainer.precision=bf16-mixed",
            "lightning.callbacks.image_logger.params.disabled=true", "lightning.trainer.max_epochs=1"]
    assert main([*base, "-t", "--data_root", str(tmp_path / "shapes"), "-l", str(tmp_path / "logs"), *opts]) == 0
    (run,) = list((tmp_path / "logs").iterdir())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    unet = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.diffusion_model.")}
    assert unet and all(v.dtype == torch.bfloat16 for v in unet.values())
    frozen = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("first_stage_model.", "cond_stage_model."))}
    assert frozen and all(v.dtype == torch.bfloat16 for v in frozen.values() if v.is_floating_point())
    (state,) = ckpt["optimizer_states"]
    assert len(state["state"]) == len(unet) and all(s["step"] > 0 for s in state["state"].values())
    if optimizer == "adamw8bit_bf16":  # the larger weights' moments in 8 bits, the others' in bf16
        codes = {s["exp_avg"].dtype for s in state["state"].values()}
        assert codes == {torch.uint8, torch.bfloat16}
    assert main([*base, "-t", "-r", str(run / "checkpoints" / "last.ckpt"), *opts[:-1],
                 "lightning.trainer.max_epochs=2"]) == 0


@pytest.mark.slow  # inductor builds two kernels on the CPU, ~15 s
def test_compiled_adamw_bf16_update_is_adamw_without_recompiling_per_step_or_shape(monkeypatch):
    """compile_updates (model.params.compile with adamw_bf16): fp32 weights follow torch's
    AdamW through a schedule's changing lr and four parameter shapes (the largest updated on
    its own, the others as a pack), bf16 weights the eager adamw_bf16 given the same gradients
    (to the stochastic rounding), on one compiled graph per dtype, also where torch.compile
    specialises Python floats (as torch 2.11 does)."""
    from ldm.optim import low_memory

    monkeypatch.setattr(low_memory, "PACK_BYTES", 200)  # 50 fp32 or 100 bf16 elements: weights of 128
    # (alone), 8 + 32 + 4 (a pack)
    with torch._dynamo.config.patch(specialize_float=True):
        _check_compiled_adamw_bf16_update(low_memory)


def _check_compiled_adamw_bf16_update(low_memory):
    torch._dynamo.reset()
    low_memory._compiled_update.cache_clear()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    fp32 = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt32 = AdamWBF16(fp32.parameters(), lr=1e-2, weight_decay=0.1)
    bf16_eager = [p.detach().to(torch.bfloat16).requires_grad_() for p in ref.parameters()]
    bf16_compiled = [p.detach().clone().requires_grad_() for p in bf16_eager]
    start = [p.detach().clone() for p in bf16_eager]
    opt_eager = AdamWBF16(bf16_eager, lr=1e-2, weight_decay=0.1)
    opt16 = AdamWBF16(bf16_compiled, lr=1e-2, weight_decay=0.1)
    assert [low_memory.compile_updates(opt) for opt in (opt32, opt16)] == [1, 1]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(4):
        for opt in (opt_ref, opt32, opt_eager, opt16):
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)  # a schedule
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ref, opt_ref), (fp32, opt32)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(bf16_eager, bf16_compiled):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            b.grad = a.grad.clone()
        for opt in (opt_eager, opt16):
            opt.step()
            opt.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2  # fp32 and bf16, nothing more
    for p32, pref in zip(fp32.parameters(), ref.parameters()):
        torch.testing.assert_close(p32, pref, rtol=1e-5, atol=1e-6)
    for a, b, a0 in zip(bf16_eager, bf16_compiled, start):
        assert not torch.equal(b, a0) and b.dtype == torch.bfloat16
        for x, y in ((a, b), (opt_eager.state[a]["exp_avg"], opt16.state[b]["exp_avg"])):
            assert ((x.float() - y.float()).abs() <= 4 * 2**-8 * y.float().abs().max()).all()  # a few bf16 steps
    version = bf16_compiled[0]._version  # what a checkpoint's host copy is keyed by
    bf16_compiled[0].grad = torch.ones_like(bf16_compiled[0])
    opt16.step()
    assert bf16_compiled[0]._version > version
