"""THE learning-rate schedule and weight-decay groups, shared by the warm start and the update.

    lr(step) = lr · (step + 1) / warmup                   for step < warmup (linear warm-up)
             = LR_SCHEDULES[schedule](lr, progress, r)    after, progress = (step − warmup) / (total − warmup),
                                                          held at 1 from ``total`` on
    constant: lr;   cosine: floor + (lr − floor) · ½ · (1 + cos(π · progress)), floor = r · lr

Weight decay applies to matrices only (not norms or biases; a tied embedding counts as a matrix).
No torch import: the groups are built from whatever ``named_parameters()`` yields.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

__all__ = ["LR_SCHEDULES", "learning_rate", "decay_groups"]


def _constant(lr: float, progress: float, min_ratio: float) -> float:
    return lr


def _cosine(lr: float, progress: float, min_ratio: float) -> float:
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# name -> (peak lr, progress in [0, 1] after the warm-up, min ratio) -> lr
LR_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "constant": _constant,
    "cosine": _cosine,
}


def learning_rate(step: int, lr: float, *, warmup_steps: int, schedule: str, total_steps: int,
                  min_ratio: float) -> float:
    """The learning rate at optimizer step ``step`` (0-based; the update counts over all iterations)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    try:
        fn = LR_SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}") from None
    return fn(lr, progress, min_ratio)


def decay_groups(named_parameters: Iterable, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on parameters of 2+ dimensions, 0 on the rest; empty
    groups dropped."""
    decay, no_decay = [], []
    for _, p in named_parameters:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
