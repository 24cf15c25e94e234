"""`make demo`: fine-tune the shipped tiny shapes model on a concept it has never seen, on CPU.

1. writes 60 captioned images of "meebs" (file-name captions, mixed aspect ratios, one image
   with transparency) to logs/demo-data/meebs, and 60 images of the shapes the model
   already knows to logs/demo-data/shapes: the ground truth that keeps it from forgetting
   them (EveryDream's advice: mix the new concept with data like the model's own);
2. samples fixed prompts and seeds with the base model (models/tiny/tiny-shapes.safetensors);
3. runs the normal training command:
       python main.py --base configs/tiny/finetune-demo.yaml -t -n demo \\
           --actual_resume models/tiny/tiny-shapes.safetensors --data_root logs/demo-data
4. samples the same prompts and seeds with the result: images/compare.png in the run folder
   shows before and after side by side; demo_summary.json has the numbers;
5. prunes the last checkpoint, and prints where everything is.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/tiny/finetune-demo.yaml"
BASE_WEIGHTS = ROOT / "models/tiny/tiny-shapes.safetensors"
CONCEPT_PROMPTS = ["a green meeb waving on a black background", "a purple meeb jumping on a white background",
                   "an orange meeb standing on a black background", "a green meeb standing on a white background"]
BASE_PROMPTS = ["a large red circle on a white background", "a large blue square on a black background",
                "a large yellow circle on a black background", "a large purple square on a white background"]
SEEDS = [11, 12, 13, 14]
SAMPLING = {"height": 64, "width": 64, "steps": 25, "guidance_scale": 4.0}


def load_model(weights: str | Path):
    """The demo config's model with `weights` (an SD-layout file or a training checkpoint)."""
    from omegaconf import OmegaConf

    from ldm import checkpoint as ckpt_io
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(CONFIG).model
    model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    ckpt_io.load_into_model(model, ckpt_io.load_state_dict(weights), source=str(weights))
    return model.eval()


def sample(model, prompts: Sequence[str]) -> list:
    from ldm.models.diffusion.txt2img import txt2img

    return txt2img(model, prompts, [SEEDS[i % len(SEEDS)] for i in range(len(prompts))], **SAMPLING)


def concept_loss(model, data_root: Path) -> float:
    """Mean fixed-noise loss (as `val/loss` computes it) over the demo's held-out meebs."""
    import torch
    from omegaconf import OmegaConf

    from ldm.data.batching import collate_batch
    from ldm.util import instantiate_from_config

    node = OmegaConf.to_container(OmegaConf.load(CONFIG).data.params.validation)
    ds = instantiate_from_config({"target": node["target"],
                                  "params": {**node["params"], "data_root": str(data_root), "batch_size": 8}})
    losses = []
    with torch.no_grad():
        for keys in ds.batch_sampler():
            batch = collate_batch([ds[k] for k in keys])
            concept = torch.tensor(["meeb" in c for c in batch["caption"]])
            losses.append(model.fixed_noise_loss(batch)[concept])
    return torch.cat(losses).mean().item()


def distance_to_concept(images: Sequence, data_root: Path) -> float:
    """Mean over `images` of the L1 distance (0-255 per channel) to the nearest square demo image."""
    import numpy as np
    from PIL import Image

    refs = []
    for p in sorted(data_root.glob("*.png")):
        with Image.open(p) as im:
            if im.width == im.height:
                refs.append(np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32))
    refs = np.stack(refs)
    return float(np.mean([np.abs(refs - np.asarray(im, dtype=np.float32)).mean(axis=(1, 2, 3)).min()
                          for im in images]))


def colour_accuracy(images: Sequence, prompts: Sequence[str]) -> float:
    """Share of images whose dominant non-background colour is the prompt's colour word."""
    from scripts.make_shapes import BACKGROUNDS, COLOURS, dominant_colour

    hits = 0
    for im, prompt in zip(images, prompts):
        words = prompt.split()
        colour = next(w for w in words if w in COLOURS)
        background = next(w for w in words if w in BACKGROUNDS)
        hits += dominant_colour(im, background) == colour
    return hits / len(images)


def compare_image(before: Sequence, after: Sequence, prompts: Sequence[str]):
    """Two labelled rows, before and after, one column per prompt."""
    from PIL import Image, ImageDraw

    cell, label = 64, 48
    grid = Image.new("RGB", (label + cell * len(prompts), 2 * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("before", before), ("after", after))):
        draw.text((4, row * cell + cell // 2 - 6), name, fill="black")
        for col, im in enumerate(images):
            grid.paste(im, (label + col * cell, row * cell))
    return grid


def run_demo(logs: Path, data: Path, extra: Sequence[str] = ()) -> dict:
    """The whole demo; returns the summary (also written to <run>/demo_summary.json)."""
    from ldm.prune import prune_checkpoint
    from ldm.train import main as train_main
    from scripts.make_shapes import make_meebs, make_shapes

    if not data.is_dir():
        make_meebs(data / "meebs", count=60, size=64, seed=0)
        make_shapes(data / "shapes", count=60, size=64, seed=2)  # not the base model's training seed
    print(f"demo data: {len(list(data.glob('*/*.png')))} images in {data}")
    prompts = CONCEPT_PROMPTS + BASE_PROMPTS
    base = load_model(BASE_WEIGHTS)
    before, loss_before = sample(base, prompts), concept_loss(base, data)

    existing = set(logs.glob("*_demo"))
    argv = ["--base", str(CONFIG), "-t", "-n", "demo", "--actual_resume", str(BASE_WEIGHTS),
            "--data_root", str(data), "-l", str(logs), *extra]
    print("running: python main.py " + " ".join(argv))
    if train_main(argv) != 0:
        raise SystemExit("training failed")
    run = max(set(logs.glob("*_demo")) - existing)

    tuned = load_model(run / "checkpoints" / "last.ckpt")
    after, loss_after = sample(tuned, prompts), concept_loss(tuned, data)
    compare_image(before, after, prompts).save(run / "images" / "compare.png")
    n = len(CONCEPT_PROMPTS)
    summary = {
        "concept_val_loss": {"before": round(loss_before, 5), "after": round(loss_after, 5)},
        "concept_distance_l1": {"before": round(distance_to_concept(before[:n], data / "meebs"), 2),
                                "after": round(distance_to_concept(after[:n], data / "meebs"), 2)},
        "base_prompt_colour_accuracy": {"before": colour_accuracy(before[n:], BASE_PROMPTS),
                                        "after": colour_accuracy(after[n:], BASE_PROMPTS)},
        "prompts": prompts, "seeds": SEEDS, "run": str(run),
    }
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    summary["pruned"] = prune_checkpoint(run / "checkpoints" / "last.ckpt", safetensors=True).dst
    return summary


def main() -> int:
    logs = ROOT / "logs"
    t0 = time.perf_counter()
    s = run_demo(logs, logs / "demo-data")
    run = Path(s["run"])
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Run folder: {run}\n"
          f"  before/after:  {run / 'images' / 'compare.png'}  (top: base model, bottom: fine-tuned)\n"
          f"  concept validation loss {s['concept_val_loss']['before']} -> {s['concept_val_loss']['after']}\n"
          f"  checkpoints:   {run / 'checkpoints'}\n"
          f"  sample grids:  {run / 'images' / 'train'}\n"
          f"  pruned model:  {s['pruned']}\n"
          f"  TensorBoard:   .venv/bin/tensorboard --logdir {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
