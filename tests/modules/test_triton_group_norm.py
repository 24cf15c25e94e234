"""GroupNorm of NHWC maps in Triton (ldm/modules/diffusionmodules/triton_group_norm.py), run on
the CPU by Triton's interpreter: forward and gradients against F.group_norm, and when
GroupNorm32 takes it."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.diffusionmodules import triton_group_norm
from ldm.modules.diffusionmodules.util import GroupNorm32

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreter():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU tensors in Triton's interpreter only")


def nhwc(*shape, dtype=torch.float32, mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3 + mean
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


SMALL_TILES = triton_group_norm.Tiles(p=16, c=32, warps=4, span=32)  # several spans and channel blocks


@pytest.mark.parametrize("tiles", [triton_group_norm.TILES, SMALL_TILES], ids=["shipped", "small"])
@pytest.mark.parametrize("shape, groups", [
    ((2, 64, 5, 7), 32),     # 35 positions: few programs, so spans of one tile, the last partial
    ((2, 96, 12, 11), 32),   # 132 positions, 3 channels a group (not a power of 2; small: groups across blocks)
    ((1, 160, 9, 8), 8),     # 20 channels a group, 160 channels: channel blocks, the last partial
])
def test_forward_and_gradients_match_group_norm(shape, groups, tiles, monkeypatch):
    monkeypatch.setattr(triton_group_norm, "TILES", tiles)
    x = nhwc(*shape, mean=40.0).requires_grad_()  # a large mean: the variance from deviations, not E[x^2] - E[x]^2
    weight = torch.randn(shape[1], generator=torch.Generator().manual_seed(1)).requires_grad_()
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).requires_grad_()
    y = triton_group_norm.group_norm_nhwc(x, groups, weight, bias, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.group_norm(x64, groups, w64, b64, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    ref.backward(dy.double())
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_bf16_map_with_float32_weights_gives_bf16_and_float32_statistics():
    x = nhwc(2, 64, 6, 6, dtype=torch.bfloat16, mean=100.0)
    weight, bias = torch.rand(64) + 0.5, torch.randn(64)
    y = triton_group_norm.group_norm_nhwc(x, 32, weight, bias, 1e-6)
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)  # bf16's rounding of the result only


def test_without_weight_and_bias_and_gradient_of_the_input_only():
    x = nhwc(2, 64, 4, 4).requires_grad_()
    y = triton_group_norm.group_norm_nhwc(x, 32, None, None, 1e-5)
    x64 = x.detach().double().requires_grad_()
    ref = F.group_norm(x64, 32, None, None, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, span", [
    ((32, 320, 64, 64), 1024),  # 32 x 4 spans x 3 channel blocks: 384 programs
    ((32, 640, 32, 32), 512),   # 1024 would give 160
    ((6, 640, 32, 32), 64),     # batch 6: 1024 would give 30 programs, 64 gives 480
    ((6, 1280, 8, 8), 32),      # down to one tile: 6 x 2 x 10 = 120 programs, no smaller span
])
def test_spans_shrink_until_the_summing_kernels_have_enough_programs(shape, span):
    x = torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last)
    assert triton_group_norm._tiles(x, triton_group_norm.Tiles(p=32, c=128, warps=4, span=1024))[4] == span


def test_a_span_that_is_not_a_multiple_of_the_tile_is_refused(monkeypatch):
    monkeypatch.setattr(triton_group_norm, "TILES", triton_group_norm.Tiles(p=32, c=64, warps=4, span=48))
    with pytest.raises(ValueError, match="span 48 is not a multiple of 32 positions"):
        triton_group_norm.group_norm_nhwc(nhwc(1, 64, 2, 2), 32, None, None, 1e-5)


def test_channels_that_do_not_split_into_the_groups_are_refused():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        triton_group_norm.group_norm_nhwc(nhwc(1, 48, 2, 2), 32, None, None, 1e-5)


def test_which_maps_qualify():
    """NHWC memory only (an NCHW map needs no copy for torch's kernel), 4-D, on a GPU."""
    assert not triton_group_norm.qualifies(nhwc(2, 64, 4, 4))  # a CPU tensor
    assert not triton_group_norm.qualifies(torch.randn(2, 64, 4, 4))


def test_group_norm32_takes_it_for_nhwc_maps(monkeypatch):
    """GroupNorm32 on an NHWC map: the Triton path, the same result and gradients as on the
    same values in NCHW (torch's kernel); NCHW maps keep torch's kernel."""
    taken = []
    real = triton_group_norm.group_norm_nhwc
    monkeypatch.setattr(triton_group_norm, "qualifies",
                        lambda x: x.dim() == 4 and not x.is_contiguous()
                        and x.is_contiguous(memory_format=torch.channels_last))
    monkeypatch.setattr(triton_group_norm, "group_norm_nhwc", lambda *a: taken.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = torch.randn(2, 64, 6, 5) * 2 + 1
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    y_cl = gn(x_cl)
    grads_cl = torch.autograd.grad(y_cl.square().sum(), (x_cl, gn.weight, gn.bias))
    assert taken == [x.shape]
    y = gn(x_nchw)
    grads = torch.autograd.grad(y.square().sum(), (x_nchw, gn.weight, gn.bias))
    assert taken == [x.shape]  # NCHW: torch's kernel
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_cl, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, groups", [((2, 64, 5, 7), 32), ((1, 160, 9, 8), 8)])
def test_silu_fused_matches_group_norm_then_silu(shape, groups):
    """silu=True: the forward writes silu(group_norm(x)), and the gradients of x, the weight and
    the bias go through SiLU's derivative first."""
    x = nhwc(*shape, mean=5.0).requires_grad_()
    weight = torch.randn(shape[1], generator=torch.Generator().manual_seed(1)).requires_grad_()
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.silu(F.group_norm(x64, groups, w64, b64, 1e-5))
    want = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    for fn in (triton_group_norm.group_norm_nhwc, triton_group_norm.group_norm_nhwc_op):
        y = fn(x, groups, weight, bias, 1e-5, True)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        for got, w in zip(torch.autograd.grad(y, (x, weight, bias), dy), want):
            torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-4)


def test_the_operator_passes_torchs_operator_checks():
    """ldm::group_norm_nhwc for torch.compile: its fake (the layout inductor plans with) agrees
    with the kernels' output, and its registered backward with autograd's."""
    x = nhwc(2, 64, 3, 5).requires_grad_()
    weight, bias = torch.randn(64).requires_grad_(), torch.randn(64).requires_grad_()
    for silu in (False, True):
        torch.library.opcheck(torch.ops.ldm.group_norm_nhwc.default, (x, 32, weight, bias, 1e-5, silu),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_group_norm32_takes_the_operator_when_compiled_unless_switched_off(monkeypatch):
    """GroupNorm32.triton_when_compiled (on by default): inside torch.compile an NHWC map goes
    through the operator (not inductor's decomposition), with the same result and gradients; off
    (the benches' --inductor_norm), it does not."""
    assert GroupNorm32.triton_when_compiled
    monkeypatch.setattr(triton_group_norm, "qualifies_compiled",
                        lambda x: x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    torch.manual_seed(0)
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = (torch.randn(2, 64, 6, 5) * 2 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    results = {}
    for asked in (False, True):
        monkeypatch.setattr(GroupNorm32, "triton_when_compiled", asked)
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        try:
            y = torch.compile(lambda x: gn(x, silu=True), backend=backend, fullgraph=True)(x)
            grads = torch.autograd.grad(y.square().sum(), (x, gn.weight, gn.bias))
        finally:
            torch._dynamo.reset()
        called = [n for g in graphs for n in g.graph.nodes if "group_norm_nhwc" in str(n.target)]
        assert bool(called) == asked
        results[asked] = (y, *grads)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
