"""The teacher pool: frozen teacher UNets, checked against the student before any training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dmm.recipes import TeacherSpec
from dmm.teachers.formats import load_teacher_unet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def first_shape_mismatch(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str | None:
    """The first key (in the reference's order) that is missing or shaped differently, or None."""
    for key, value in reference.items():
        if key not in other:
            return f"{key} (missing)"
        if tuple(other[key].shape) != tuple(value.shape):
            return f"{key} (teacher {tuple(other[key].shape)} vs student {tuple(value.shape)})"
    for key in other:
        if key not in reference:
            return f"{key} (not in the student)"
    return None


def check_teacher_shape(name: str, teacher: nn.Module, student_base: nn.Module) -> None:
    ref = {k: v for k, v in student_base.state_dict().items() if not k.startswith("class_embedding.")}
    mismatch = first_shape_mismatch(ref, teacher.state_dict())
    if mismatch is not None:
        raise ValueError(
            f"teacher {name!r} does not have the student's UNet shape: first mismatched key {mismatch}. "
            "All teachers must be fine-tunes of the same base architecture."
        )


def teacher_prediction_type(spec: TeacherSpec, default: str) -> str:
    """A teacher pipeline folder's own scheduler says its parameterisation; otherwise the base's."""
    import json

    cfg = Path(spec.path) / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("prediction_type", default)
    return default


@dataclass
class Teacher:
    index: int
    name: str
    unet: UNet2DConditionModel
    prediction_type: str


def load_teacher(index: int, spec: TeacherSpec, *, base: str, student_base: nn.Module, dtype: str,
                 default_prediction_type: str) -> Teacher:
    unet = load_teacher_unet(spec.path, spec.format, base=base, allow_pickle=spec.allow_pickle, dtype=DTYPES[dtype])
    check_teacher_shape(spec.name, unet, student_base)
    unet.requires_grad_(False).eval()
    return Teacher(index, spec.name, unet, teacher_prediction_type(spec, default_prediction_type))


def check_teacher_paths(specs: list[TeacherSpec]) -> None:
    """Fail before loading anything when a teacher path is missing."""
    missing = [f"{s.name}: {s.path}" for s in specs if not Path(s.path).exists()]
    if missing:
        raise FileNotFoundError("teacher path(s) not found: " + "; ".join(missing))
