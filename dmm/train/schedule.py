"""The learning-rate curve shared by the trainer (`optim.lr_schedule`) and the toy world's own training."""

from __future__ import annotations

import math


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, floor: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of the peak: linear warm-up, then
    constant or a decay to `floor` at `total`. A pure function of the step, so a resumed run continues
    the same curve (LambdaLR saves only its step count); a longer `max_steps` on resume stretches it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * done)) if schedule == "cosine" else 1.0 - done
    return floor + (1.0 - floor) * shape
