"""Config merging, overrides and validation: every bad key or value names itself."""
import re
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import load_config, parse_overrides
from ldm.util import ConfigError, instantiate_from_config

TINY = "tests/configs/tiny.yaml"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_bases_merge_left_to_right_and_overrides_win(tmp_path):
    extra = write(tmp_path, "extra.yaml", """
        model:
          base_learning_rate: 2.0e-6
        lightning:
          trainer:
            max_epochs: 4
        """)
    cfg = load_config([TINY, extra], ["lightning.trainer.max_epochs=6", "model.params.use_ema=true"])
    assert cfg.model.base_learning_rate == 2.0e-6
    assert cfg.lightning.trainer.max_epochs == 6
    assert cfg.model.params.use_ema is True
    assert cfg.model.params.unet_config.params.model_channels == 32  # untouched keys survive


@pytest.mark.parametrize("override, named", [
    ("model.params.timestepz=10", "model.params.timestepz"),
    ("model.params.unet_config.params.num_head=3", "model.params.unet_config.params.num_head"),
    ("lightning.trainer.maxepochs=2", "lightning.trainer.maxepochs"),
    ("lightning.trainer.max_epochs=six", "lightning.trainer.max_epochs"),
    ("model.params.timesteps=many", "model.params.timesteps"),
    ("bogus.key=1", "bogus"),
    ("model.paramz.x=1", "model.paramz"),
    ("lightning.trainer.logger=false", "lightning.trainer.logger"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config([TINY], [override])


def test_bad_key_in_a_file_names_the_key(tmp_path):
    bad = write(tmp_path, "bad.yaml", """
        model:
          params:
            first_stage_config:
              params:
                embed_dimm: 4
        """)
    with pytest.raises(ConfigError, match=r"model\.params\.first_stage_config\.params\.embed_dimm"):
        load_config([TINY, bad])


def test_bad_target_and_missing_file_are_named(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  params:\n    unet_config:\n      target: ldm.nope.UNet\n")
    with pytest.raises(ConfigError, match=r"model\.params\.unet_config\.target.*ldm\.nope"):
        load_config([TINY, bad])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config([str(tmp_path / "missing.yaml")])
    broken = write(tmp_path, "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config([broken])


def test_override_syntax():
    assert parse_overrides(["a.b=3", "c=true", "d=[1,2]", "e=x y"]) == [
        ("a.b", 3), ("c", True), ("d", [1, 2]), ("e", "x y")]
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["max_epochs"])


def test_instantiate_names_the_path():
    with pytest.raises(ConfigError, match=r"x\.y\.params: unknown key\(s\) bogus"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 1, "out_features": 1,
                                                                          "bogus": 2}}, path="x.y")
    with pytest.raises(ConfigError, match=r"x\.params: missing required key\(s\) out_features"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 1}}, path="x")
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert layer.weight.shape == (3, 2)


def test_the_large_scale_guide_example_trains_with_adamw_where_it_accumulates(tmp_path):
    """doc/LARGE-SCALE.md's example YAML, merged after the fine-tune config: gradient
    accumulation, which adamw_master (the config's default) refuses, comes with adamw on fp32
    weights, and the tiny model with those settings builds."""
    guide = Path("doc/LARGE-SCALE.md").read_text()
    example = write(tmp_path, "my-large.yaml", re.search(r"```yaml\n(# configs/my-large.yaml.*?)```", guide, re.S)[1])
    cfg = load_config(["configs/stable-diffusion/v1-finetune_everydream.yaml", example])
    assert cfg.lightning.trainer.accumulate_grad_batches == 2
    params = cfg.model.params
    assert (params.unet_precision, params.optimizer.name) == ("fp32", "adamw")
    tiny = OmegaConf.load(TINY).model
    tiny.params.update(unet_precision=params.unet_precision, optimizer=params.optimizer, use_ema=params.use_ema)
    instantiate_from_config({"target": tiny.target, "params": tiny.params}, path="model")
