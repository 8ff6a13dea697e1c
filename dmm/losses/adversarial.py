"""Multi-class adversarial loss (Algorithm 1): 2N classes, the first N real styles, the last N fake.

Generator: CE(D(x0_student), i). Discriminator: CE(D(x0_student), N + i) + CE(D(x0_teacher), i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, style: torch.Tensor, num_styles: int) -> None:
    if logits.shape[-1] != 2 * num_styles:
        raise ValueError(f"expected 2N = {2 * num_styles} logits, got {logits.shape[-1]}")
    if style.dtype != torch.long or style.shape[0] != logits.shape[0]:
        raise ValueError("style must be a LongTensor of one index per sample")


def generator_loss(fake_logits: torch.Tensor, style: torch.Tensor, num_styles: int) -> torch.Tensor:
    _check(fake_logits, style, num_styles)
    return F.cross_entropy(fake_logits.float(), style)


def discriminator_loss(
    fake_logits: torch.Tensor, real_logits: torch.Tensor, style: torch.Tensor, num_styles: int
) -> torch.Tensor:
    _check(fake_logits, style, num_styles)
    _check(real_logits, style, num_styles)
    return F.cross_entropy(fake_logits.float(), style + num_styles) + F.cross_entropy(real_logits.float(), style)
