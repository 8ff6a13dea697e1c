"""Objectives: what one training micro-step computes. The loop (dmm/train/trainer.py) stays one.

The trainer owns the engine, data, checkpoints, resume, logging and signals; an objective owns the
losses of a stage: `dmm` (score distillation + feature imitation + multi-class adversarial loss),
and the stages that build on it. Each is an entry of `OBJECTIVES` (kind "objective") whose object
is a class `Objective(trainer, options)`; a recipe names it in `objective.name` with its typed
`objective.options`. A user objective registers itself from a recipe plugin like any other part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dmm.pipeline import merged_style_names
from dmm.registry import Registry

OBJECTIVES: Registry[type] = Registry("objective", builtins=("dmm.objectives.dmm", "dmm.objectives.incremental",
                                                               "dmm.objectives.splam"))


class Objective:
    """One stage's step. `trainer` is the loop's state (recipe, engine, base pipeline, teachers,
    models once prepared, the CPU generator saved in checkpoints); the objective reads it and
    computes, it never steps optimizers or writes files."""

    def __init__(self, trainer: Any, options: Any):
        self.trainer = trainer
        self.options = options

    # What the objective makes of a recipe, known before any model loads (classmethods: export and
    # the layout need them without a trainer).
    @classmethod
    def student_styles(cls, teachers: list[str], init_from: str, options: Any) -> list[str]:
        """The student's style names, in codebook order."""
        return list(teachers)

    @classmethod
    def slot_names(cls, teachers: list[str], init_from: str, options: Any) -> list[str]:
        """The supervisors the rank layout distributes (teachers, and any other target the objective has)."""
        return list(teachers)

    @classmethod
    def student_config(cls, options: Any) -> dict:
        """UNet config entries the student needs beyond the base's (e.g. SPLAM's time_cond_proj_dim)."""
        return {}

    @classmethod
    def export_sampling(cls, options: Any) -> dict | None:
        """How the exported model samples, when not the base's way (e.g. SPLAM: LCM scheduler, 4 steps)."""
        return None

    @classmethod
    def memory_parts(cls, recipe: Any, options: Any) -> dict:
        """What a step holds beyond the student, for the dry run (dmm.train.dryrun) to size without a
        trainer: "discriminator" (trained_models has one), "teacher_features" (batch-sized copies of the
        teachers' fp32 block outputs alive through the student's step), "teacher_calls" (no-grad calls
        of each teacher per step, one after another), "target_networks" (names of whole fp32 copies
        of the student that every rank holds and forwards without grad each step: emas() that are
        called, e.g. SPLAM's), "student_rows" (rows the student forwards with grad per sample, e.g. 2
        when each sample's unconditional branch rides along in the same forward)."""
        return {"discriminator": False, "teacher_features": int(recipe.loss.lambda_feat > 0), "teacher_calls": 1,
                "target_networks": (), "student_rows": 1}

    @classmethod
    def check(cls, recipe: Any, options: Any) -> None:
        """Refuse a recipe this objective cannot run, before any model loads."""
        if recipe.model.init_from:
            check_init_from(recipe.model.init_from, recipe.model.base, recipe.style_names)

    def class_labels(self, slots: torch.Tensor) -> torch.Tensor:
        """The student's style index of each sample from its supervisor slot."""
        return slots

    def trained_models(self, student: nn.Module) -> dict[str, nn.Module]:
        """The models the engine trains (each gets an optimizer), the student first."""
        return {"student": student}

    def micro_step(self, batch: dict, styles: torch.Tensor, scale: float,
                   groups: dict[int, list[int]]) -> dict[str, torch.Tensor]:
        """Forward and backward (through `trainer.engine.backward`) of one micro-batch; the losses."""
        raise NotImplementedError(f"objective {type(self).__name__} does not define micro_step")

    def emas(self) -> dict[str, Any]:
        """Weight averages of the student the objective keeps (name -> `dmm.models.ema.WeightEMA`), the same
        on every rank; the trainer updates them after each student step and saves them in checkpoints."""
        return {}

    def state_dict(self) -> dict:
        """Objective state that must survive a resume (e.g. an EMA target); saved per rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"objective {type(self).__name__} has no state but the checkpoint holds "
                             f"{sorted(state)}: was it written by another objective?")


def make_objective(name: str, trainer: Any, raw_options: dict | None) -> Objective:
    entry = OBJECTIVES.get(name)
    return entry.obj(trainer, entry.parse_options(raw_options, "objective.options"))


def objective_class(recipe: Any) -> tuple[type[Objective], Any]:
    """The recipe's objective class and its parsed options."""
    entry = OBJECTIVES.get(recipe.objective.name)
    return entry.obj, entry.parse_options(recipe.objective.options, "objective.options")


def student_style_names(recipe: Any) -> list[str]:
    cls, options = objective_class(recipe)
    return cls.student_styles(recipe.style_names, recipe.model.init_from, options)


def student_config(recipe: Any) -> dict:
    cls, options = objective_class(recipe)
    return cls.student_config(options)


def check_init_from(folder: str, base: str, style_names: list[str] | None) -> list[str]:
    """`model.init_from` is a merged model of this base (with these styles, when given); its style names."""
    where = f"model.init_from ({folder})"
    try:
        names = merged_style_names(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    if style_names is not None and names != list(style_names):
        raise ValueError(f"{where} has the styles {names}, the recipe's teachers are {list(style_names)}: a student "
                         "continues with the same styles in the same order (adding styles is the incremental "
                         "objective's job)")
    ignore = ("style_names", "class_embed_type", "num_class_embeds", "projection_class_embeddings_input_dim",
              "time_cond_proj_dim")

    def config(folder: str | Path) -> dict:
        return {k: v for k, v in UNet2DConditionModel.load_config(str(Path(folder) / "unet")).items()
                if not k.startswith("_") and k not in ignore}

    merged, own = config(folder), config(base)
    differ = sorted(k for k in own if merged.get(k, own[k]) != own[k])
    if differ:
        raise ValueError(f"{where} was not merged on the base {base}: its UNet config differs in {differ[:3]}")
    return names


__all__ = ["OBJECTIVES", "Objective", "check_init_from", "make_objective", "objective_class", "student_config",
           "student_style_names"]
