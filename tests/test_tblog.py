"""TensorBoard of a run (dmm/train/tblog.py), read back from the event file as TensorBoard would."""

import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dmm.losses.score import score_distillation_loss, score_parts
from dmm.train.run import run
from dmm.train.tblog import TrainingBoard, first_captions, log_sample_grids, student_for_sampling
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world
from tests.conftest import unet_inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("tiny"))


def events(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_run_logs_grids_learning_rates_per_teacher_losses_and_recipe(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", optim={"style_lr_multiplier": 10.0},
                               log={"num_prompts": 3, "sample_steps": 2})
    run(recipe)
    acc = events(tmp_path / "run")

    # Grids of every style at each checkpoint (steps 2 and 3): one 16 x 16 column per prompt.
    for style in ("a", "b"):
        grids = acc.Images(f"samples/{style}")
        assert [g.step for g in grids] == [2, 3]
        assert (grids[0].height, grids[0].width) == (16, 3 * 16)
    assert acc.Images("samples/a")[0].encoded_image_string != acc.Images("samples/b")[0].encoded_image_string

    # Learning rate of every param group: the student's base weights, its style codebook, the discriminator.
    assert scalars(acc, "lr/student/0") == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-3})
    assert scalars(acc, "lr/student/1") == pytest.approx({1: 1e-2, 2: 1e-2, 3: 1e-2})
    assert scalars(acc, "lr/disc/0") == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-3})

    # Each teacher's score loss; the teachers have equal shares of every batch, so their mean is the score loss.
    score, a, b = (scalars(acc, t) for t in ("train/score", "train/score/a", "train/score/b"))
    assert set(score) == set(a) == set(b) == {1, 2, 3}
    for step in score:
        assert a[step] != b[step]
        assert (a[step] + b[step]) / 2 == pytest.approx(score[step], rel=1e-5)

    # The resolved recipe, once, as YAML.
    texts = acc.Tensors("recipe/text_summary")
    assert len(texts) == 1
    text = textwrap.dedent(texts[0].tensor_proto.string_val[0].decode())
    assert yaml.safe_load(text) == recipe.to_dict()


def test_per_teacher_losses_are_each_teachers_mean_also_with_unequal_shares(world, tmp_path):
    """Parts add up to the score loss; the board divides by each teacher's share of the step (3:1 here)."""
    g = torch.Generator().manual_seed(0)
    student_out, teacher_out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    groups = {0: [0, 1, 3], 1: [2]}
    parts = score_parts(student_out, teacher_out, groups, ["a", "b"])
    assert float(parts["score_part/a"] + parts["score_part/b"]) == pytest.approx(
        float(score_distillation_loss(student_out, teacher_out)), rel=1e-6)

    recipe = tiny_world.recipe(world, tmp_path / "run")
    board = TrainingBoard(tmp_path / "tb", recipe, [torch.tensor([0, 0, 1, 0])])
    board.log_step({k: float(v) for k, v in parts.items()}, step=1)
    board.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for name, rows in (("a", [0, 1, 3]), ("b", [2])):
        own = float(score_distillation_loss(student_out[rows], teacher_out[rows]))
        assert scalars(acc, f"train/score/{name}")[1] == pytest.approx(own, rel=1e-6)


def test_drawing_grids_leaves_every_training_state_as_it_was(world, tmp_path):
    """What a grid could disturb: global RNG, the trainer's generator, weights, modes, held style."""
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run", log={"sample_steps": 2}))
    student = trainer.models["student"]
    student.down_blocks[0].eval()  # a mixed train/eval state must come back as it was
    rng, gen = torch.get_rng_state(), trainer.generator.get_state()
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    modes = [m.training for m in student.modules()]
    board = TrainingBoard(tmp_path / "tb", trainer.recipe, trainer.micro_styles)
    log_sample_grids(board, trainer.engine, student, trainer.recipe, trainer.base.pipe, trainer.stream, 1)
    board.close()
    assert len(events(tmp_path).Images("samples/a")) == 1
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(trainer.generator.get_state(), gen)
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())
    assert [m.training for m in student.modules()] == modes and student.class_embedding.held is None
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.slow
def test_grids_change_nothing_in_training(world, tmp_path):
    """The same run with and without sample grids writes bit-identical weights."""
    for name, on in (("with", True), ("without", False)):
        run(tiny_world.recipe(world, tmp_path / name, log={"samples": on, "sample_steps": 2}))
    assert events(tmp_path / "with").Tags()["images"] and not events(tmp_path / "without").Tags()["images"]
    for ckpt in ("step-00000002", "step-00000003"):
        a = load_file(str(tmp_path / "with" / "checkpoints" / ckpt / "student.safetensors"))
        b = load_file(str(tmp_path / "without" / "checkpoints" / ckpt / "student.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_grid_prompts_are_read_in_file_order_and_leave_the_stream_alone(world, tmp_path):
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run"))
    before = trainer.stream.state_dict()
    prompts = first_captions(trainer.stream, 3)
    assert len(prompts) == 3 == len(set(prompts)) and all(prompts)
    assert first_captions(trainer.stream, 3) == prompts
    assert trainer.stream.state_dict() == before


def test_a_resumed_board_hides_what_a_killed_run_logged_after_the_checkpoint(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run")
    styles = [torch.tensor([0, 1, 0, 1])]
    first = TrainingBoard(tmp_path / "tb", recipe, styles)
    for step in range(1, 6):  # killed after step 5; its last checkpoint was step 3
        first.log_step({"score": 1.0}, step)
    first.close()
    resumed = TrainingBoard(tmp_path / "tb", recipe, styles, step=3)
    for step in (4, 5):
        resumed.log_step({"score": 2.0}, step)
    resumed.close()
    logged = [(e.step, e.value) for e in events(tmp_path).Scalars("train/score")]
    assert logged == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]


def test_a_sharded_student_is_sampled_from_a_gathered_copy_equal_to_it(world, tmp_path):
    """The path of engines that wrap or shard the student (full_state_dict into a copy on the main
    rank), taken here by handing over a wrapper: the copy computes what the student computes."""
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run"))
    student = trainer.models["student"]
    with torch.no_grad():  # a trained-looking codebook, so that styles differ
        student.class_embedding.mlp[2].weight.normal_(generator=torch.Generator().manual_seed(0))
    x, t, _, _ = unet_inputs(student, batch=2)
    cond = trainer.base.encode_captions(["a red circle", "a blue square"])
    with student_for_sampling(trainer.engine, torch.nn.ModuleList([student]), trainer.recipe) as copy:
        assert copy is not student and not copy.training
        with torch.no_grad():
            for style in (0, 1):
                labels = torch.tensor([style, style])
                ref = student(x, t, cond.encoder_hidden_states, class_labels=labels, **cond.unet_kwargs()).sample
                got = copy(x, t, cond.encoder_hidden_states, class_labels=labels, **cond.unet_kwargs()).sample
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
