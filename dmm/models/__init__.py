"""Models: the style-promptable student, its discriminator, and the architecture map."""

from dmm.models.student import StyleCodebook, StyleUNet2DConditionModel, resolve_style

__all__ = ["StyleCodebook", "StyleUNet2DConditionModel", "resolve_style"]
