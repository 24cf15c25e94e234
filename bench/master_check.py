"""adamw_master on the GPU: do its Triton kernel (one launch per step) and its fallback
(torch's fused AdamW on the masters, then copies) follow torch's fused fp32 AdamW given the
same gradients, with each bf16 weight the rounding of its master? (The CPU tests check the
same, the kernel in Triton's interpreter: tests/optim/test_master_weights.py.)

    python bench/master_check.py
"""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

import common  # noqa: F401 (puts the repository on sys.path)
from ldm.optim import triton_adamw
from ldm.optim.master_weights import AdamWMaster, MasterWeights

QUALIFIES = triton_adamw.qualifies


def check(kernel: bool, channels_last: bool, steps: int = 20) -> dict:
    triton_adamw.qualifies = QUALIFIES if kernel else (lambda tensors: False)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(64, 320, 3), nn.GroupNorm(32, 320), nn.Flatten(), nn.Linear(320 * 6 * 6, 640)).cuda()
    half = copy.deepcopy(ref)
    if channels_last:
        half.to(memory_format=torch.channels_last)
    masters = MasterWeights(half)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    opt = AdamWMaster(half.parameters(), lr=1e-3, weight_decay=0.01)
    opt.use(masters)
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        for a, p in zip(ref.parameters(), half.parameters()):
            grad = torch.randn(a.shape, generator=g, device="cuda").bfloat16()
            a.grad = grad.float()
            p.grad = torch.empty_like(p).copy_(grad)
        opt_ref.step()
        opt.step()
    rel = max(((masters.master[p] - a).abs().max() / a.abs().max()).item()
              for a, p in zip(ref.parameters(), half.parameters()))
    rounded = all(torch.equal(p, masters.master[p].bfloat16()) for p in half.parameters())
    return {"kernel": kernel, "channels_last": channels_last, "max_rel_diff": rel, "weights_are_rounding": rounded,
            "ok": rel < 1e-5 and rounded}


def main() -> None:
    for kernel in (True, False):
        for channels_last in (False, True):
            print(json.dumps(check(kernel, channels_last)), flush=True)


if __name__ == "__main__":
    main()
