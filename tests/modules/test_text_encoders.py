"""SD 1.x / SD 2.x text encoders: released state-dict layout, layer selection, position ids."""
import copy
import json
import os

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CLIP = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
CAPTIONS = ["a photo of an astronaut riding a horse", "a red cube on a table"]

SD1_LAYER_KEYS = [
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias", "layer_norm2.weight", "layer_norm2.bias",
]
SD1_KEYS = (
    ["transformer.text_model.embeddings.position_ids",
     "transformer.text_model.embeddings.token_embedding.weight",
     "transformer.text_model.embeddings.position_embedding.weight"]
    + [f"transformer.text_model.encoder.layers.{i}.{k}" for i in range(12) for k in SD1_LAYER_KEYS]
    + ["transformer.text_model.final_layer_norm.weight", "transformer.text_model.final_layer_norm.bias"]
)
SD2_BLOCK_KEYS = [
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
    "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
]
SD2_KEYS = (
    ["model.positional_embedding", "model.text_projection", "model.logit_scale", "model.token_embedding.weight"]
    + [f"model.transformer.resblocks.{i}.{k}" for i in range(24) for k in SD2_BLOCK_KEYS]
    + ["model.ln_final.weight", "model.ln_final.bias"]
)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def tiny_clip(**kwargs):
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(**TINY_CLIP, **kwargs)


@pytest.fixture(scope="module")
def tiny_open_clip_arch(tmp_path_factory):
    """A 3-block open_clip text tower registered under a test-only name."""
    path = tmp_path_factory.mktemp("open_clip_cfg") / "TinyText-test.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }))
    open_clip.add_model_config(path)
    return "TinyText-test"


# --- SD 1.x -------------------------------------------------------------------------------------

def test_sd1_state_dict_matches_released_layout():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
    sd = encoder.state_dict()
    assert list(sd) == SD1_KEYS and len(sd) == 197
    assert n_params(encoder) == 123_060_480
    position_ids = sd["transformer.text_model.embeddings.position_ids"]
    assert position_ids.shape == (1, 77) and position_ids.dtype == torch.int64
    assert sd["transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["transformer.text_model.encoder.layers.0.mlp.fc1.weight"].shape == (3072, 768)
    config = encoder.transformer.text_model.config
    assert (config.hidden_act, config.layer_norm_eps, config.max_position_embeddings) == ("quick_gelu", 1e-5, 77)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 49406, 49407)


def test_sd1_encodes_captions_frozen():
    encoder = tiny_clip()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    c = encoder(CAPTIONS)
    assert c.shape == (2, 77, 64) and c.dtype == torch.float32
    assert not torch.allclose(c[0], c[1])
    assert torch.equal(encoder.encode(CAPTIONS), c)
    assert torch.equal(encoder.encode_tokens(encoder.tokenize(CAPTIONS)), c)
    # clip_skip=1 is the model's own last_hidden_state (final norm applied)
    out = encoder.transformer.text_model(input_ids=encoder.tokenize(CAPTIONS))
    torch.testing.assert_close(c, out.last_hidden_state)


def test_sd1_clip_skip_takes_earlier_layer_through_final_norm():
    encoder = tiny_clip(clip_skip=2)
    tokens = encoder.tokenize(CAPTIONS)
    text_model = encoder.transformer.text_model
    hidden = text_model(input_ids=tokens, output_hidden_states=True).hidden_states
    expected = text_model.final_layer_norm(hidden[-2])
    torch.testing.assert_close(encoder.encode_tokens(tokens), expected)
    assert not torch.allclose(expected, text_model.final_layer_norm(hidden[-1]))

    penultimate = FrozenCLIPEmbedder(**TINY_CLIP, layer="penultimate")
    penultimate.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(penultimate.encode_tokens(tokens), expected)


