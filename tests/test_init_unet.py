"""`model.init_unet`: the student's UNet weights from another UNet (e.g. the teachers' weight average)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from dmm.merge import merge_models
from dmm.recipes import RecipeError, parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("init_unet"))


@pytest.fixture(scope="module")
def average(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("avg") / "avg"
    return merge_models("weighted_sum", [world.teachers["a"], world.teachers["b"]], out)


def test_the_student_starts_from_the_given_unet_with_a_random_codebook(world, average, tmp_path):
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run", model={"init_unet": str(average)}))
    student = trainer.models["student"]
    want = UNet2DConditionModel.from_pretrained(str(average), subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(str(world.base), subfolder="unet").state_dict()
    got = student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert any(not torch.equal(want[k], base[k]) for k in want)  # the average is not the base
    assert set(got) - set(want) and all(k.startswith("class_embedding.") for k in set(got) - set(want))
    plain = DistillationTrainer(tiny_world.recipe(world, tmp_path / "plain")).models["student"].state_dict()
    assert all(torch.equal(plain[k], v) for k, v in base.items())  # without the option: the base


def test_a_run_from_it_resumes_exactly(world, average, tmp_path):
    a, b = tiny_world.students_after_4_steps(world, tmp_path, model={"init_unet": str(average)})
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_are_refused_before_any_model_loads(world, average, tmp_path):
    with pytest.raises(RecipeError, match="model.init_from and model.init_unet each start the student"):
        tiny_world.recipe(world, tmp_path / "both", model={"init_unet": str(average), "init_from": str(average)})
    with pytest.raises(FileNotFoundError, match="model.init_unet not found"):
        DistillationTrainer(tiny_world.recipe(world, tmp_path / "gone", model={"init_unet": str(tmp_path / "nope")}))


def test_a_later_stage_starts_from_the_previous_stage_not_from_init_unet(world, average, tmp_path):
    r = tiny_world.recipe(world, tmp_path / "st", model={"init_unet": str(average)},
                          stages=[{"name": "one"}, {"name": "two"}])
    assert r.stages[0]["model"]["init_unet"] == str(average)
    assert r.stages[1]["model"]["init_unet"] == "" and r.stages[1]["model"]["init_from"]


def test_init_average_starts_from_the_teachers_mean_made_once_by_the_run(world, tmp_path):
    from dmm.teachers import load_teacher_unet

    r = tiny_world.recipe(world, tmp_path / "avg", model={"init_average": True})
    got = DistillationTrainer(r).models["student"].state_dict()
    a, b = (load_teacher_unet(world.teachers[n], base=world.base).state_dict() for n in ("a", "b"))
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)
    made = tmp_path / "avg" / "init_unet.safetensors"
    stamp = made.stat().st_mtime_ns
    DistillationTrainer(r)  # a resumed run reads the same file, not a new merge
    assert made.stat().st_mtime_ns == stamp


def test_init_average_refuses_lora_teachers_and_another_start(world, average, tmp_path):
    with pytest.raises(RecipeError, match="init_unet and model.init_average"):
        tiny_world.recipe(world, tmp_path / "x", model={"init_unet": str(average), "init_average": True})
    raw_teachers = [{"name": "a", "lora": str(tmp_path / "a.safetensors"), "base": str(world.base)},
                    {"name": "b", "path": str(world.teachers["b"])}]
    raw = tiny_recipe_dict(world, tmp_path / "y", model={"init_average": True})
    with pytest.raises(RecipeError, match="LoRA teachers"):
        parse_recipe({**raw, "teachers": raw_teachers})
