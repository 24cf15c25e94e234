"""The full model: released-checkpoint key layout for SD 1.x / 2.x, and a tiny model that learns."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
KEYS = Path(__file__).parent / "keys"
CONFIGS = {
    "sd1": ROOT / "configs/stable-diffusion/v1-inference.yaml",
    "sd2": ROOT / "configs/stable-diffusion/v2-inference.yaml",
    "sd2v": ROOT / "configs/stable-diffusion/v2-inference-v.yaml",
}


def build(config_path, **overrides):
    cfg = OmegaConf.load(config_path).model
    for k, v in overrides.items():
        cfg.params[k] = v
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def key_shapes(model):
    return [f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: build(path) for name, path in CONFIGS.items()}


@pytest.mark.parametrize("name, n_keys", [("sd1", 1143), ("sd2", 1240), ("sd2v", 1240)])
def test_state_dict_matches_the_pinned_released_layout(meta_models, name, n_keys):
    """tests/models/keys/<name>.txt was generated from our model once and checked by hand against
    the published SD layout; any renamed, added or reshaped tensor fails here."""
    got = key_shapes(meta_models[name])
    assert len(got) == n_keys
    pinned = (KEYS / f"{name}.txt").read_text().splitlines()
    assert got == pinned


def groups(model):
    counts = {}
    for k in model.state_dict():
        g = k.split(".")[0] if k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") else "schedule"
        counts[g] = counts.get(g, 0) + 1
    return counts


def test_group_sizes_and_parameter_counts(meta_models):
    sd1, sd2 = meta_models["sd1"], meta_models["sd2v"]
    assert groups(sd1) == {"model": 686, "first_stage_model": 248, "cond_stage_model": 197, "schedule": 12}
    assert groups(sd2) == {"model": 686, "first_stage_model": 248, "cond_stage_model": 294, "schedule": 12}
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(sd1.model) == 859_520_964 and n(sd2.model) == 865_910_724
    assert n(sd1.first_stage_model) == n(sd2.first_stage_model) == 83_653_863
    assert n(sd1.cond_stage_model) == 123_060_480
    assert sd1.cond_stage_model.state_dict()["transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    assert sd2.parameterization == "v" and meta_models["sd2"].parameterization == "eps"


def test_only_the_unet_trains_by_default(meta_models):
    m = meta_models["sd1"]
    assert all(p.requires_grad for p in m.model.parameters())
    assert not any(p.requires_grad for p in m.first_stage_model.parameters())
    assert not any(p.requires_grad for p in m.cond_stage_model.parameters())
    m.train()
    assert m.model.training and not m.first_stage_model.training and not m.cond_stage_model.training


def test_ema_keys_follow_the_released_names():
    with torch.device("meta"):
        m = build(CONFIGS["sd1"], use_ema=True)
    ema = [k for k in m.state_dict() if k.startswith("model_ema.")]
    assert len(ema) == 686 + 2
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    assert "model_ema.diffusion_modelmiddle_block1transformer_blocks0attn2to_kweight" in ema
    assert {"model_ema.decay", "model_ema.num_updates"} <= set(ema)


def tiny_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "caption": ["a red circle", "a blue square"][:n]}


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_tiny_model_loss_decreases_on_a_fixed_batch(parameterization):
    torch.manual_seed(0)
    model = build(ROOT / "tests/configs/tiny.yaml", parameterization=parameterization, use_ema=True)
    model.learning_rate = 1e-3
    opt = model.configure_optimizers()["optimizer"]
    batch = tiny_batch()
    z0 = model.encode_first_stage(batch["image"])
    context = model.get_learned_conditioning(batch["caption"])
    t = torch.tensor([100, 700])
    noise = torch.randn_like(z0)
    losses = []
    for _ in range(20):
        loss = model.p_losses(z0, context, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.model_ema(model.model)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.model_ema.num_updates.item() == 20


def test_training_step_gives_gradients_to_unet_only():
    torch.manual_seed(0)
    model = build(ROOT / "tests/configs/tiny.yaml")
    loss = model.shared_step(tiny_batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.model.parameters())
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    assert all(p.grad is None for p in model.cond_stage_model.parameters())


def test_captions_are_tokenized_before_the_transfer_and_the_step_uses_the_tokens(monkeypatch):
    """Tokenizing in the step copies ids from pageable host memory, which waits for the GPU's
    queue every step; the ids are made in on_before_batch_transfer instead."""
    torch.manual_seed(0)
    model = build(ROOT / "tests/configs/tiny.yaml")
    batch = {**tiny_batch(), "path": ["a.png", "b.png"]}
    moved = model.on_before_batch_transfer(batch, 0)
    assert torch.equal(moved["tokens"], model.cond_stage_model.tokenize(batch["caption"]))
    assert "tokens" not in batch and moved["caption"] == batch["caption"]  # the loader's batch is not changed
    model.on_fit_start()
    state = model.noise_rng.get_state()
    from_captions = model.shared_step(batch)
    model.noise_rng.set_state(state)
    calls = []
    monkeypatch.setattr(model.cond_stage_model, "tokenize", lambda texts: calls.append(texts))
    assert torch.equal(model.shared_step(moved), from_captions)
    assert torch.equal(model.fixed_noise_loss(moved), model.fixed_noise_loss(moved))
    assert calls == []  # neither the training nor the validation loss tokenized


def test_text_encoder_trains_when_asked():
    model = build(ROOT / "tests/configs/tiny.yaml", cond_stage_trainable=True)
    opt = model.configure_optimizers()["optimizer"]
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in model.cond_stage_model.parameters())
    assert not any(id(p) in trained for p in model.first_stage_model.parameters())


def test_bad_parameterization_is_named():
    with pytest.raises(ValueError, match="parameterization"):
        build(ROOT / "tests/configs/tiny.yaml", parameterization="x0")


def test_optimizer_section_is_checked_and_lr_comes_from_base_learning_rate():
    with pytest.raises(ValueError, match=r"model\.params\.optimizer\.lr"):
        build(ROOT / "tests/configs/tiny.yaml", optimizer={"lr": 1e-3})
    with pytest.raises(ValueError, match=r"model\.params\.optimizer"):
        build(ROOT / "tests/configs/tiny.yaml", optimizer={"nmae": "adamw"})
    model = build(ROOT / "tests/configs/tiny.yaml", cond_stage_trainable=True,
                  optimizer={"text_encoder_lr": 5e-7, "scheduler": "cosine", "warmup": 0.1})
    model.learning_rate = 2e-6
    out = model.configure_optimizers()
    assert [g["initial_lr"] for g in out["optimizer"].param_groups] == [2e-6, 5e-7]
    assert out["lr_scheduler"]["interval"] == "step"


def test_reset_ema_starts_from_current_weights():
    model = build(ROOT / "tests/configs/tiny.yaml", use_ema=True)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    model.reset_ema()
    for name, p in model.model.named_parameters():
        assert torch.equal(getattr(model.model_ema, name.replace(".", "")), p)


@pytest.mark.parametrize("limits, expected", [
    ({"max_epochs": 3}, 3 * 5),                                             # 5 batches an epoch
    ({"max_epochs": 3, "accumulate_grad_batches": 2}, 3 * 3),               # ceil(5 / 2)
    ({"max_epochs": 3, "max_steps": 7}, 7),
    ({"max_epochs": 2, "limit_train_batches": 2}, 2 * 2),
    ({"max_epochs": 2, "limit_train_batches": 0.5}, 2 * 2),                 # int(5 * 0.5)
    ({"max_epochs": -1, "max_steps": 9}, None),                             # no epoch limit: the trainer's count
])
def test_the_schedule_length_is_counted_from_the_plan_as_lightning_counts_it(limits, expected):
    """Without iterating the loader (trainer.estimated_stepping_batches would start its workers
    before the latent cache has filled the datasets): Lightning's formula on the plan's batches."""
    from types import SimpleNamespace

    from ldm.optim.optimizers import planned_steps

    train = SimpleNamespace(batch_sampler=lambda world_size, rank: range(5))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(datasets=lambda: {"train": train}), world_size=1,
                              global_rank=0, limit_train_batches=1.0, accumulate_grad_batches=1, max_steps=-1)
    for key, value in limits.items():
        setattr(trainer, key, value)
    assert planned_steps(trainer) == expected


def test_training_keeps_the_objects_of_its_set_up_out_of_garbage_collections():
    """A full collection mid-step walks every live object (model, tokenizer vocabulary, loader);
    those made before training are frozen out of them for the run, and released at its end."""
    import gc
    from types import SimpleNamespace

    model = build(ROOT / "tests/configs/tiny.yaml")
    model._trainer = SimpleNamespace(optimizers=[])
    gc.unfreeze()
    try:
        run_objects = [[] for _ in range(5000)]  # a run's objects in reference cycles
        for a in run_objects:
            a.append(a)
        model.on_train_start()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the modules, parameters and other containers of the process
        del run_objects, a  # the run failed (no on_train_end) and its objects are dropped
        model.on_train_start()  # the next run in this process releases and collects them
        assert gc.get_freeze_count() < frozen - 4000
        model.on_train_end()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
