"""The `incremental` objective: add M new styles to a merged model of N without forgetting the old.

The student starts from `model.init_from` (a merged model) with M new codebook rows appended for
the recipe's teachers, which supervise them with the `dmm` losses. A frozen copy of the starting
student supervises randomly chosen OLD styles with the same losses: it takes one more slot in the
rank layout (a rank group of its own, or shared with teachers when ranks are fewer). Without it
(`regularizer: false`, the paper's Table 2 ablation) nothing holds the old styles in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import OBJECTIVES, check_init_from
from dmm.objectives.dmm import DMMObjective
from dmm.pipeline import merged_style_names
from dmm.schema import setting
from dmm.teachers.pool import DTYPES, Teacher

PREVIOUS = "previous student"  # the regulariser's slot name (TensorBoard, layout)


@dataclass(frozen=True)
class IncrementalOptions:
    regularizer: bool = setting(True, help="a frozen copy of the starting student supervises random old styles "
                                           "(false: the ablation without it)")


@OBJECTIVES.register("incremental", options=IncrementalOptions,
                     description="append the recipe's teachers as new styles to model.init_from; a frozen copy of "
                                 "it keeps the old styles (dmm losses for both)")
class IncrementalObjective(DMMObjective):
    @classmethod
    def student_styles(cls, teachers, init_from, options):
        return [*merged_style_names(init_from), *teachers]

    @classmethod
    def slot_names(cls, teachers, init_from, options):
        return [*teachers, PREVIOUS] if options.regularizer else list(teachers)

    @classmethod
    def check(cls, recipe, options):
        if not recipe.model.init_from:
            raise ValueError("objective incremental adds styles to a merged model: set model.init_from to its folder")
        if recipe.loss.mix_share > 0:
            raise ValueError("loss.mix_share is not supported by the incremental objective (a mixture with the "
                             "regulariser's random old styles is not defined): set it to 0")
        old = check_init_from(recipe.model.init_from, recipe.model.base, None)
        clash = sorted(set(old) & set(recipe.style_names))
        if clash:
            raise ValueError(f"new style name(s) {clash} are already styles of {recipe.model.init_from} ({old}); "
                             "rename the new teachers")

    def __init__(self, trainer, options):
        super().__init__(trainer, options)
        r = trainer.recipe
        self.num_old = len(trainer.student_styles) - len(r.teachers)
        self.slot = len(r.teachers)  # the regulariser's slot, when on
        if options.regularizer and self.slot in trainer.local_teachers:
            frozen = StyleUNet2DConditionModel.from_pretrained(str(Path(r.model.init_from) / "unet"),
                                                               local_files_only=True)
            frozen = frozen.to(trainer.device, DTYPES[r.model.teacher_dtype]).requires_grad_(False).eval()
            trainer.teachers[self.slot] = Teacher(self.slot, PREVIOUS, frozen, trainer.base.prediction_type)

    def class_labels(self, slots: torch.Tensor) -> torch.Tensor:
        """New teacher i -> style N + i; the regulariser's samples -> a random old style each (drawn
        from the trainer's generator, so a resumed run draws the same)."""
        labels = slots + self.num_old
        if not self.options.regularizer:
            return labels
        # Drawn for every sample whatever its slot: the same random numbers on every rank and step.
        old = torch.randint(0, self.num_old, (slots.shape[0],), generator=self.trainer.generator)
        return torch.where(slots == self.slot, old.to(slots.device), labels)


__all__ = ["IncrementalObjective", "IncrementalOptions", "PREVIOUS"]
