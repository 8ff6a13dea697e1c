"""The student's weight average (`optim.ema_decay`): the update rule, exact resume, and the export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dmm.models.ema import WeightEMA, ema_state
from dmm.train.export import export_from_checkpoint
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("ema"))


def test_update_rule_by_hand():
    ema = WeightEMA("w", 0.5)
    ema.start({"a": torch.tensor([1.0, -2.0])})
    ema.update({"a": torch.tensor([3.0, 2.0])})
    assert ema.shadow["a"].tolist() == [2.0, 0.0]
    ema.update({"a": torch.tensor([3.0, 2.0])})
    assert ema.shadow["a"].tolist() == [2.5, 1.0]
    with pytest.raises(ValueError, match="missing"):
        ema.update({"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="decay"):
        WeightEMA("w", 1.0)


def test_trainer_keeps_the_average_of_its_steps(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2},
                               optim={"ema_decay": 0.75})
    trainer = DistillationTrainer(recipe)
    data = iter(trainer.stream)
    expected = {k: v.detach().clone() for k, v in trainer.models["student"].named_parameters()}
    for _ in range(2):
        trainer.train_step(next(data))
        for k, v in trainer.models["student"].named_parameters():
            expected[k] = 0.75 * expected[k] + 0.25 * v.detach()
    for k, v in expected.items():
        torch.testing.assert_close(trainer.emas["student"].shadow[k], v)
    moved = [k for k, v in expected.items()
             if not torch.equal(v, dict(trainer.models["student"].named_parameters())[k].detach())]
    assert moved, "the average should differ from the trained weights"


def test_average_resumes_exactly_and_is_exported(world, tmp_path):
    def recipe(out, steps, **train):
        return tiny_world.recipe(world, tmp_path / out, optim={"ema_decay": 0.9},
                                 train={"max_steps": steps, "checkpoint_every": 2, **train})

    merged = run(recipe("full", 4))
    run(recipe("part", 2))
    run(recipe("part", 4, resume="latest"))
    a, b = (tmp_path / name / "checkpoints" / "step-00000004" for name in ("full", "part"))
    for name in ("student.safetensors", "ema-student.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)

    average, raw = ema_state(a), load_file(str(a / "student.safetensors"))
    exported = load_file(str(next((merged / "unet").glob("*.safetensors"))))
    for k, v in average.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)
    assert any(not torch.equal(average[k], raw[k]) for k in average)
    assert json.loads((merged / "dmm_merge.json").read_text())["weights"] == "ema"

    again = export_from_checkpoint(a, tmp_path / "raw", weights="raw")
    for k, v in load_file(str(next((again / "unet").glob("*.safetensors")))).items():
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)


def test_export_without_an_average_says_so(world, tmp_path):
    run(tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2}))
    with pytest.raises(FileNotFoundError, match="no weight average"):
        export_from_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002", tmp_path / "x", weights="ema")


def test_turning_the_average_on_mid_run_is_refused(world, tmp_path):
    run(tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2}))
    later = tiny_world.recipe(world, tmp_path / "run", optim={"ema_decay": 0.9},
                              train={"max_steps": 4, "checkpoint_every": 2, "resume": "latest"})
    with pytest.raises(Exception, match="ema_decay"):
        run(later)
