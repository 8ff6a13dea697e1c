"""Incremental merging: new styles appended to a merged model, a frozen copy of it keeps the old ones."""

from __future__ import annotations

import pytest
import torch

from dmm.objectives.dmm import StepInputs
from dmm.objectives.incremental import PREVIOUS
from dmm.pipeline import load_merged
from dmm.recipes import parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def merged_ab(tmp_path_factory):
    """A world with teachers a, b, c, d and a 2-style merged model of a and b."""
    root = tmp_path_factory.mktemp("incr")
    world = tiny_world.build(root / "w", teachers=("a", "b", "c", "d"))
    raw = tiny_recipe_dict(world, root / "first", teachers=2, train={"max_steps": 2}, log={"samples": False})
    return world, run(parse_recipe(raw))


def incremental(world, merged, out, regularizer=True, **extra):
    raw = tiny_recipe_dict(world, out, train={"max_steps": 2}, log={"samples": False}, data={"batch_size": 6},
                           model={"init_from": str(merged)},
                           objective={"name": "incremental", "options": {"regularizer": regularizer}}, **extra)
    raw["teachers"] = raw["teachers"][2:]  # c and d are new
    return parse_recipe(raw)


def test_new_rows_appended_old_kept_and_each_slot_supervised(merged_ab, tmp_path):
    world, merged = merged_ab
    trainer = DistillationTrainer(incremental(world, merged, tmp_path / "run",
                                              loss={"lambda_feat": 0.0, "lambda_adv": 0.0}))
    assert trainer.student_styles == ["a", "b", "c", "d"] and trainer.slot_names == ["c", "d", PREVIOUS]
    old = load_merged(merged).unet
    student = trainer.models["student"]
    torch.testing.assert_close(student.class_embedding.codebook.weight[:2], old.class_embedding.codebook.weight)
    # The frozen copy serves slot 2 with random old styles (0 or 1); teachers c, d serve styles 2, 3.
    slots = torch.tensor([0, 1, 2, 2, 2, 2, 2, 2])
    labels = trainer.objective.class_labels(slots)
    assert labels[:2].tolist() == [2, 3] and set(labels[2:].tolist()) <= {0, 1}
    assert len(set(labels[2:].tolist())) == 2, "both old styles are drawn"

    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 800])
    captions = ["red circle", "blue square", "red square"]
    cond = trainer.base.encode_captions(captions)
    groups = {0: [0], 1: [1], 2: [2]}
    lab = torch.tensor([2, 3, 1])
    out, _ = trainer.objective.teacher_outputs(x, t, StepInputs(x, captions, cond), groups, False, lab)
    kw = {"added_cond_kwargs": cond.added_cond_kwargs}
    sel = lambda j: {"added_cond_kwargs": {k: v[j:j + 1] for k, v in kw["added_cond_kwargs"].items()}}  # noqa: E731
    c_unet = trainer.teachers[0].unet
    torch.testing.assert_close(out[0:1], c_unet(x[0:1], t[0:1], cond.encoder_hidden_states[0:1], **sel(0)).sample)
    want = old(x[2:3], t[2:3], cond.encoder_hidden_states[2:3], class_labels=torch.tensor([1]), **sel(2)).sample
    torch.testing.assert_close(out[2:3], want)


def test_incremental_trains_and_exports_every_style(merged_ab, tmp_path):
    world, merged = merged_ab
    out = run(incremental(world, merged, tmp_path / "run"))
    assert load_merged(out).unet.style_names == ["a", "b", "c", "d"]


def test_without_the_regularizer_there_is_no_extra_slot(merged_ab, tmp_path):
    world, merged = merged_ab
    trainer = DistillationTrainer(incremental(world, merged, tmp_path / "run", regularizer=False))
    assert trainer.slot_names == ["c", "d"] and sorted(trainer.teachers) == [0, 1]
    assert trainer.objective.class_labels(torch.tensor([0, 1])).tolist() == [2, 3]


def test_bad_incremental_inputs_are_refused_before_loading(merged_ab, tmp_path):
    world, merged = merged_ab
    with pytest.raises(ValueError, match="not a dmm merged model"):
        DistillationTrainer(incremental(world, world.base, tmp_path / "a"))
    raw = tiny_recipe_dict(world, tmp_path / "b", model={"init_from": str(merged)}, objective={"name": "incremental"})
    raw["teachers"] = raw["teachers"][1:3]  # b collides with the merged model's b
    with pytest.raises(ValueError, match=r"new style name\(s\) \['b'\] are already styles"):
        DistillationTrainer(parse_recipe(raw))
    raw = tiny_recipe_dict(world, tmp_path / "c", objective={"name": "incremental"})
    with pytest.raises(ValueError, match="set model.init_from"):
        DistillationTrainer(parse_recipe(raw))
