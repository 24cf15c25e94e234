"""Which tiles make the Triton GroupNorm (+ SiLU) kernels run nearest the memory rate?

    cd bench && python group_norm_tiles.py [--batch 32] [--shapes N] [--shipped]

For each GroupNorm shape of SD 1.x's UNet at 512 px (group_norm_step.NORMS, with and without
the SiLU), the forward (`_forward`: statistics, merge, normalise) and the backward
(`_backward`: sums, merge, dx) of triton_group_norm.py with each `Tiles` (positions x channels
per program, warps per program, positions per program of the two kernels that sum over
positions). Each is timed on the GPU alone, without the host's launch cost: `REPS` calls
recorded in one CUDA graph, replayed. The floor: the map-sized passes at the
copy rate (forward 3: x read twice, y written; backward 5: x and dy read twice, dx written).

--shipped times the kernels as shipped only (`_forward` and `_backward` without `tiles`), so a copy
of this script in another tree (one whose kernels take no `Tiles`) times that tree's kernels.

One JSON line per shape (each config's forward and backward ms, the shipped one's, the best
and the floor), then the step's totals (each shape times its count per step) for the shipped
tiles, the best single config, the best per shape, and the floor. H200, batch 32: the
one-tile-per-program kernels (64 positions x 64 channels) summed to 4.11 ms forward + 7.38
backward a step, the spans' kernels with fixed spans of 1024 3.23 + 6.72 (thirty-seventh
session), as shipped (32 x 128, spans halved down to MIN_PROGRAMS programs) 3.16 + 6.45, the
floor 2.03 + 3.38; batch 6 as shipped 0.97 + 2.06 against the tiles before 1.04 + 2.17
(thirty-eighth session, doc/performance/step.md).
"""
from __future__ import annotations

import argparse
import json
from itertools import product

import torch

from common import emit, setup_cuda
from group_norm_step import NORMS, copy_rate
from ldm.modules.diffusionmodules import triton_group_norm as tgn  # noqa: E402 (common: repo on sys.path)

REPS = 20


def sweep() -> list:
    """The Tiles tried: spans of several tiles, spans of one tile, and the shipped ones."""
    several = [tgn.Tiles(p, c, w, span) for p, c, w, span in product((32, 64, 128), (64, 128), (4, 8), (256, 512, 1024))
               if w == 4 or c == 128]
    one = [tgn.Tiles(p, c, 4, p) for p, c in product((32, 64, 128), (64, 128))]
    return sorted(set(several + one) | {tgn.TILES})


def graph_ms(fn, reps: int = REPS) -> float:
    """GPU ms of one call of `fn`: `reps` calls recorded in a CUDA graph, the best of 5 replays."""
    fn()  # compile the kernels, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def measure(batch: int, c: int, side: int, silu: bool, configs: list) -> dict:
    torch.manual_seed(0)
    x = (torch.randn(batch, c, side, side, device="cuda") * 2 + 0.5).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w, b = (torch.rand(c, device="cuda") + 0.5).bfloat16(), torch.randn(c, device="cuda").bfloat16()
    ref_y, gmean, rstd = tgn._forward(x, 32, w, b, 1e-5, silu)
    ref_dx, *_ = tgn._backward(dy, x, w, b, gmean, rstd, 32, silu, True)
    rows = {}
    for tiles in configs:  # None: as shipped, no `tiles` argument
        kw = {"tiles": tiles} if tiles is not None else {}
        y, *_ = tgn._forward(x, 32, w, b, 1e-5, silu, **kw)
        dx, *_ = tgn._backward(dy, x, w, b, gmean, rstd, 32, silu, True, **kw)
        diff = max((y.float() - ref_y.float()).abs().max().item(), (dx.float() - ref_dx.float()).abs().max().item())
        fwd = graph_ms(lambda: tgn._forward(x, 32, w, b, 1e-5, silu, **kw))
        bwd = graph_ms(lambda: tgn._backward(dy, x, w, b, gmean, rstd, 32, silu, True, **kw))
        rows[tiles] = (fwd, bwd, diff)
    return {"rows": rows, "map_bytes": x.numel() * x.element_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shapes", type=int, default=len(NORMS), help="the first N (channels, side) of NORMS only")
    p.add_argument("--shipped", action="store_true", help="the kernels as shipped only, no sweep")
    args = p.parse_args()
    setup_cuda()
    rate = copy_rate()
    shipped = None if args.shipped else tgn.TILES
    configs = [None] if args.shipped else sweep()
    totals = {"shipped": [0.0, 0.0], "best_per_shape": [0.0, 0.0], "floor": [0.0, 0.0]}
    per_config = {t: [0.0, 0.0] for t in configs}
    for c, side, with_silu, without in NORMS[:args.shapes]:
        for silu, count in ((True, with_silu), (False, without)):
            if not count:
                continue
            m = measure(args.batch, c, side, silu, configs)
            rows = m["rows"]
            floor = (3 * m["map_bytes"] / rate, 5 * m["map_bytes"] / rate)
            best = (min(rows, key=lambda t: rows[t][0]), min(rows, key=lambda t: rows[t][1]))
            for i in range(2):
                totals["shipped"][i] += count * rows[shipped][i]
                totals["best_per_shape"][i] += count * rows[best[i]][i]
                totals["floor"][i] += count * floor[i]
                for t in configs:
                    per_config[t][i] += count * rows[t][i]
            emit({"shape": [args.batch, c, side, side], "silu": silu, "per_step": count,
                  "floor_ms": [round(f, 4) for f in floor],
                  "shipped_ms": [round(v, 4) for v in rows[shipped][:2]],
                  "best_forward": [list(best[0] or []), round(rows[best[0]][0], 4)],
                  "best_backward": [list(best[1] or []), round(rows[best[1]][1], 4)],
                  "max_diff_from_shipped": round(max(r[2] for r in rows.values()), 4),
                  "configs_ms": {"-".join(map(str, t or ["shipped"])): [round(v, 4) for v in rows[t][:2]]
                                 for t in configs}})
    single = [min(per_config, key=lambda t: per_config[t][i]) for i in range(2)]
    out = {k: [round(v, 3) for v in vs] for k, vs in totals.items()}
    out["best_single_forward"] = [list(single[0] or []), round(per_config[single[0]][0], 3)]
    out["best_single_backward"] = [list(single[1] or []), round(per_config[single[1]][1], 3)]
    print(json.dumps({"batch": args.batch, "shipped": list(shipped or []), "step_ms_forward_backward": out,
                      "copy_rate_GBps": round(rate / 1e6)}), flush=True)


if __name__ == "__main__":
    main()
