"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule is a multiplier m(s) on each param group's base learning rate,
lr(s) = base_lr * m(s), where s counts optimizer steps taken so far (0 for the
first update). With N = total_steps, W = warm-up steps and r = min_lr_ratio:

    warm-up (s < W):   m = s / W                          linear from 0 to 1
    after warm-up:     p = clamp((s - W) / (N - W), 0, 1)  progress through the decay
        constant       m = 1
        linear         m = r + (1 - r) (1 - p)
        cosine         m = r + (1 - r) (1 + cos(pi p)) / 2
        cosine_with_restarts
                       m = r + (1 - r) (1 + cos(pi q)) / 2,  q = frac(p * num_cycles)
                       (back to 1 at the start of each of the num_cycles cycles; r once p = 1)
        polynomial     m = r + (1 - r) (1 - p)^power

`constant_with_warmup` is another name for `constant`: both honour `warmup`.
The multiplier reaches its final value at s = N and stays there if training runs on.

`text_encoder_stop` (S steps, or a fraction f of the run: S = round(f N), at least 1) ends the
text encoder's training: the param group named "text_encoder" gets m = 0 from step S on, so it
is updated on steps 0 .. S-1 only; the other groups keep their schedule. The optimizers of
ldm.optim.registry then leave it unchanged (AdamW's decoupled weight decay is scaled by lr too).
A stop at or after step N never takes effect.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ldm.util import ConfigError

LrLambda = Callable[[int], float]

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_KEY = "model.params.optimizer"
TEXT_ENCODER = "text_encoder"  # the name of the text encoder's param group (build_optimizer)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_schedule(name: str, warmup: int | float = 0, num_cycles: int = 1, power: float = 1.0,
                   min_lr_ratio: float = 0.0, key: str = DEFAULT_KEY) -> None:
    """Validate the schedule settings that do not depend on the run length.

    Raises ConfigError (a ValueError) naming `{key}.<setting>`.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"{key}.scheduler: unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if isinstance(warmup, bool) or not _is_number(warmup):
        raise ConfigError(f"{key}.warmup: expected a number of steps (int) or a fraction of the run "
                          f"(float in [0, 1)), got {warmup!r}")
    if isinstance(warmup, int) and warmup < 0:
        raise ConfigError(f"{key}.warmup: expected a non-negative number of steps, got {warmup}")
    if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
        raise ConfigError(f"{key}.warmup: a float is a fraction of total_steps and must be in [0, 1), got {warmup}; "
                          f"write a number of steps as an integer")
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise ConfigError(f"{key}.num_cycles: expected an integer >= 1, got {num_cycles!r}")
    if not _is_number(power) or power <= 0:
        raise ConfigError(f"{key}.power: expected a number > 0, got {power!r}")
    if not _is_number(min_lr_ratio) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{key}.min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")


def check_text_encoder_stop(stop: int | float | None, key: str = DEFAULT_KEY) -> None:
    """`stop` is null, a number of steps (int >= 1) or a fraction of the run (float in (0, 1))."""
    if stop is None:
        return
    if isinstance(stop, bool) or not _is_number(stop) or (isinstance(stop, int) and stop < 1) or (
            isinstance(stop, float) and not 0.0 < stop < 1.0):
        raise ConfigError(f"{key}.text_encoder_stop: expected a number of steps (int >= 1), a fraction of the run "
                          f"(float in (0, 1)) or null (never stop), got {stop!r}")


def text_encoder_stop_step(stop: int | float | None, total_steps: int) -> int | None:
    """The first step on which the text encoder no longer trains: an int is steps, a float a fraction."""
    if stop is None:
        return None
    return max(1, round(stop * total_steps)) if isinstance(stop, float) else stop


def warmup_steps(warmup: int | float, total_steps: int, key: str = DEFAULT_KEY) -> int:
    """Warm-up length in steps: an int is already steps, a float is a fraction of total_steps."""
    steps = round(warmup * total_steps) if isinstance(warmup, float) else warmup
    if steps >= total_steps:
        raise ConfigError(f"{key}.warmup: {warmup} means {steps} warm-up steps, which must be fewer than "
                          f"the {total_steps} steps of the run")
    return steps


def make_lr_lambda(name: str, total_steps: int, warmup: int | float = 0, num_cycles: int = 1,
                   power: float = 1.0, min_lr_ratio: float = 0.0, key: str = DEFAULT_KEY) -> LrLambda:
    """The multiplier m(step) of schedule `name` over a run of `total_steps` optimizer steps."""
    check_schedule(name, warmup, num_cycles, power, min_lr_ratio, key)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps: expected the run's number of optimizer steps (an integer >= 1), "
                          f"got {total_steps!r}")
    W = warmup_steps(warmup, total_steps, key)
    D = total_steps - W  # length of the decay
    r = float(min_lr_ratio)

    def shape(d: int) -> float:
        """Decay shape after d steps of the decay (0 <= d <= D): 1 at d = 0, 0 at d = D."""
        p = d / D
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        if name == "linear":
            return 1.0 - p
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if name == "cosine_with_restarts":
            if d == D:
                return 0.0
            q = (d * num_cycles % D) / D  # frac(p * num_cycles), exact for integer steps
            return 0.5 * (1.0 + math.cos(math.pi * q))
        return (1.0 - p) ** power  # polynomial

    def lr_lambda(step: int) -> float:
        if step < W:
            return step / W
        return r + (1.0 - r) * shape(min(step - W, D))

    return lr_lambda


def stopped_at(lr_lambda: LrLambda, stop: int) -> LrLambda:
    """`lr_lambda` until step `stop`, 0 from then on."""
    return lambda step: 0.0 if step >= stop else lr_lambda(step)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup: int | float = 0,
                   num_cycles: int = 1, power: float = 1.0, min_lr_ratio: float = 0.0,
                   key: str = DEFAULT_KEY, text_encoder_stop: int | float | None = None,
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with the schedule applied to every param group, each from its own base lr.

    With `text_encoder_stop`, the group named "text_encoder" stops there (module docstring).
    Step it once per optimizer step (Lightning: `"interval": "step"`).
    """
    lr_lambda = make_lr_lambda(name, total_steps, warmup, num_cycles, power, min_lr_ratio, key)
    check_text_encoder_stop(text_encoder_stop, key)
    stop = text_encoder_stop_step(text_encoder_stop, total_steps)
    lambdas = [stopped_at(lr_lambda, stop) if stop is not None and g.get("name") == TEXT_ENCODER else lr_lambda
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
