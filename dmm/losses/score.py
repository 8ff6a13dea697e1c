"""Score distillation: MSE between student and teacher outputs.

The trainer hands over the teacher's output already in the student's parameterisation
(`dmm.diffusion.convert_prediction`), so the loss is a plain MSE on the same quantity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SCORE_PART = "score_part/"  # micro-step metrics: one teacher's part of the batch's score loss


def score_distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_out.float(), teacher_out.detach().float())


def score_parts(student_out: torch.Tensor, teacher_out: torch.Tensor, groups: dict[int, Sequence[int]],
                style_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each teacher's part of the score loss: the loss on its samples times their share of the batch.

    Parts add up to the batch's score loss and average over micro-steps like it does;
    `TrainingBoard.log_step` divides by the teacher's share of the step to log its own mean.
    `groups`: the rows each teacher supervises."""
    student_out, batch = student_out.detach(), student_out.shape[0]
    parts = {}
    for i, rows in groups.items():
        if len(rows):
            idx = torch.as_tensor(list(rows), device=student_out.device)
            parts[SCORE_PART + style_names[i]] = (score_distillation_loss(student_out[idx], teacher_out[idx])
                                                  * (len(rows) / batch))
    return parts
