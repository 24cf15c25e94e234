"""SpatialTransformer: SD 1.x's 1x1 proj_in/proj_out run as products on contiguous tokens,
with the convolutions' results and gradients, and the feature map's memory format kept."""
import pytest
import torch
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer


def transformer(use_linear, seed=0):
    torch.manual_seed(seed)
    m = SpatialTransformer(64, 2, 32, 16, use_linear=use_linear)
    torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    return m


def as_convolutions(m, x, context):
    """The CompVis computation: proj_in and proj_out as 1x1 convolutions of the feature map."""
    b, c, h, w = x.shape
    tokens = m.proj_in(m.norm(x)).flatten(2).transpose(1, 2)
    for block in m.transformer_blocks:
        tokens = block(tokens, context)
    return m.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w)) + x


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 64, 6, 10, generator=g), torch.randn(2, 5, 16, generator=g)


def test_sd1_projections_equal_the_convolutions_with_gradients():
    x, context = inputs()
    results = []
    for fn in (lambda m, x: m(x, context), lambda m, x: as_convolutions(m, x, context)):
        m = transformer(use_linear=False)
        xi = x.clone().requires_grad_()
        out = fn(m, xi)
        out.backward(torch.ones_like(out))
        results.append([out, xi.grad, *(p.grad for p in m.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_linear", [False, True])
def test_the_blocks_get_contiguous_tokens(use_linear, monkeypatch):
    """A token view of an NCHW map made every LayerNorm copy its input (and every residual
    branch its gradient): the blocks must see contiguous tokens, forward and backward."""
    seen = []
    plain = BasicTransformerBlock._forward

    def spy(self, x, context):
        seen.append(x.is_contiguous())
        x.register_hook(lambda g: seen.append(g.is_contiguous()))
        return plain(self, x, context)

    monkeypatch.setattr(BasicTransformerBlock, "_forward", spy)
    x, context = inputs()
    x.requires_grad_()
    transformer(use_linear)(x, context).sum().backward()
    assert seen == [True, True]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_output_keeps_the_inputs_memory_format(memory_format):
    x, context = inputs()
    x = x.to(memory_format=memory_format)
    out = transformer(use_linear=False)(x, context)
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, as_convolutions(transformer(use_linear=False), x, context))


def test_an_adapted_projection_convolution_is_used():
    """An adapter patches proj_in.forward (ldm.modules.adapters): it must run, on the map."""
    x, context = inputs()
    m = transformer(use_linear=False)
    plain = m(x, context)
    base = m.proj_in.forward
    shapes = []

    def adapted(t):
        shapes.append(t.shape)
        return base(t) + 0.5
    m.proj_in.forward = adapted
    out = m(x, context)
    assert shapes == [torch.Size([2, 64, 60, 1])]  # channels first, the tokens as one spatial axis
    b, c, h, w = x.shape
    tokens = (F.conv2d(m.norm(x), m.proj_in.weight, m.proj_in.bias) + 0.5).flatten(2).transpose(1, 2)
    for block in m.transformer_blocks:
        tokens = block(tokens, context)
    want = m.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w)) + x
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, plain)
