"""model.params.channels_last while compiling: every convolution in the UNet's backward gets its
gradient in NHWC memory (cuDNN copies any other layout first), and the skip concatenation and
2x upsampling that make it so give torch's own values and gradients.

The graphs are traced as torch.compile traces them for inductor (its decompositions) and
replayed through autograd on the CPU; what inductor's kernels save is measured
on the GPU (doc/performance/step.md, thirty-third session)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

from ldm.modules.diffusionmodules import nhwc
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.modules.test_unet import TINY, unet_params

NHWC = torch.channels_last


def conv_gradient_layouts() -> list[tuple[tuple[int, ...], bool]]:
    """(gradient shape, NHWC-contiguous) for each convolution_backward in the tiny UNet's
    compiled backward, NHWC weights (on the CPU: the meta device's convolutions return NCHW
    maps where cuDNN's and the CPU's return NHWC)."""
    found = []

    def backward(graph, inputs):
        for node in graph.graph.nodes:
            if node.target == torch.ops.aten.convolution_backward.default:
                grad = node.args[0].meta["val"]
                found.append((tuple(grad.shape), grad.is_contiguous(memory_format=NHWC)))
        return make_boxed_func(graph.forward)

    torch.manual_seed(0)
    unet = UNetModel(**unet_params(TINY)).to(memory_format=NHWC)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 917]), torch.randn(2, 5, 64)
    backend = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=backward,
                           decompositions=select_decomp_table())
    torch._dynamo.reset()
    try:
        torch.compile(unet, backend=backend, fullgraph=True)(x, t, context).sum().backward()
    finally:
        torch._dynamo.reset()
    return found


def test_every_convolution_gets_an_nhwc_gradient():
    layouts = conv_gradient_layouts()
    assert len(layouts) >= 10
    assert all(is_nhwc for _, is_nhwc in layouts), [shape for shape, is_nhwc in layouts if not is_nhwc]


def test_torchs_own_cat_and_upsample_would_not(monkeypatch):
    """The check above can fail: traced as torch's ops, the convolutions behind the skip
    concatenation and the upsampling get channel slices and NCHW maps."""
    monkeypatch.setattr(nhwc, "compiling_nhwc", lambda x: False)
    layouts = conv_gradient_layouts()
    assert sum(not is_nhwc for _, is_nhwc in layouts) >= 3


@pytest.mark.parametrize("compiled", [False, True])
def test_cat_and_upsample_equal_torchs(compiled):
    torch.manual_seed(0)
    a, b = (torch.randn(2, c, 3, 5).to(memory_format=NHWC).requires_grad_() for c in (6, 10))
    g = torch.randn(2, 16, 6, 10)

    def ours(a, b):
        return nhwc.upsample_nearest2x(nhwc.cat_channels(a, b))

    fn = torch.compile(ours, backend="aot_eager", fullgraph=True) if compiled else ours
    torch._dynamo.reset()
    try:
        out = fn(a, b)
        grads = torch.autograd.grad(out, (a, b), g)
    finally:
        torch._dynamo.reset()
    ref = F.interpolate(torch.cat([a, b], dim=1), scale_factor=2, mode="nearest")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=NHWC)
    for grad, expected in zip(grads, torch.autograd.grad(ref, (a, b), g)):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)  # sums of 4 in another order
        if compiled:
            assert grad.is_contiguous(memory_format=NHWC) and not grad.is_contiguous()
