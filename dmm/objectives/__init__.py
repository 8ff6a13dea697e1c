"""Objectives: what one training micro-step computes. The loop (dmm/train/trainer.py) stays one.

The trainer owns the engine, data, checkpoints, resume, logging and signals; an objective owns the
losses of a stage: `dmm` (score distillation + feature imitation + multi-class adversarial loss),
and the stages that build on it. Each is an entry of `OBJECTIVES` (kind "objective") whose object
is a class `Objective(trainer, options)`; a recipe names it in `objective.name` with its typed
`objective.options`. A user objective registers itself from a recipe plugin like any other part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmm.registry import Registry

OBJECTIVES: Registry[type] = Registry("objective", builtins=("dmm.objectives.dmm",))


class Objective:
    """One stage's step. `trainer` is the loop's state (recipe, engine, base pipeline, teachers,
    models once prepared, the CPU generator saved in checkpoints); the objective reads it and
    computes, it never steps optimizers or writes files."""

    def __init__(self, trainer: Any, options: Any):
        self.trainer = trainer
        self.options = options

    def trained_models(self, student: nn.Module) -> dict[str, nn.Module]:
        """The models the engine trains (each gets an optimizer), the student first."""
        return {"student": student}

    def micro_step(self, batch: dict, styles: torch.Tensor, scale: float,
                   groups: dict[int, list[int]]) -> dict[str, torch.Tensor]:
        """Forward and backward (through `trainer.engine.backward`) of one micro-batch; the losses."""
        raise NotImplementedError(f"objective {type(self).__name__} does not define micro_step")

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


__all__ = ["OBJECTIVES", "Objective", "make_objective"]
