"""AutoencoderKL: the released-checkpoint layout, shapes through the tiny config, the posterior's math."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
SD_YAMLS = ["v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml"]
PATH = "model.params.first_stage_config"


def first_stage_config(yaml_path: Path):
    return OmegaConf.load(yaml_path).model.params.first_stage_config


def build(node, device="cpu"):
    with torch.device(device):
        return instantiate_from_config(node, path=PATH)


@pytest.fixture(scope="module")
def sd_vae():
    return build(first_stage_config(ROOT / "configs/stable-diffusion/v1-inference.yaml"), "meta")


@pytest.fixture(scope="module")
def tiny_node():
    return first_stage_config(ROOT / "tests/configs/tiny.yaml")


@pytest.fixture(scope="module")
def tiny_vae(tiny_node):
    torch.manual_seed(0)
    return build(tiny_node).eval()


@pytest.mark.parametrize("name", SD_YAMLS)
def test_sd_yaml_matches_released_checkpoint_size(name):
    vae = build(first_stage_config(ROOT / "configs/stable-diffusion" / name), "meta")
    assert isinstance(vae, AutoencoderKL)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert len(vae.state_dict()) == 248


@pytest.mark.parametrize("key, shape", [
    ("encoder.conv_in.weight", (128, 3, 3, 3)),
    ("encoder.down.0.block.1.conv2.weight", (128, 128, 3, 3)),
    ("encoder.down.0.downsample.conv.weight", (128, 128, 3, 3)),
    ("encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
    ("encoder.down.2.downsample.conv.bias", (512,)),
    ("encoder.mid.block_1.norm1.weight", (512,)),
    ("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
    ("encoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
    ("encoder.mid.block_2.conv2.weight", (512, 512, 3, 3)),
    ("encoder.norm_out.weight", (512,)),
    ("encoder.conv_out.weight", (8, 512, 3, 3)),
    ("quant_conv.weight", (8, 8, 1, 1)),
    ("post_quant_conv.weight", (4, 4, 1, 1)),
    ("decoder.conv_in.weight", (512, 4, 3, 3)),
    ("decoder.mid.attn_1.k.weight", (512, 512, 1, 1)),
    ("decoder.up.3.block.2.conv1.weight", (512, 512, 3, 3)),
    ("decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
    ("decoder.up.1.block.0.nin_shortcut.weight", (256, 512, 1, 1)),
    ("decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
    ("decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)),
    ("decoder.norm_out.weight", (128,)),
    ("decoder.conv_out.weight", (3, 128, 3, 3)),
])
def test_state_dict_key_and_shape(sd_vae, key, shape):
    sd = sd_vae.state_dict()
    assert key in sd
    assert tuple(sd[key].shape) == shape


def test_state_dict_has_no_extra_modules(sd_vae):
    keys = sd_vae.state_dict().keys()
    # the lowest level has no downsample, the highest no upsample; no loss keys; no shortcut where channels match
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample", "loss.")) for k in keys)
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in keys
    assert "decoder.up.3.block.0.nin_shortcut.weight" not in keys
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_lossconfig_identity_and_monitor_add_no_keys(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    plain = build(node)
    node["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    node["params"]["monitor"] = "val/rec_loss"
    with_loss = build(node)
    assert isinstance(with_loss.loss, torch.nn.Identity)
    assert with_loss.monitor == "val/rec_loss"
    assert list(with_loss.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("shape, latent_shape", [
    ((2, 3, 32, 32), (2, 4, 8, 8)),
    ((1, 3, 32, 48), (1, 4, 8, 12)),
])
def test_tiny_encode_decode_shapes(tiny_vae, shape, latent_shape):
    x = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        posterior = tiny_vae.encode(x)
        assert isinstance(posterior, DiagonalGaussianDistribution)
        assert posterior.mean.shape == latent_shape
        assert posterior.sample().shape == latent_shape
        assert torch.equal(posterior.mode(), posterior.mean)
        assert posterior.kl().shape == (shape[0],)
        assert tiny_vae.decode(posterior.mode()).shape == shape
        rec, post = tiny_vae(x)
    assert rec.shape == shape and torch.isfinite(rec).all()
    assert post.mean.shape == latent_shape


def test_forward_sample_posterior_flag(tiny_vae):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec_mode, posterior = tiny_vae(x, sample_posterior=False)
        assert torch.allclose(rec_mode, tiny_vae.decode(posterior.mode()))
        rec_a, _ = tiny_vae(x)
        rec_b, _ = tiny_vae(x)
    assert not torch.allclose(rec_a, rec_b)


def test_bf16_autocast_forward(tiny_vae):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref, _ = tiny_vae(x, sample_posterior=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec, posterior = tiny_vae(x, sample_posterior=False)
            z = posterior.sample()
    assert rec.shape == x.shape and torch.isfinite(rec).all() and torch.isfinite(z).all()
    assert (rec.float() - ref).abs().mean() < 0.03  # bf16 rounding only, same computation


def test_attention_placed_by_resolution(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    node["params"]["ddconfig"]["attn_resolutions"] = [16]  # level 1 of resolution 32
    keys = build(node, "meta").state_dict().keys()
    attn_levels = sorted({k.split(".attn.")[0] for k in keys if ".attn." in k})
    assert attn_levels == ["decoder.up.1", "encoder.down.1"]
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.proj_out.weight" in keys


def test_attn_block_equals_softmax_reference():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # [B, C, N]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32 ** 0.5, dim=-1)  # [B, Nq, Nk]
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
        expected = x + block.proj_out(out)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1, with_conv=True)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0  # the centre tap
        down.conv.bias.zero_()
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    # padding (0,1,0,1) puts the centre of output (i, j) on input (2i+1, 2j+1)
    assert torch.equal(down(x), x[:, :, 1::2, 1::2])


def test_posterior_kl_and_nll_match_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    mean2, logvar2 = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    p = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    q = DiagonalGaussianDistribution(torch.cat([mean2, logvar2], dim=1))
    normal = torch.distributions.Normal
    p_ref, q_ref = normal(mean, (0.5 * logvar).exp()), normal(mean2, (0.5 * logvar2).exp())
    std_normal = normal(torch.zeros_like(mean), torch.ones_like(mean))

    def per_item(t):
        return t.sum(dim=(1, 2, 3))

    assert p.kl().shape == (2,)
    assert torch.allclose(p.kl(), per_item(torch.distributions.kl_divergence(p_ref, std_normal)), atol=1e-4)
    assert torch.allclose(p.kl(q), per_item(torch.distributions.kl_divergence(p_ref, q_ref)), atol=1e-4)
    # 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) for a hand-picked point: mu=1, logvar=0 -> 0.5 per element
    ones = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], dim=1))
    assert torch.allclose(ones.kl(), torch.tensor([0.5 * 16]))
    x = torch.randn(2, 4, 3, 5)
    assert torch.allclose(p.nll(x), per_item(-p_ref.log_prob(x)), atol=1e-4)


def test_posterior_sample_statistics_and_clamp():
    moments = torch.cat([torch.full((1, 4, 64, 64), 2.0), torch.full((1, 4, 64, 64), 100.0)], dim=1)
    posterior = DiagonalGaussianDistribution(moments)
    assert posterior.logvar.max() == 20.0  # clamped to [-30, 20]
    moments = torch.cat([torch.full((1, 4, 64, 64), 2.0), torch.full((1, 4, 64, 64), -2 * 0.6931472)], dim=1)
    posterior = DiagonalGaussianDistribution(moments)  # std = 0.5
    z = posterior.sample(generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(z, posterior.sample(generator=torch.Generator().manual_seed(0)))


def test_unknown_ddconfig_key_is_named(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    node["params"]["ddconfig"]["z_chanels"] = 4
    with pytest.raises(ValueError, match=r"ddconfig\.z_chanels"):
        build(node, "meta")


def test_missing_ddconfig_key_is_named(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    del node["params"]["ddconfig"]["num_res_blocks"]
    with pytest.raises(ValueError, match=r"ddconfig\.num_res_blocks"):
        build(node, "meta")


def test_attn_type_vanilla_xformers_is_the_same_model(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    plain = build(node, "meta")
    node = copy.deepcopy(node)
    node["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"
    xformers = build(node, "meta")
    assert {k: v.shape for k, v in xformers.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    node["params"]["ddconfig"]["attn_type"] = "linear"
    with pytest.raises(ValueError, match=r"ddconfig\.attn_type.*'linear'"):
        build(node, "meta")


def test_double_z_false_is_rejected(tiny_node):
    node = OmegaConf.to_container(tiny_node)
    node["params"]["ddconfig"]["double_z"] = False
    with pytest.raises(ValueError, match=r"ddconfig\.double_z"):
        build(node, "meta")
