"""Score distillation: MSE between student and teacher outputs.

The trainer hands over the teacher's output already in the student's parameterisation
(`dmm.diffusion.convert_prediction`), so the loss is a plain MSE on the same quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def score_distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_out.float(), teacher_out.detach().float())
