"""configs/lora/*.yaml: valid, and each builds the kohya module set on SD 1.5's structure."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import load_config
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algo, unet_modules", [("lora", 192), ("locon", 278), ("loha", 278), ("lokr", 278)])
def test_each_adapter_config_builds_its_network(algo, unet_modules):
    cfg = load_config([ROOT / "configs/lora" / f"{algo}.yaml"])
    assert cfg.data.params.train.params.caption_fallback == "folder"
    with torch.device("meta"):
        model = instantiate_from_config({"target": cfg.model.target, "params": cfg.model.params}, path="model")
    try:
        assert model.network.counts() == {"unet": unet_modules, "text_encoder": 72}
        assert {a.algo for _, a in model.network.adapters()} == {"lora" if algo == "locon" else algo}
        assert all(p.dtype == torch.float32 and p.requires_grad for p in model.network.parameters())
        assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("network."))
    finally:
        model.network.remove()
