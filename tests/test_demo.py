"""`make demo` end to end: fine-tuning the tiny model on meebs moves it, and keeps the shapes."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from scripts.demo import CONCEPT_PROMPTS, run_demo


@pytest.mark.slow
def test_demo_teaches_the_concept_and_keeps_the_base(tmp_path):
    summary = run_demo(tmp_path / "logs", tmp_path / "demo-data")
    loss, dist, colour = (summary["concept_val_loss"], summary["concept_distance_l1"],
                          summary["base_prompt_colour_accuracy"])
    # recorded (doc/TINY_BASE.md): loss 0.078 -> 0.027, distance 57 -> 31, colour accuracy 1.0 -> 1.0
    assert loss["after"] < 0.6 * loss["before"]
    assert dist["after"] < dist["before"] - 10
    assert colour["after"] >= 0.75
    run = tmp_path / "logs" / next(p.name for p in (tmp_path / "logs").iterdir() if p.name.endswith("_demo"))
    with Image.open(run / "images" / "compare.png") as im:
        assert im.height == 2 * 64 and im.width > 64 * (len(CONCEPT_PROMPTS) + 4)
    assert json.loads((run / "demo_summary.json").read_text())["concept_val_loss"] == loss
    assert summary["pruned"].is_file()