def test_sd1_position_ids_values_are_never_used():
    encoder = tiny_clip()
    reference = encoder(CAPTIONS)
    encoder.transformer.text_model.embeddings.position_ids.fill_(3)
    torch.testing.assert_close(encoder(CAPTIONS), reference)

    # checkpoints with damaged or missing position_ids load strictly and are repaired
    sd = encoder.state_dict()
    sd["transformer.text_model.embeddings.position_ids"] = torch.full((1, 77), 76.9, dtype=torch.float32)
    for state in (sd, {k: v for k, v in sd.items() if not k.endswith("position_ids")}):
        other = FrozenCLIPEmbedder(**TINY_CLIP)
        other.load_state_dict(state, strict=True)
        ids = other.transformer.text_model.embeddings.position_ids
        assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
        torch.testing.assert_close(other(CAPTIONS), reference)


def test_sd1_meta_build_then_assign_load():
    source = tiny_clip()
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(**TINY_CLIP)
    encoder.load_state_dict(source.state_dict(), assign=True)
    torch.testing.assert_close(encoder(CAPTIONS), source(CAPTIONS))


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer="middle"), "layer"),
    (dict(clip_skip=0), "clip_skip"),
    (dict(clip_skip=3), "clip_skip"),
    (dict(layer="penultimate", clip_skip=2), "penultimate"),
    (dict(max_length=78), "max_length"),
    (dict(max_length=100), "max_length"),
    (dict(num_heads=3), "num_heads"),
])
def test_sd1_bad_arguments_are_named(kwargs, match):
    args = {**TINY_CLIP, **kwargs}
    with pytest.raises(ValueError, match=match):
        FrozenCLIPEmbedder(**args)


# --- SD 2.x -------------------------------------------------------------------------------------

def test_sd2_state_dict_matches_released_layout():
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder()
    sd = encoder.state_dict()
    assert sorted(sd) == sorted(SD2_KEYS) and len(sd) == 294
    assert n_params(encoder) == 354_032_641
    assert sd["model.positional_embedding"].shape == (77, 1024)
    assert sd["model.text_projection"].shape == (1024, 1024)
    assert sd["model.logit_scale"].shape == ()
    assert sd["model.token_embedding.weight"].shape == (49408, 1024)
    assert sd["model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert sd["model.transformer.resblocks.23.mlp.c_fc.weight"].shape == (4096, 1024)
    assert not hasattr(encoder.model, "visual")
    assert list(encoder.buffers()) == []  # nothing left uninitialised by a meta build
    assert encoder.layer_idx == 1


def tiny_open_clip(arch, **kwargs):
    torch.manual_seed(0)
    return FrozenOpenCLIPEmbedder(arch=arch, **kwargs)


def open_clip_reference(encoder, tokens, drop_last_blocks):
    """open_clip's own TextTransformer forward, with the last blocks removed."""
    ref = copy.deepcopy(encoder.model)
    ref.attn_mask = ref.build_causal_mask()
    ref.output_tokens = True
    ref.transformer.resblocks = ref.transformer.resblocks[:len(ref.transformer.resblocks) - drop_last_blocks]
    return ref(tokens)[1]


@pytest.mark.parametrize("layer,dropped", [("last", 0), ("penultimate", 1)])
def test_sd2_layer_selection_matches_open_clip(tiny_open_clip_arch, layer, dropped):
    encoder = tiny_open_clip(tiny_open_clip_arch, layer=layer)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    tokens = encoder.tokenize(CAPTIONS)
    c = encoder(CAPTIONS)
    assert c.shape == (2, 77, 32)
    torch.testing.assert_close(c, open_clip_reference(encoder, tokens, dropped))
    other = open_clip_reference(encoder, tokens, 1 - dropped)
    assert not torch.allclose(c, other)


def test_sd2_attention_is_causal(tiny_open_clip_arch):
    encoder = tiny_open_clip(tiny_open_clip_arch)
    tokens = encoder.tokenize(CAPTIONS[:1])
    changed = tokens.clone()
    changed[0, 5] = 1000
    a, b = encoder.encode_tokens(tokens), encoder.encode_tokens(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_sd2_meta_build_then_assign_load(tiny_open_clip_arch):
    source = tiny_open_clip(tiny_open_clip_arch)
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder(arch=tiny_open_clip_arch)
    encoder.load_state_dict(source.state_dict(), assign=True)
    torch.testing.assert_close(encoder(CAPTIONS), source(CAPTIONS))


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="ViT-Nope-99"), "arch"),
    (dict(layer="pooled"), "layer"),
    (dict(max_length=1), "max_length"),
    (dict(max_length=160), "max_length"),
])
def test_sd2_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        FrozenOpenCLIPEmbedder(**kwargs)


