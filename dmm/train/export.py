"""Export the merged model: a diffusers pipeline folder (base components + the student UNet)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, LCMScheduler

from dmm.io import atomic_write_json
from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import OBJECTIVES
from dmm.pipeline import MERGE_INFO, UNET_MODULE, save_pipeline_folder, write_style_unet_module


def build_student(base: str | Path, style_names: list[str], state: dict[str, torch.Tensor],
                  config_overrides: dict | None = None):
    from diffusers import UNet2DConditionModel

    unet_dir = Path(base) / "unet"
    if not (unet_dir / "config.json").is_file():
        # Never let diffusers read a missing local folder as a model-hub name.
        raise FileNotFoundError(f"base model folder {base} has no unet/config.json: the merged model is built on "
                                "the base's config; point base= (or the recipe's model.base) at its diffusers folder")
    config = UNet2DConditionModel.load_config(str(unet_dir), local_files_only=True)
    config = {**{k: v for k, v in config.items() if not k.startswith("_")}, **(config_overrides or {})}
    student = StyleUNet2DConditionModel(**config, style_names=list(style_names))
    if state is not None:
        student.load_state_dict(state, strict=True)
    return student


def export_merged(student: StyleUNet2DConditionModel, base: str | Path, out: str | Path,
                  info: dict | None = None, sampling: dict | None = None) -> Path:
    """Written to a temporary folder and moved into place: an older export survives a crash.
    The UNet class ships inside the folder (diffusers' custom component), so the folder also loads
    with `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)` without dmm.
    `sampling` (a few-step objective's): the folder's scheduler becomes that one (LCM), and the
    settings it samples with are recorded in the merge info."""
    pipe = DiffusionPipeline.from_pretrained(str(base), unet=student, local_files_only=True)
    if sampling is not None:
        if sampling.get("scheduler") != "lcm":
            raise ValueError(f"unknown export scheduler {sampling.get('scheduler')!r} (known: lcm)")
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        info = {**(info or {}), "sampling": sampling}

    def finish(tmp: Path) -> None:
        write_style_unet_module(tmp / "unet")
        index = json.loads((tmp / "model_index.json").read_text())
        index["unet"] = [UNET_MODULE, StyleUNet2DConditionModel.__name__]
        atomic_write_json(tmp / "model_index.json", index)
        atomic_write_json(tmp / MERGE_INFO, {"style_names": student.style_names, **(info or {})})

    return save_pipeline_folder(pipe, out, finish)


def recipe_student_styles(recipe: dict) -> list[str]:
    """The student's style names from a saved recipe (teachers' names, and any the objective adds)."""
    cls, options = recipe_objective(recipe)
    return cls.student_styles([t["name"] for t in recipe["teachers"]], recipe["model"].get("init_from", ""), options)


def recipe_objective(recipe: dict):
    """The saved recipe's objective class and parsed options."""
    objective = recipe.get("objective") or {"name": "dmm", "options": {}}
    entry = OBJECTIVES.get(objective["name"])
    return entry.obj, entry.parse_options(objective.get("options"), "objective.options")


def checkpoint_student_state(checkpoint: Path, recipe: dict) -> dict[str, torch.Tensor]:
    """The full student weights of any engine's checkpoint, consolidated in this one process by
    the engine whose format the folder holds."""
    from dmm.engines import engine_holding

    names = recipe_student_styles(recipe)
    cls, options = recipe_objective(recipe)
    return engine_holding(checkpoint, "student").consolidate(
        checkpoint, "student",
        lambda: build_student(recipe["model"]["base"], names, None, cls.student_config(options)).state_dict())


def export_from_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                           weights: str = "auto") -> Path:
    """Export from a checkpoint folder of any engine (sharded ones are consolidated here).
    `base`: the base model's folder, when it moved since training (default: the recipe's).
    `weights`: "ema" (the `optim.ema_decay` average), "raw" (the trained weights) or "auto" (the
    average when the checkpoint keeps one, as the end of training does)."""
    from dmm.models.ema import ema_state

    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw, got {weights!r}")
    checkpoint = Path(checkpoint)
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no trainer_state.json)")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    recipe = state["recipe"]
    if base is not None:
        recipe["model"]["base"] = str(base)
    names = recipe_student_styles(recipe)
    average = ema_state(checkpoint) if weights != "raw" else None
    if weights == "ema" and average is None:
        raise FileNotFoundError(f"{checkpoint} keeps no weight average (trained without optim.ema_decay): "
                                "export with weights='raw'")
    trained = checkpoint_student_state(checkpoint, recipe)
    cls, options = recipe_objective(recipe)
    student = build_student(recipe["model"]["base"], names, {**trained, **(average or {})},
                            cls.student_config(options))
    return export_merged(student, recipe["model"]["base"], out,
                         {"step": state["step"], "recipe": recipe["name"],
                          "weights": "ema" if average is not None else "raw"}, cls.export_sampling(options))
