"""Where the SD 1.x-size run's peak GPU memory comes from (random weights).

Peaks, each measured from a reset: (1) training steps at batch 6, 512 px, bf16 autocast,
gradient checkpointing, cudnn.benchmark off; (2) the same over three bucket shapes with
cudnn.benchmark on; (3) the ImageLogger's sampling of 8 prompts (40 DDIM steps, CFG) and
VAE decoding, as in a run.

    python bench/sd1_memory.py [--batch 6]
"""
import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.callbacks.image_logger import ImageLogger, SamplePrompt  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

GiB = 2**30


def steps(model, opt, batch, shapes, n=3):
    for h, w in shapes:
        for _ in range(n):
            b = {"image": torch.rand(batch, 3, h, w, device="cuda") * 2 - 1, "caption": ["a photo"] * batch}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.shared_step(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()
    cfg = OmegaConf.load("configs/stable-diffusion/v1-finetune_everydream.yaml").model
    with torch.device("cuda"):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    model.learning_rate = 1e-6
    opt = model.configure_optimizers()["optimizer"]
    model.train()
    state = torch.cuda.memory_allocated() / GiB
    print(f"weights (fp32) on the GPU: {state:.2f} GiB")

    torch.backends.cudnn.benchmark = False
    torch.cuda.reset_peak_memory_stats()
    steps(model, opt, args.batch, [(512, 512)])
    print(f"(1) train batch {args.batch} 512x512, benchmark off: peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB"
          f" (reserved {torch.cuda.max_memory_reserved() / GiB:.2f})")

    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
    steps(model, opt, args.batch, [(512, 512), (448, 576), (320, 768)], n=2)
    print(f"(2) train, 3 buckets, benchmark on: peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB"
          f" (reserved {torch.cuda.max_memory_reserved() / GiB:.2f})")

    torch.backends.cudnn.benchmark = False
    opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    logger = ImageLogger(max_images=8, steps=40)
    prompts = [SamplePrompt(f"prompt {i}", "", 512, 512, i, 40, 7.5) for i in range(8)]

    class _T:  # the little of a Trainer that generate() reads
        class precision_plugin:
            @staticmethod
            def forward_context():
                return torch.autocast("cuda", dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        logger.generate(model, prompts, _T())
    torch.cuda.synchronize()
    print(f"(3) sampling 8 x 512 px, 40 DDIM steps, CFG, VAE decode: peak {torch.cuda.max_memory_allocated() / GiB:.2f}"
          f" GiB (grads freed; optimizer state kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
