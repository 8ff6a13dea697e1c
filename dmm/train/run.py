"""Run a recipe end to end: distil, then export the merged model (the launchers call this)."""

from __future__ import annotations

import logging
from pathlib import Path

from dmm.objectives import objective_class, student_style_names
from dmm.recipes import Recipe, parse_recipe
from dmm.train.export import build_student, export_merged
from dmm.train.signals import StopSignals
from dmm.train.trainer import DistillationTrainer, set_threads

log = logging.getLogger("dmm.train")


def run(recipe: Recipe, engine=None, stop_flag=None) -> Path | None:
    """Returns the merged model folder (on the main rank; None elsewhere). A recipe with `stages:`
    runs each stage in turn (each resumes like a run of its own), the last one's merged model is
    the result.

    `stop_flag`: a `StopSignals` (default: SIGINT and SIGTERM), whose handlers are in place while
    training, or any callable the trainer asks at each step boundary. A stop raises
    `StopRequested` after the checkpoint is written; nothing is exported then."""
    set_threads()
    if engine is None and recipe.distributed.engine == "none":
        from dmm.distributed import launch_env

        if launch_env().distributed:
            raise ValueError(f"started as {launch_env().world_size} processes but distributed.engine is 'none': "
                             "set distributed.engine to deepspeed or fsdp2 (--set distributed.engine=fsdp2)")
    if stop_flag is None:
        stop_flag = StopSignals()
    merged = None
    for k, stage in enumerate(recipe.stages):
        log.info("stage %d of %d: %s (objective %s)", k + 1, len(recipe.stages), stage["name"],
                 stage["objective"]["name"])
        merged = run_one(parse_recipe(stage), engine, stop_flag)
    return merged if recipe.stages else run_one(recipe, engine, stop_flag)


def run_one(recipe: Recipe, engine, stop_flag) -> Path | None:
    trainer = DistillationTrainer(recipe, engine=engine, stop_flag=stop_flag)
    if isinstance(stop_flag, StopSignals):
        with stop_flag.installed():
            trainer.fit()
    else:
        trainer.fit()
    state = trainer.export_state_dict()
    merged = None
    if trainer.engine.is_main:
        cls, options = objective_class(recipe)
        student = build_student(recipe.model.base, student_style_names(recipe), state, cls.student_config(options))
        merged = export_merged(student, recipe.model.base, Path(recipe.train.output_dir) / "merged",
                               {"step": trainer.step, "recipe": recipe.name,
                                "teachers": {t.name: t.path for t in recipe.teachers},
                                "weights": "ema" if "student" in trainer.emas else "raw"},
                               cls.export_sampling(options))
        log.info("merged model written to %s", merged)
    trainer.engine.barrier()
    return merged
