"""Learning rate: linear warmup, then cosine decay to a floor; the one schedule of both applications.

A pure function of the step, so a resumed run needs no scheduler state: the checkpoint's step is
enough, and there is no scheduler for Accelerate to step once per process. Steps count from 1 (the
first optimizer step): pre-training passes its step, fine-tuning its 0-based step + 1.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (1-based).

    Steps 1..warmup_steps rise linearly to ``lr`` (step k gets lr * k / warmup_steps); from there to
    ``total_steps`` a half cosine falls to ``min_lr_ratio * lr``; later steps stay at the floor.
    """
    if step < 1:
        raise ValueError(f"lr_at: step must be >= 1 (steps count from 1), got {step}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    floor = lr * min_lr_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
