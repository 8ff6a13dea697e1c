"""`optim.lr_schedule`: the curve by hand, the optimizers follow it, and a killed run resumes on it exactly."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dmm.recipes import RecipeError
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer, lr_factor
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("lr"))


def test_curves_by_hand():
    f = lambda s, schedule, floor=0.1: lr_factor(s, schedule=schedule, warmup=2, total=12, floor=floor)  # noqa: E731
    assert [f(s, "constant") for s in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]
    assert [f(s, "linear") for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])
    assert f(7, "cosine", floor=0.0) == pytest.approx(0.5)  # half-way through the decay
    assert f(2 + 10 / 3, "cosine", floor=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert f(12, "cosine") == pytest.approx(0.1) and f(50, "cosine") == pytest.approx(0.1)
    assert lr_factor(0, schedule="cosine", warmup=0, total=4, floor=0.0) == 1.0


def test_optimizers_follow_the_schedule(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 4},
                               optim={"lr": 1e-3, "disc_lr": 2e-3, "lr_schedule": "linear", "min_lr_ratio": 0.0})
    trainer = DistillationTrainer(recipe)
    data = iter(trainer.stream)
    seen = []
    for _ in range(4):
        groups = {k: s.optimizer.param_groups for k, s in trainer.engine.schedulers.items()}
        seen.append([g["lr"] for g in groups["student"]] + [groups["disc"][0]["lr"]])
        trainer.train_step(next(data))
    style_mult = recipe.optim.style_lr_multiplier
    for step, lrs in enumerate(seen):
        share = 1.0 - step / 4
        assert lrs[0] == pytest.approx(1e-3 * share) and lrs[-1] == pytest.approx(2e-3 * share)
        assert max(lrs[:-1]) == pytest.approx(1e-3 * share * max(1.0, style_mult))


def test_killed_run_resumes_on_the_same_curve(world, tmp_path):
    def recipe(out, schedule="cosine", **train):
        return tiny_world.recipe(world, tmp_path / out, optim={"lr_schedule": schedule, "min_lr_ratio": 0.0},
                                 train={"max_steps": 4, "checkpoint_every": 2, **train})

    run(recipe("full"))
    shutil.copytree(tmp_path / "full", tmp_path / "killed")  # as if killed after step 2's checkpoint
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "killed" / "merged")
    run(recipe("killed", resume="latest"))
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-00000004" / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run(recipe("constant", "constant"))  # the curve matters: a constant lr ends elsewhere
    c = load_file(str(tmp_path / "constant" / "checkpoints" / "step-00000004" / "student.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_schedule_is_refused(world, tmp_path):
    with pytest.raises(RecipeError, match="lr_schedule"):
        tiny_world.recipe(world, tmp_path / "run", optim={"lr_schedule": "step"})
