"""The norms' dtypes: under autocast the UNet's and the VAE's norms run in the activations'
bf16 (torch's kernels keep the statistics in float32), outside it in float32.

On a GPU autocast would run group_norm and layer_norm in float32 and keep float32 copies of
their inputs for the backward; the CPU's autocast does not, so these tests look at what
reaches the norm kernels (the dtypes of their arguments) and what the backward keeps.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.modules.attention import LayerNorm
from ldm.modules.diffusionmodules.model import Normalize
from ldm.modules.diffusionmodules.util import GroupNorm32, autocast_dtype, few_rows, group_norm_few_rows

NORM_OPS = {"native_group_norm", "native_layer_norm"}


class NormArguments(TorchDispatchMode):
    """Records the dtypes of the tensors each norm kernel gets."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in NORM_OPS:
            self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def group_norm_and_layer_norm():
    torch.manual_seed(0)
    gn, ln = GroupNorm32(4, 16), LayerNorm(16)
    with torch.no_grad():
        for p in (*gn.parameters(), *ln.parameters()):
            p.normal_()
    return gn, ln


def test_under_autocast_the_norms_run_in_bf16_with_float32_statistics():
    gn, ln = group_norm_and_layer_norm()
    x = (torch.randn(2, 16, 8, 8) * 5 + 3).to(torch.bfloat16)
    tokens = x.flatten(2).transpose(1, 2).contiguous()  # [2, 64, 16]
    with NormArguments() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        y_gn, y_ln = gn(x), ln(tokens)
    assert [name for name, _ in seen.calls] == ["native_group_norm", "native_layer_norm"]
    for name, dtypes in seen.calls:
        assert set(dtypes) == {torch.bfloat16}, (name, dtypes)  # input, weight, bias: no float32 round trip
    assert y_gn.dtype == y_ln.dtype == torch.bfloat16
    # the same as normalising in float32 and rounding the result to bf16, to bf16's precision
    # (the weight and bias are rounded to bf16 as autocast rounds every product's weights)
    ref_gn = F.group_norm(x.float(), 4, gn.weight, gn.bias, gn.eps)
    ref_ln = F.layer_norm(tokens.float(), (16,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(y_gn.float(), ref_gn, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_ln.float(), ref_ln, rtol=2e-2, atol=2e-2)


def test_outside_autocast_a_bf16_group_norm_normalises_in_float32():
    gn, _ = group_norm_and_layer_norm()
    gn.to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    with NormArguments() as seen:
        y = gn(x)
    assert seen.calls == [("native_group_norm", [torch.float32] * 3)]
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.group_norm(x.float(), 4, gn.weight.float(), gn.bias.float(), gn.eps).to(torch.bfloat16))


def test_the_backward_keeps_the_bf16_input_not_a_float32_copy():
    """What a norm saves for its backward, in bytes per element of its input."""
    gn, ln = group_norm_and_layer_norm()
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    for norm, inp in ((gn, x), (ln, x.flatten(2).transpose(1, 2).contiguous())):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(inp)
        big = [t for t in saved if t.numel() == inp.numel()]
        assert big and all(t.dtype == torch.bfloat16 for t in big), [(t.dtype, t.shape) for t in saved]
        y.float().sum().backward()


def test_gradients_match_the_float32_norms():
    gn, ln = group_norm_and_layer_norm()
    x = (torch.randn(2, 16, 8, 8) * 2).to(torch.bfloat16)
    grad = torch.randn(2, 16, 8, 8)

    def grads(norm, inp, autocast):
        inp = inp.detach().requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm(inp)
        out.float().backward(grad if out.dim() == 4 else grad.flatten(2).transpose(1, 2))
        return [inp.grad.float(), norm.weight.grad.clone(), norm.bias.grad.clone()]

    for norm, inp in ((gn, x), (ln, x.flatten(2).transpose(1, 2).contiguous())):
        for got, want in zip(grads(norm, inp, True), grads(norm, inp.float(), False)):
            # bf16 gradients (rounded as every autocast product's are), against their largest entry;
            # the CPU's bf16 layer_norm sums the bias gradient less exactly than the GPU's (which
            # stays within 0.6%: bench/norm_dtype.py), hence 2.5%
            assert (got - want).abs().max() <= 2.5e-2 * want.abs().max()


@pytest.mark.parametrize("dtype, autocast, expected", [
    (torch.bfloat16, True, torch.bfloat16),
    (torch.float32, True, torch.float32),  # a float32 map stays float32
    (torch.bfloat16, False, torch.float32),
])
def test_autocast_dtype(dtype, autocast, expected):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert autocast_dtype(torch.zeros(1, dtype=dtype)) == expected


def test_the_vae_uses_the_same_norm_and_keeps_its_keys():
    norm = Normalize(64)
    assert isinstance(norm, GroupNorm32) and (norm.num_groups, norm.eps) == (32, 1e-6)
    assert list(norm.state_dict()) == ["weight", "bias"]
    assert list(LayerNorm(8).state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("shape, affine", [((1, 128, 32, 32), True), ((2, 64, 8, 8), False), ((1, 64, 4, 4, 4), True)])
def test_group_norm_few_rows_equals_torchs(shape, affine):
    # a VAE decode of one image: 32 (sample, group) rows, an offset as decoder maps have
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 5
    weight, bias = (torch.randn(shape[1]), torch.randn(shape[1])) if affine else (None, None)
    expected = F.group_norm(x, 32, weight, bias, 1e-6)
    torch.testing.assert_close(group_norm_few_rows(x, 32, weight, bias, 1e-6), expected, rtol=1e-5, atol=1e-5)


class _Map:
    """What few_rows reads of a feature map."""

    def __init__(self, batch, cuda=True, contiguous=True, requires_grad=False, side=256):
        self.shape, self.is_cuda, self.requires_grad = (batch, 128, side, side), cuda, requires_grad
        self._contiguous = contiguous

    def is_contiguous(self):
        return self._contiguous


def test_few_rows_only_for_inference_on_few_groups_on_the_gpu():
    frozen, trained = torch.ones(128), torch.ones(128, requires_grad=True)
    with torch.no_grad():
        assert few_rows(_Map(1), 32, trained)       # a decode's 256 px map: 32 rows
        assert few_rows(_Map(3), 32, frozen)        # 96 rows
        assert not few_rows(_Map(4), 32, frozen)    # 128 rows: torch's kernel fills the GPU
        assert not few_rows(_Map(1, side=128), 32, frozen)  # a small map: torch's one kernel is quicker
        assert not few_rows(_Map(1, cuda=False), 32, frozen)
        assert not few_rows(_Map(1, contiguous=False), 32, frozen)  # channels-last
    assert few_rows(_Map(1), 32, frozen)            # a frozen VAE's encode with gradients on elsewhere
    assert not few_rows(_Map(1), 32, trained)       # training: torch's kernel and its backward
    assert not few_rows(_Map(1, requires_grad=True), 32, frozen)
