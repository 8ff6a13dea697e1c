"""TensorBoard of a training run: losses, each teacher's score loss, learning rates, the resolved
recipe (once, at start) and sample grids of every style at each checkpoint.

Nothing here may change what training computes, so that a run with grids equals one without, bit
for bit, and kill-and-resume stays exact: grids are drawn from their own seeded generators inside
`torch.random.fork_rng` (the global RNG state comes back as it was), under `no_grad`, and the
student's train/eval modes and held style are put back. Grid prompts are read from the shards in
file order, never from the training stream, so they are the same after a resume.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from dmm.data import ShardStream
from dmm.losses.score import SCORE_PART
from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import student_style_names
from dmm.pipeline import with_unet
from dmm.sampling import consecutive_seeds, sample_images
from dmm.train.export import build_student


def first_captions(stream: ShardStream, count: int, max_samples: int = 4096) -> list[str]:
    """The first `count` distinct non-empty captions of the stream's shards, in the shards' own
    order (a fresh unshuffled reader: the training stream's position is not touched)."""
    reader = type(stream)(stream.urls, batch_size=1, resolution=stream.resolution, seed=stream.seed,
                          image_key=stream.image_key, caption_key=stream.caption_key, shuffle_buffer=0)
    found: list[str] = []
    for batch in itertools.islice(reader, max_samples):
        caption = batch["captions"][0]
        if caption and caption not in found:
            found.append(caption)
            if len(found) == count:
                break
    return found


@contextlib.contextmanager
def student_for_sampling(engine, student, recipe):
    """The student as it is now, ready to sample on the main rank (None on the others).

    Collective when the engine shards it: every rank must enter. A plain one-process student is
    used in place (modes and held style restored on exit); a wrapped or sharded one is gathered
    with the engine's `full_state_dict` into a temporary copy on the main rank."""
    if engine.world_size == 1 and type(student) is StyleUNet2DConditionModel:
        modes = [(m, m.training) for m in student.modules()]
        held = student.class_embedding.held
        student.eval()
        try:
            yield student
        finally:
            student.class_embedding.held = held
            for module, mode in modes:
                module.training = mode
        return
    state = engine.full_state_dict("student")
    if not engine.is_main:
        yield None
        return
    with torch.random.fork_rng(devices=_rng_devices(engine.device)):  # random init of the copy
        copy = build_student(recipe.model.base, student_style_names(recipe), state)
    del state
    yield copy.to(engine.device).eval()


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


class TrainingBoard:
    """The main rank's TensorBoard writer of one run (`<run>/tb`). Resumed from the checkpoint of
    `step`, it hides what a killed run logged after that step (TensorBoard's purge_step), so
    curves do not fold back."""

    def __init__(self, folder: str | Path, recipe, micro_styles: Sequence[torch.Tensor], step: int = 0,
                 names: Sequence[str] | None = None):
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)
        self.recipe = recipe
        names = list(names or recipe.style_names)  # the layout's supervisor slots
        rows = [s for styles in micro_styles for s in styles.tolist()]
        # This rank's share of each teacher's samples per step (layout.py fixes it for the run).
        self.shares = {names[i]: rows.count(i) / len(rows) for i in set(rows)}
        self.prompts: list[str] | None = list(recipe.log.sample_prompts) or None
        self.writer.add_text("recipe", _as_code(yaml.safe_dump(recipe.to_dict(), sort_keys=False)), step)

    def log_step(self, metrics: dict[str, float], step: int, schedulers: dict | None = None) -> None:
        """Losses as `train/<name>`, each teacher's own score loss as `train/score/<style>`, and the
        learning rate of every param group as `lr/<model>/<group name or index>`."""
        for k, v in metrics.items():
            if k.startswith(SCORE_PART):
                name = k[len(SCORE_PART):]
                self.writer.add_scalar(f"train/score/{name}", v / self.shares[name], step)
            else:
                self.writer.add_scalar(f"train/{k}", v, step)
        for which, scheduler in (schedulers or {}).items():
            groups = scheduler.optimizer.param_groups
            for i, lr in enumerate(scheduler.get_last_lr()):
                self.writer.add_scalar(f"lr/{which}/{groups[i].get('name', i)}", lr, step)

    def sample_grids(self, student: StyleUNet2DConditionModel, base_pipe, stream: ShardStream, step: int) -> None:
        """One image per style (`samples/<style>`): the same prompts and seeds, one column each."""
        started = time.perf_counter()
        opts = self.recipe.log
        if self.prompts is None:
            self.prompts = first_captions(stream, opts.num_prompts) or [""]
        pipe = with_unet(base_pipe, student)
        pipe.set_progress_bar_config(disable=True)
        seeds = consecutive_seeds(opts.sample_seed, len(self.prompts))
        size = self.recipe.data.resolution
        with torch.random.fork_rng(devices=_rng_devices(student.device)):
            for i, name in enumerate(student.style_names):
                student.set_style(i)
                images = sample_images(pipe, self.prompts, seeds, steps=opts.sample_steps, height=size, width=size,
                                       guidance_scale=opts.sample_guidance_scale, output_type="np",
                                       batch_size=len(self.prompts))
                self.writer.add_image(f"samples/{name}", np.concatenate(list(images), axis=1), step,
                                      dataformats="HWC")
        self.writer.add_scalar("perf/sample_grids_s", time.perf_counter() - started, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _as_code(text: str) -> str:
    """TensorBoard renders text as markdown: indent it into a code block so YAML keeps its layout."""
    return "\n".join("    " + line for line in text.splitlines())


def log_sample_grids(board: TrainingBoard | None, engine, student, recipe, base_pipe, stream, step: int) -> None:
    """Every rank calls this at a checkpoint (a sharded student is gathered); the main rank samples."""
    if not recipe.log.samples:
        return
    with student_for_sampling(engine, student, recipe) as ready:
        if ready is not None and board is not None:
            board.sample_grids(ready, base_pipe, stream, step)


__all__ = ["TrainingBoard", "first_captions", "log_sample_grids", "student_for_sampling"]