# --- long prompts: 75-token chunks, each encoded on its own, concatenated along the sequence -------

LONG_CAPTIONS = [" ".join(["a photo of an astronaut riding a horse"] * 12), "a red cube"]  # 96 and 3 tokens


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_long_prompt_is_each_chunk_encoded_alone(clip_skip):
    encoder = tiny_clip(max_length=225, clip_skip=clip_skip)
    assert (encoder.max_token_length, encoder.context_length) == (225, 231)
    tokens = encoder.tokenize(LONG_CAPTIONS)
    c = encoder(LONG_CAPTIONS)
    assert tokens.shape == (2, 231) and c.shape == (2, 231, 64)
    text_model = encoder.transformer.text_model
    for k in range(3):  # AUTOMATIC1111: hidden state clip_skip layers from the end, then the final norm
        chunk = tokens[:, 77 * k:77 * (k + 1)]
        hidden = text_model(input_ids=chunk, output_hidden_states=True).hidden_states
        torch.testing.assert_close(c[:, 77 * k:77 * (k + 1)], text_model.final_layer_norm(hidden[-clip_skip]))
    # a caption that fits one chunk: its first chunk is what the 77-token encoder gives
    short = FrozenCLIPEmbedder(**TINY_CLIP, clip_skip=clip_skip)
    short.load_state_dict(encoder.state_dict())
    assert short.max_token_length is None and short.context_length == 77
    torch.testing.assert_close(c[1:, :77], short(LONG_CAPTIONS[1:]))
    assert not torch.allclose(c[0, :77], c[0, 77:154])


@pytest.mark.parametrize("layer,dropped", [("last", 0), ("penultimate", 1)])
def test_sd2_long_prompt_is_each_chunk_encoded_alone(tiny_open_clip_arch, layer, dropped):
    encoder = tiny_open_clip(tiny_open_clip_arch, layer=layer, max_length=150)
    tokens = encoder.tokenize(LONG_CAPTIONS)
    c = encoder(LONG_CAPTIONS)
    assert tokens.shape == (2, 154) and c.shape == (2, 154, 32) and encoder.max_token_length == 150
    for k in range(2):
        chunk = tokens[:, 77 * k:77 * (k + 1)]
        torch.testing.assert_close(c[:, 77 * k:77 * (k + 1)], open_clip_reference(encoder, chunk, dropped))


def test_long_prompt_trains_the_text_encoder():
    """Full fine-tuning and text-encoder adapters: gradients reach the weights through every chunk."""
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder(**TINY_CLIP, max_length=150, freeze=False)
    encoder(LONG_CAPTIONS)[:, 77:].sum().backward()  # the second chunk only
    grad = encoder.transformer.text_model.embeddings.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="chunks of 77"):
        encoder.encode_tokens(torch.zeros(1, 100, dtype=torch.long))


# --- built from the shipped configs -------------------------------------------------------------

@pytest.mark.parametrize("config,cls,norm_key,width", [
    ("configs/stable-diffusion/v1-inference.yaml", FrozenCLIPEmbedder,
     "transformer.text_model.final_layer_norm.weight", 768),
    ("configs/stable-diffusion/v2-inference.yaml", FrozenOpenCLIPEmbedder, "model.ln_final.weight", 1024),
    ("tests/configs/tiny.yaml", FrozenCLIPEmbedder, "transformer.text_model.final_layer_norm.weight", 64),
])
def test_built_from_yaml(config, cls, norm_key, width):
    node = OmegaConf.load(os.path.join(ROOT, config)).model.params.cond_stage_config
    with torch.device("meta"):
        encoder = instantiate_from_config(node, path="model.params.cond_stage_config")
    assert type(encoder) is cls
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.state_dict()[norm_key].shape == (width,)
    if cls is FrozenOpenCLIPEmbedder:
        assert encoder.layer_idx == 1  # SD 2.x: penultimate
    else:
        assert encoder.clip_skip == 1
