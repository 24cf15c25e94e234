"""The SD UNet: released-checkpoint layout, the math of its parts, and training behaviour.

SD-size models are only built on the meta device (no memory, no init cost); forward
and backward passes use the tiny config in tests/configs/tiny.yaml.
"""
import math
import os

import pytest
import torch
import torch.utils.checkpoint
from omegaconf import OmegaConf

from ldm.modules.attention import CrossAttention, FeedForward
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD1 = os.path.join(ROOT, "configs/stable-diffusion/v1-inference.yaml")
SD2 = os.path.join(ROOT, "configs/stable-diffusion/v2-inference.yaml")
TINY = os.path.join(ROOT, "tests/configs/tiny.yaml")


def unet_params(path, **overrides):
    params = OmegaConf.to_container(OmegaConf.load(path).model.params.unet_config.params)
    params.update(overrides)
    return params


def meta_state_shapes(path, **overrides):
    with torch.device("meta"):
        unet = UNetModel(**unet_params(path, **overrides))
    return unet, {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("path, n_params", [(SD1, 859_520_964), (SD2, 865_910_724)])
def test_released_parameter_and_tensor_counts(path, n_params):
    unet, shapes = meta_state_shapes(path)
    assert sum(p.numel() for p in unet.parameters()) == n_params
    assert len(shapes) == 686


# Exact names and shapes of tensors in the released checkpoints (under model.diffusion_model.).
COMMON = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.0.weight": (320,),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
    "middle_block.1.transformer_blocks.0.attn2.to_q.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "middle_block.2.emb_layers.1.weight": (1280, 1280),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.0.in_layers.2.weight": (320, 640, 3, 3),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
}
SD1_ONLY = {
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
}
SD2_ONLY = {
    "input_blocks.1.1.proj_in.weight": (320, 320),
    "input_blocks.1.1.proj_out.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "middle_block.1.proj_in.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 1024),
}
ABSENT = [  # no bias on q/k/v; no skip conv where a ResBlock keeps its width
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.bias",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v.bias",
    "input_blocks.1.0.skip_connection.weight",
    "middle_block.0.skip_connection.weight",
]


@pytest.mark.parametrize("path, specific", [(SD1, SD1_ONLY), (SD2, SD2_ONLY)])
def test_released_key_names_and_shapes(path, specific):
    unet, shapes = meta_state_shapes(path)
    for key, shape in {**COMMON, **specific}.items():
        assert shapes.get(key) == shape, key
    for key in ABSENT:
        assert key not in shapes
    # Head split: SD1 has 8 heads everywhere, SD2 64-wide heads.
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    assert attn.heads == (8 if path == SD1 else 1280 // 64)


def test_released_yaml_extras_and_instantiate_from_config():
    # The released SD 2 YAML also carries image_size and use_fp16; both are accepted.
    node = OmegaConf.load(SD2).model.params.unet_config
    node.params.image_size = 32
    node.params.use_fp16 = True
    with torch.device("meta"):
        unet = instantiate_from_config(node, path="model.params.unet_config")
    assert isinstance(unet, UNetModel)


@pytest.mark.parametrize("overrides, key", [
    ({"dims": 3}, "dims"),
    ({"use_spatial_transformer": False}, "use_spatial_transformer"),
    ({"num_heads": 3}, "num_heads"),
    ({"model_channels": 48}, "model_channels"),
])
def test_bad_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        with torch.device("meta"):
            UNetModel(**unet_params(TINY, **overrides))


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 6)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 1, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert emb[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(timestep_embedding(t.float(), 6), emb)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_cross_attention_matches_softmax_reference(context_dim):
    torch.manual_seed(0)
    heads, d = 2, 8
    attn = CrossAttention(16, context_dim=context_dim, heads=heads, dim_head=d)
    x = torch.randn(2, 5, 16)
    context = x if context_dim is None else torch.randn(2, 7, context_dim)
    q, k, v = x @ attn.to_q.weight.T, context @ attn.to_k.weight.T, context @ attn.to_v.weight.T
    outs = []
    for i in range(heads):  # head i owns columns [i*d, (i+1)*d) of the projections
        cols = slice(i * d, (i + 1) * d)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(weights @ v[..., cols])
    reference = torch.cat(outs, dim=-1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    got = attn(x) if context_dim is None else attn(x, context)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_geglu_gates_with_the_second_half():
    torch.manual_seed(0)
    ff = FeedForward(8)
    x = torch.randn(3, 8, requires_grad=True)
    value, gate = ff.net[0].proj(x).split(32, dim=-1)
    reference = ff.net[2](value * torch.nn.functional.gelu(gate))
    g = torch.randn(3, 8)
    expected = torch.autograd.grad(reference, [x, *ff.parameters()], g)
    got = ff(x)
    torch.testing.assert_close(got, reference)
    for a, b in zip(torch.autograd.grad(got, [x, *ff.parameters()], g), expected):
        torch.testing.assert_close(a, b)


def test_geglu_runs_an_adapted_projection_whole():
    """An adapter patches proj.forward; GEGLU must go through it, not around it."""
    torch.manual_seed(0)
    ff = FeedForward(8)
    x = torch.randn(3, 8)
    plain = ff(x)
    base = ff.net[0].proj.forward
    ff.net[0].proj.forward = lambda t: base(t) + 1.0  # as ldm.modules.adapters does
    value, gate = (base(x) + 1.0).split(32, dim=-1)
    adapted = ff(x)
    torch.testing.assert_close(adapted, ff.net[2](value * torch.nn.functional.gelu(gate)))
    assert not torch.allclose(adapted, plain)


def tiny_unet(seed=0, **overrides):
    """The tiny UNet with its zero-initialised layers randomised, so every parameter gets gradient."""
    torch.manual_seed(seed)
    unet = UNetModel(**unet_params(TINY, **overrides))
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return unet


def forward_backward(unet, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, h, w, generator=g)
    t = torch.tensor([3, 917])
    context = torch.randn(2, 5, 64, generator=g)
    out = unet(x, t, context=context)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return x, out


def test_fresh_unet_predicts_zero():
    unet = UNetModel(**unet_params(TINY))  # out.2 starts at zero, as in SD
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 64))
    assert out.shape == (1, 4, 8, 8) and not out.any()


