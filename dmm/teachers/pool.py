"""The teacher pool: frozen teacher UNets (and their own text encoders, when they differ from the
base's), checked against the student before any training.

Whatever goes wrong while a teacher loads (an unreadable file, a broken config, weights that do
not fit, NaN/inf weights, a shape unlike the student's or the base encoder's) becomes one
`TeacherLoadError` naming the teacher, its path and the fix, on the rank that holds it; the
trainer's `agree` then stops every rank with that message instead of a gloo error or a diverged
step later. A rank loads only its own teachers, so it holds only their encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dmm.recipes import TeacherSpec
from dmm.schema import ConfigError
from dmm.teachers.formats import TeacherFileError, empty_encoder, load_teacher_parts, shape_mismatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TeacherLoadError(ValueError):
    """A teacher that cannot be used: `teacher 'name' (path): what is wrong; what to do`."""


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


def check_encoder_shape(name: str, which: str, encoder: nn.Module, base: str | Path) -> None:
    """A teacher's own text encoder must have the base encoder's shapes (any loader, built-in or not)."""
    want = {k: tuple(v.shape) for k, v in empty_encoder(Path(base), which).state_dict().items()}
    mismatch = shape_mismatch(want, {k: tuple(v.shape) for k, v in encoder.state_dict().items()})
    if mismatch is not None:
        raise ValueError(f"teacher {name!r} has a {which} unlike the base's: {mismatch}; use "
                         "text_encoder: base, or a teacher fine-tuned from this base")


def first_non_finite(module: nn.Module) -> str | None:
    """`key (k of n values are NaN/inf)` for the first tensor holding NaN or inf, or None."""
    for key, value in module.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return f"{key} ({bad} of {value.numel()} values are NaN/inf)"
    return None


def teacher_prediction_type(spec: TeacherSpec, default: str) -> str:
    """A teacher pipeline folder's own scheduler says its parameterisation; otherwise the base's."""
    import json

    cfg = Path(spec.path) / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        return default
    try:
        return json.loads(cfg.read_text()).get("prediction_type", default)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise TeacherFileError(f"{cfg} is not a valid scheduler config ({err}); restore it from the "
                               "original checkpoint") from None


@dataclass
class Teacher:
    index: int
    name: str
    unet: UNet2DConditionModel
    prediction_type: str
    # The teacher's own encoders (frozen, eval, teacher dtype) where they differ from the base's
    # (`text_encoder: auto`) or were required (`own`); None: it is conditioned through the base's.
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None


def _reason(err: BaseException) -> str:
    """One line: our own errors as written, anything else with its type (never a traceback)."""
    text = " ".join(str(err).split())
    if isinstance(err, (TeacherFileError, ConfigError, FileNotFoundError)) or type(err) is ValueError:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_teacher(index: int, spec: TeacherSpec, *, base: str, student_base: nn.Module, dtype: str,
                 default_prediction_type: str) -> Teacher:
    where = f"teacher {spec.name!r} ({spec.path})"
    try:
        parts = load_teacher_parts(spec.path, spec.format, base=base, allow_pickle=spec.allow_pickle,
                                   dtype=DTYPES[dtype], options=getattr(spec, "options", None),
                                   where=f"teachers[{index}].options",
                                   text_encoder=getattr(spec, "text_encoder", "auto"))
        prediction_type = teacher_prediction_type(spec, default_prediction_type)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: {_reason(err)}") from None
    except Exception as err:
        raise TeacherLoadError(f"{where}: {_reason(err)}") from err
    for which, module in (("UNet", parts.unet), *parts.encoders().items()):
        bad = first_non_finite(module)
        if bad is not None:
            part = "" if which == "UNet" else f" in its {which}"
            raise TeacherLoadError(f"{where}: non-finite weights{part}, first in {bad}; the checkpoint is corrupt or "
                                   "was saved after its training diverged: use another checkpoint of this teacher")
    try:
        check_teacher_shape(spec.name, parts.unet, student_base)
        for which, module in parts.encoders().items():
            check_encoder_shape(spec.name, which, module, base)
    except ValueError as err:
        raise TeacherLoadError(f"{where}: {str(err).replace(f'teacher {spec.name!r} ', '', 1)}") from None
    for module in (parts.unet, *parts.encoders().values()):
        module.requires_grad_(False).eval()
    return Teacher(index, spec.name, parts.unet, prediction_type, parts.text_encoder, parts.text_encoder_2)


def check_teacher_paths(specs: list[TeacherSpec]) -> None:
    """Fail before loading anything when a teacher path is missing."""
    missing = [f"{s.name}: {s.path}" for s in specs if not Path(s.path).exists()]
    if missing:
        raise FileNotFoundError("teacher path(s) not found: " + "; ".join(missing))
