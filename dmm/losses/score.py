"""Score distillation: MSE between student and teacher outputs in the student's parameterisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmm.diffusion import convert_prediction


def score_distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    *,
    x_t: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    student_type: str = "epsilon",
    teacher_type: str = "epsilon",
) -> torch.Tensor:
    """For SD/SDXL both are noise predictions; a teacher of another prediction type (v, x0) is
    converted to the student's before the MSE."""
    target = teacher_out
    if teacher_type != student_type:
        if x_t is None or t is None or alphas_cumprod is None:
            raise ValueError("converting between prediction types needs x_t, t and alphas_cumprod")
        target = convert_prediction(teacher_out, x_t, t, alphas_cumprod, teacher_type, student_type)
    return F.mse_loss(student_out.float(), target.detach().float())
