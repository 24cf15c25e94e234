"""cache_text_encoder_outputs: the frozen text encoder's output kept per caption."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.output_cache import TextEncoderOutputCache, text_encoder_output_cache
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]


def build(config="tests/configs/tiny.yaml", **overrides):
    cfg = OmegaConf.load(ROOT / config).model
    for k, v in overrides.items():
        cfg.params[k] = v
    return instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")


def test_a_batch_is_served_only_when_every_caption_is_kept():
    cache = TextEncoderOutputCache()
    context = torch.randn(2, 77, 8)
    assert cache.lookup(["a", "b"]) is None
    cache.store(["a", "b"], context)
    context.zero_()  # the kept rows are copies, not views of the step's tensor
    assert cache.lookup(["b", "c"]) is None
    got = cache.lookup(["b", "a", "b"])
    assert got.shape == (3, 77, 8) and got.abs().min() > 0
    assert torch.equal(got[0], got[2]) and not torch.equal(got[0], got[1])
    assert len(cache) == 2 and cache.bytes == 2 * 77 * 8 * 4


def test_rows_are_kept_in_autocasts_dtype_under_autocast():
    cache = TextEncoderOutputCache()
    context = torch.randn(1, 77, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.store(["a"], context)
    assert cache.lookup(["a"]).dtype == torch.bfloat16
    assert torch.equal(cache.lookup(["a"])[0], context[0].bfloat16())
    assert cache.bytes == 77 * 8 * 2


def test_the_stored_batch_comes_back_in_the_rows_dtype_even_past_the_size_limit():
    """The step that fills the cache gets the context later steps get from it: one dtype for
    the UNet (a shape recorded once with cuda_graphs, compiled once with compile)."""
    cache = TextEncoderOutputCache(max_bytes=77 * 8 * 2)
    context = torch.randn(2, 77, 8)  # fp32, as the encoder's last LayerNorm gives it under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cache.store(["a", "b"], context)
    assert got.dtype == torch.bfloat16 and torch.equal(got, context.bfloat16())
    assert cache.full and len(cache) == 1  # "b" did not fit, yet its row came back in bf16 too
    assert cache.store(["c"], context[:1]).dtype == torch.float32  # no autocast: as the encoder gave it


def test_captions_past_the_size_limit_are_not_kept():
    row = 77 * 8 * 4
    cache = TextEncoderOutputCache(max_bytes=2 * row)
    cache.store(["a", "b", "c"], torch.randn(3, 77, 8))
    assert cache.full and len(cache) == 2 and cache.bytes == 2 * row
    assert cache.lookup(["c"]) is None
    cache.store(["d"], torch.randn(1, 77, 8))
    assert len(cache) == 2


@pytest.mark.parametrize("setting, trains, kept", [(None, False, True), (None, True, False), (True, False, True),
                                                    (False, False, False), (False, True, False)])
def test_the_setting_keeps_a_cache_only_for_a_frozen_text_encoder(setting, trains, kept):
    assert (text_encoder_output_cache(setting, trains) is not None) == kept


def test_asking_for_the_cache_while_the_text_encoder_trains_is_refused_by_name():
    with pytest.raises(ValueError, match="cache_text_encoder_outputs.*text encoder trains"):
        build(cond_stage_trainable=True, cache_text_encoder_outputs=True)
    with pytest.raises(ValueError, match="cache_text_encoder_outputs: expected true, false or null"):
        build(cache_text_encoder_outputs="yes")
    assert build(cond_stage_trainable=True).text_cache is None
    assert build(cache_text_encoder_outputs=False).text_cache is None


def test_adapters_on_the_text_encoder_turn_the_cache_off():
    lora = {"algo": "lora", "dim": 4, "alpha": 2}
    assert build(network=lora).text_cache is None  # targets: unet and text_encoder
    assert build(network={**lora, "targets": ["unet"]}).text_cache is not None


def batch(n=2):
    torch.manual_seed(1)
    return {"image": torch.rand(n, 3, 32, 32) * 2 - 1,
            "caption": ["a red circle", "a blue square", "a green star"][:n]}


def test_a_cached_step_gives_the_uncached_loss_and_gradients_under_autocast(monkeypatch):
    """The second step takes its context from the cache (the encoder is not run, the batch not
    tokenized) and computes what the step without a cache computes, bit for bit."""
    torch.manual_seed(0)
    cached = build()
    plain = build(cache_text_encoder_outputs=False)
    plain.load_state_dict(cached.state_dict())
    results, dtypes = [], []
    apply_model = cached.apply_model  # the UNet's context: one dtype whether encoded in the step or kept
    monkeypatch.setattr(cached, "apply_model", lambda x, t, c: dtypes.append(c.dtype) or apply_model(x, t, c))
    for model in (plain, cached, cached):
        loader_batch = batch()
        model.on_fit_start()  # the noise stream, seeded alike for each step
        moved = model.on_before_batch_transfer(loader_batch, 0)
        if model is cached and len(cached.text_cache):  # the second cached step: nothing to encode
            assert "tokens" not in moved
            monkeypatch.setattr(cached.cond_stage_model, "encode_tokens", lambda tokens: pytest.fail("encoded"))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.shared_step(moved)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.model.parameters()]))
    assert len(cached.text_cache) == 2 and dtypes == [torch.bfloat16, torch.bfloat16]
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))


def test_validation_encodes_its_captions_and_keeps_nothing():
    model = build()
    model.eval()
    moved = model.on_before_batch_transfer(batch(3), 0)
    assert "tokens" in moved
    with torch.no_grad():
        model.batch_conditioning(moved)
    assert len(model.text_cache) == 0
