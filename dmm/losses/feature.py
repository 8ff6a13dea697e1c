"""Feature imitation: MSE between student and teacher block outputs, averaged over blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_imitation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    if not student:
        raise ValueError("no student features were recorded: did the hooks see a forward pass?")
    if student.keys() != teacher.keys():
        raise ValueError(f"student and teacher recorded different blocks: {sorted(student)} vs {sorted(teacher)}")
    losses = [F.mse_loss(student[k].float(), teacher[k].detach().float()) for k in student]
    return torch.stack(losses).mean()
