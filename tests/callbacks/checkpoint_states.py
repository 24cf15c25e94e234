"""Helpers of the checkpoint-writing tests: a small checkpoint dict as Lightning hands it over,
and a check of what a written file holds."""
from __future__ import annotations

import torch


def holds_w(path, value: float) -> bool:
    """Whether the checkpoint file at `path` holds the weight `state(value)` wrote."""
    return torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.full((64,), value))


def state(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64,), value), "b": torch.zeros(3)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.full((64,), value / 2)}},
                                  "param_groups": [{"lr": 1e-4}]}],
            "callbacks": {"ModelCheckpoint": {"best_k_models": {"a.ckpt": torch.tensor(0.5)}}},
            "global_step": 7}