@pytest.mark.parametrize("h, w, overrides", [
    (8, 8, {}),
    (8, 14, {}),
    # Four levels like SD (three downsamplings) on a non-square bucket: 16x40 -> 8x20 -> 4x10 -> 2x5.
    (16, 40, {"channel_mult": [1, 1, 2, 2], "attention_resolutions": [2, 8]}),
])
def test_tiny_forward_backward_reaches_every_parameter(h, w, overrides):
    unet = tiny_unet(**overrides)
    x, out = forward_backward(unet, h, w)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    for name, p in unet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_latent_size_not_divisible_by_the_downsampling_is_rejected():
    unet = tiny_unet(channel_mult=[1, 1, 2, 2])
    with pytest.raises(ValueError, match="channel_mult"):
        unet(torch.randn(1, 4, 16, 20), torch.tensor([1]), torch.randn(1, 3, 64))


def test_use_checkpoint_matches_plain_forward_and_gradients(monkeypatch):
    plain = tiny_unet(dropout=0.1)
    ckpt = tiny_unet(dropout=0.1, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    torch.manual_seed(5)
    _, out_plain = forward_backward(plain, 8, 12)
    assert not calls
    torch.manual_seed(5)  # same dropout masks in both runs
    _, out_ckpt = forward_backward(ckpt, 8, 12)
    n_res = sum(type(m).__name__ == "ResBlock" for m in ckpt.modules())
    n_tf = sum(type(m).__name__ == "BasicTransformerBlock" for m in ckpt.modules())
    assert len(calls) == n_res + n_tf > 0

    torch.testing.assert_close(out_ckpt, out_plain)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    calls.clear()
    with torch.no_grad():  # inference never checkpoints
        ckpt(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 64))
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_group_norm_keeps_nhwc_and_equals_torchs(dtype):
    from ldm.modules.diffusionmodules.util import group_norm_channels_last

    torch.manual_seed(0)
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    x = (torch.randn(2, 64, 5, 7) * 3 + 1).to(dtype)
    g = torch.randn(2, 64, 5, 7).to(dtype)
    outs, grads = [], []
    for fn, inp in ((torch.nn.functional.group_norm, x.clone()),
                    (group_norm_channels_last, x.to(memory_format=torch.channels_last))):
        inp.requires_grad_()
        out = fn(inp.float(), 32, weight, bias, 1e-5).to(dtype)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [inp, weight, bias], g))
    assert outs[1].dtype == dtype and outs[1].is_contiguous(memory_format=torch.channels_last)
    assert not outs[1].is_contiguous()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, **tol)


def test_the_compiled_group_norm_of_an_nhwc_map_stays_nhwc():
    """torch.compile traces F.group_norm on a GPU through a decomposition that copies the input
    to NCHW (the meta device takes the same path); the UNet's norm must trace NHWC throughout,
    its gradient too. Eager, it is torch's own kernel."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from ldm.modules.diffusionmodules.util import normalization

    layouts = {}

    def capture(name):
        def compiler(graph, inputs):
            out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
            layouts[name] = [o.meta["val"].is_contiguous(memory_format=torch.channels_last)
                             and not o.meta["val"].is_contiguous() for o in out if o.meta["val"].dim() == 4]
            return make_boxed_func(graph.forward)
        return compiler

    norm = normalization(64).to("meta")
    x = torch.empty(2, 64, 5, 7, device="meta").to(memory_format=torch.channels_last).requires_grad_()
    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"),
                           decompositions=select_decomp_table())
    torch._dynamo.reset()
    out = torch.compile(norm, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    torch._dynamo.reset()
    assert layouts["forward"] and all(layouts["forward"]), layouts
    assert layouts["backward"] and all(layouts["backward"]), layouts


def test_resblock_equals_its_released_layers_run_in_order():
    """ResBlock calls each norm with its SiLU fused (GroupNorm32's `silu`); the result is that of
    in_layers and out_layers run as the released Sequentials (norm, SiLU, [dropout,] conv)."""
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    torch.manual_seed(0)
    block = ResBlock(64, 32, 0.0, 96).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, emb = torch.randn(2, 64, 6, 5), torch.randn(2, 32)
    h = block.in_layers(x) + block.emb_layers(emb)[:, :, None, None]
    want = block.skip_connection(x) + block.out_layers(h)
    torch.testing.assert_close(block(x, emb), want, rtol=0, atol=0)
