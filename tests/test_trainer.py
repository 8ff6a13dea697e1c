import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from dmm.objectives.dmm import StepInputs
from dmm.pipeline import generate, load_merged
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer, TrainingDiverged
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("tiny"))


def test_end_to_end_exports_a_loadable_merged_model(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run")
    merged = run(recipe)
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    assert list((tmp_path / "run" / "tb").iterdir()), "TensorBoard events written"
    pipe = load_merged(merged)
    assert pipe.unet.style_names == ["a", "b"]
    for style in ("a", "b", {"a": 0.5, "b": 0.5}):
        images = generate(pipe, ["a red circle"], style, steps=2, height=16, width=16)
        assert images[0].size == (16, 16)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000002", "step-00000003"]


def test_losses_decrease_and_student_moves(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 1})
    trainer = DistillationTrainer(recipe)
    before = {k: v.clone() for k, v in trainer.models["student"].state_dict().items()}
    batch = next(iter(trainer.stream))
    first = trainer.train_step(batch)
    for _ in range(5):
        last = trainer.train_step(batch)
    assert all(math.isfinite(v) for v in last.values())
    assert last["score"] < first["score"]
    after = trainer.models["student"].state_dict()
    assert any((before[k] - after[k]).abs().max() > 0 for k in before if k.startswith("class_embedding."))


def test_each_sample_is_supervised_by_its_own_teacher(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", loss={"lambda_feat": 0.0, "lambda_adv": 0.0})
    trainer = DistillationTrainer(recipe)
    assert trainer.batch_styles.tolist() == [0, 1, 0, 1]
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 200, 500, 900])
    cond = trainer.base.encode_captions(["a red circle"] * 4)
    inputs = StepInputs(x, ["a red circle"] * 4, cond)
    out, _ = trainer.objective.teacher_outputs(x, t, inputs, trainer.micro_groups[0], want_features=False)
    for j, style in enumerate(trainer.batch_styles.tolist()):
        unet = trainer.teachers[style].unet
        ref = unet(x[j : j + 1], t[j : j + 1], cond.encoder_hidden_states[j : j + 1],
                   added_cond_kwargs={k: v[j : j + 1] for k, v in cond.added_cond_kwargs.items()}).sample
        torch.testing.assert_close(out[j : j + 1], ref)


def test_cfg_drop_is_shared_by_student_and_teacher(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", data={"caption_dropout": 0.75})
    trainer = DistillationTrainer(recipe)
    seen = {}

    def spy(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append(args[2] if len(args) > 2 else kwargs["encoder_hidden_states"])
        return hook

    trainer.models["student"].register_forward_pre_hook(spy("student"), with_kwargs=True)
    for i, teacher in trainer.teachers.items():
        teacher.unet.register_forward_pre_hook(spy(f"teacher{i}"), with_kwargs=True)
    empty = trainer.base.encode_captions([""]).encoder_hidden_states[0]
    batch = next(iter(trainer.stream))
    trainer.train_step(batch)
    student_states = seen["student"][0]
    teacher_states = torch.empty_like(student_states)
    teacher_states[trainer.batch_styles == 0] = seen["teacher0"][0]
    teacher_states[trainer.batch_styles == 1] = seen["teacher1"][0]
    torch.testing.assert_close(student_states, teacher_states)
    dropped = [torch.equal(s, empty) for s in student_states]
    assert any(dropped), "with this seed and p=0.75 some captions are dropped"


def test_nan_loss_stops_and_keeps_last_checkpoint(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 1})
    trainer = DistillationTrainer(recipe)
    data = iter(trainer.stream)
    trainer.train_step(next(data))
    trainer.step = 1
    good = trainer.save_checkpoint()
    weights_before = load_file(str(good / "student.safetensors"))
    with torch.no_grad():
        trainer.teachers[0].unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 2.*step-00000001"):
        trainer.train_step(next(data))
    assert trainer.checkpoints.latest() == good
    torch.testing.assert_close(load_file(str(good / "student.safetensors")), weights_before)


def test_resume_continues_exactly(world, tmp_path):
    full = tiny_world.recipe(world, tmp_path / "full", train={"max_steps": 4, "checkpoint_every": 2})
    run(full)
    part = tiny_world.recipe(world, tmp_path / "part", train={"max_steps": 2, "checkpoint_every": 2})
    run(part)
    resumed = tiny_world.recipe(world, tmp_path / "part", train={"max_steps": 4, "checkpoint_every": 2,
                                                                "resume": "latest"})
    run(resumed)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / "student.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step-00000004" / "student.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_other_recipe_names_keys(world, tmp_path):
    run(tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 2}))
    other = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 4, "resume": "latest"},
                              loss={"lambda_feat": 0.5})
    with pytest.raises(ValueError, match=r"differing keys: \['loss.lambda_feat'\]"):
        run(other)


def test_mismatched_teacher_is_named(world, tmp_path):
    from dmm.testing import make_tiny_pipeline

    make_tiny_pipeline(tmp_path / "sd15", "sd15")
    bad = dataclasses.replace(world, teachers={"a": world.teachers["a"], "odd": tmp_path / "sd15"})
    with pytest.raises(ValueError, match=r"teacher 'odd' .*is an SD1.5 UNet but the recipe's base is SDXL"):
        DistillationTrainer(tiny_world.recipe(bad, tmp_path / "run"))


def test_missing_teacher_path_is_named(world, tmp_path):
    bad = dataclasses.replace(world, teachers={"a": world.teachers["a"], "gone": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="gone: .*nowhere"):
        DistillationTrainer(tiny_world.recipe(bad, tmp_path / "run"))


def test_bf16_autocast_and_bf16_teachers(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"max_steps": 2, "mixed_precision": "bf16"},
                               model={"teacher_dtype": "bfloat16"})
    trainer = DistillationTrainer(recipe)
    assert next(trainer.teachers[0].unet.parameters()).dtype == torch.bfloat16
    assert next(trainer.models["student"].parameters()).dtype == torch.float32  # fp32 master weights
    metrics = trainer.train_step(next(iter(trainer.stream)))
    assert all(math.isfinite(v) for v in metrics.values())


def test_v_prediction_base_trains(tmp_path):
    world = tiny_world.build(tmp_path / "w", prediction_type="v_prediction")
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run"))
    assert trainer.base.prediction_type == "v_prediction"
    metrics = trainer.train_step(next(iter(trainer.stream)))
    assert all(math.isfinite(v) for v in metrics.values())
