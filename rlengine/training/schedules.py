"""Learning-rate schedules as multipliers of the base rate, one value per optimizer step."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Schedule = Literal["inverse_sqrt", "cosine", "linear", "constant"]
SCHEDULES = get_args(Schedule)


def lr_multiplier(step: int, *, schedule: Schedule, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Every schedule warms up linearly over ``warmup_steps`` (step s gets (s + 1) / warmup).
    Then ``inverse_sqrt`` (the Secrets of RLHF II reward models') decays as
    sqrt(warmup / (s + 1)), continuous at the end of warm-up; ``cosine`` and ``linear`` fall from
    1 to ``min_ratio`` at ``total_steps``; ``constant`` stays at 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: Schedule, warmup_steps: int,
                   total_steps: int, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_ratio}")
    lr_multiplier(0, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule=schedule, warmup_steps=warmup_steps,
                                              total_steps=total_steps, min_ratio=min_ratio))
