"""A teacher that ships its own text encoder is conditioned through it, on the student's captions."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dmm.objectives.dmm import StepInputs
from dmm.recipes import parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world
from tests.teacher_reference import direct_targets, perturb_text_encoders


@pytest.fixture(scope="module")
def own_te_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_te")
    world = tiny_world.build(root / "w", "sdxl", teachers=("a", "b"))
    perturb_text_encoders(world.teachers["b"], seed=7)
    return world


@pytest.mark.parametrize("choice", ["auto", "base"])
def test_teacher_targets_use_its_own_text_encoders(own_te_world, tmp_path, choice):
    world = own_te_world
    raw = tiny_recipe_dict(world, tmp_path / "run", loss={"lambda_feat": 0.0, "lambda_adv": 0.0})
    for teacher in raw["teachers"]:
        teacher["text_encoder"] = choice
    recipe = parse_recipe(raw)
    trainer = DistillationTrainer(recipe)
    assert sorted(trainer.teacher_captions) == ([1] if choice == "auto" else [])
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([3, 250, 600, 999])
    captions = ["red circle", "", "blue square", "red square"]  # one dropped caption, as after CFG dropout
    cond = trainer.base.encode_captions(captions)
    groups = trainer.micro_groups[0]
    assert groups == {0: [0, 2], 1: [1, 3]}
    out, _ = trainer.objective.teacher_outputs(x, t, StepInputs(x, captions, cond), groups, want_features=False)

    own = direct_targets(world.teachers["b"], x[[1, 3]], t[[1, 3]], [captions[1], captions[3]], 16)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    if choice == "auto":
        torch.testing.assert_close(out[[1, 3]], own)
    else:  # conditioned through the base's encoders: not the teacher's own pipeline
        assert (out[[1, 3]] - own).abs().max() > 1e-4
    # Teacher a has the base's encoders: its targets equal its own pipeline's as well.
    torch.testing.assert_close(out[[0, 2]], direct_targets(world.teachers["a"], x[[0, 2]], t[[0, 2]],
                                                           [captions[0], captions[2]], 16))


def test_training_step_with_an_own_text_encoder_teacher(own_te_world, tmp_path):
    recipe = tiny_world.recipe(own_te_world, tmp_path / "run", train={"max_steps": 2})
    trainer = DistillationTrainer(recipe)
    assert sorted(trainer.teacher_captions) == [1]
    metrics = trainer.train_step(next(iter(trainer.stream)))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.slow
def test_two_ranks_each_holds_and_uses_its_own_teachers_encoders(own_te_world, tmp_path):
    """fsdp2 over gloo: rank 1's teacher brings its own text encoder, rank 0's does not."""
    from tests.distributed.launch import launch, tail
    from tests.distributed.world import recipe_dict, write_recipe

    raw = recipe_dict(own_te_world, tmp_path / "run", engine="fsdp2", teachers=2)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = launch(["own_te", str(recipe), str(tmp_path / "out")])
    assert proc.returncode == 0, tail(proc)
    ranks = [json.loads((tmp_path / "out" / f"own_te.rank{r}.json").read_text()) for r in range(2)]
    assert [r["teacher"] for r in ranks] == [0, 1]
    assert ranks[0]["own_encoders"] == [] and ranks[1]["own_encoders"] == [1]
    assert all(r["max_diff"] < 1e-5 and r["finite"] for r in ranks), ranks
