"""The consistency-distillation distance (SPLAM, LCM): pseudo-Huber, robust to a few large errors."""

from __future__ import annotations

import torch


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c): quadratic below c, linear above, computed in fp32."""
    d = pred.float() - target.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


__all__ = ["pseudo_huber_loss"]
