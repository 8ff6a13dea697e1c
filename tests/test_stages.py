"""A recipe's `stages:` run in order, each from the previous stage's merged model, each a run of its own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dmm.recipes import RecipeError, parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("stages"))


def staged(world, out, **extra):
    raw = tiny_recipe_dict(world, out, train={"max_steps": 2, "checkpoint_every": 2}, log={"samples": False})
    raw["stages"] = [{"name": "distill"},
                     {"name": "polish", "optim": {"lr": 1e-4}, "train": {"max_steps": 1}}]
    raw.update(extra)
    return raw


def unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_stages_chain_through_the_merged_model_and_resume(world, tmp_path):
    recipe = parse_recipe(staged(world, tmp_path / "run"))
    first, second = recipe.stages
    assert first["train"]["output_dir"] == str(tmp_path / "run" / "1-distill")
    assert second["model"]["init_from"] == str(tmp_path / "run" / "1-distill" / "merged")
    assert second["optim"]["lr"] == 1e-4 and first["optim"]["lr"] == 1e-3

    merged = run(recipe)
    assert merged == tmp_path / "run" / "2-polish" / "merged"
    # The second stage started from the first one's merged model.
    start = DistillationTrainer(parse_recipe({**second, "train": {**second["train"],
                                                                    "output_dir": str(tmp_path / "probe")}}))
    got = start.models["student"].state_dict()
    for key, value in unet_weights(tmp_path / "run" / "1-distill" / "merged").items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    final = unet_weights(merged)

    # Run again without the second stage's folder: the finished first stage trains no further step,
    # the second one is redone to the same weights.
    ckpt = tmp_path / "run" / "1-distill" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()}
    import shutil

    shutil.rmtree(tmp_path / "run" / "2-polish")
    run(parse_recipe(staged(world, tmp_path / "run")))
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()} == before
    for key, value in unet_weights(merged).items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)


@pytest.mark.parametrize("stages, message", [
    ([{"optim": {"lr": 1e-4}}], "a stage is a mapping with a `name`"),
    ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "a", "train": {"output_dir": "x"}}], "train.output_dir is derived"),
    ([{"name": "a"}, {"name": "b", "model": {"init_from": "x"}}], "drop its model.init_from"),
    ([{"name": "a"}, {"name": "b", "teachers": [{"name": "z", "path": "."}]}], "not the previous stage's"),
    ([{"name": "a", "objective": {"name": "dmn"}}], r"stages\[0\] \(a\): .*unknown objective 'dmn'"),
])
def test_stage_lists_that_do_not_connect_are_refused(world, tmp_path, stages, message):
    raw = staged(world, tmp_path / "run")
    raw["stages"] = stages
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw)


def test_init_from_must_be_a_merged_model_of_these_styles(world, tmp_path):
    raw = tiny_recipe_dict(world, tmp_path / "run", model={"init_from": str(world.base)})
    with pytest.raises(ValueError, match="init_from .*not a dmm merged model"):
        DistillationTrainer(parse_recipe(raw))
