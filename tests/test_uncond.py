"""`loss.uncond_weight`: every sample's unconditional branch distilled beside its captioned one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dmm.losses import score_distillation_loss
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("uncond"))


def test_the_uncond_loss_is_the_empty_captions_mse_and_the_captioned_loss_is_unchanged(world, tmp_path):
    """One student forward carries both branches; each equals its own forward done separately."""
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "run", loss={"uncond_weight": 0.5},
                                                    data={"batch_size": 4, "caption_dropout": 0.0}))
    objective, student = trainer.objective, trainer.models["student"]
    groups, styles = trainer.micro_groups[0], trainer.micro_styles[0]
    batch = next(iter(trainer.stream))
    seen = {}
    noised = objective.noised

    def keep(latents):
        seen["t"], seen["x_t"] = noised(latents)
        return seen["t"], seen["x_t"]

    objective.noised = keep
    losses = trainer.micro_step(batch, styles, 1.0, groups)
    assert {"score", "uncond", "feat", "gen", "total"} <= set(losses)

    t, x_t = seen["t"], seen["x_t"]
    inputs = objective.conditioned(batch, objective.latents(batch), batch["captions"])
    empty = objective.conditioned(batch, inputs.latents, [""] * len(batch["captions"]))
    assert not torch.equal(empty.cond.encoder_hidden_states, inputs.cond.encoder_hidden_states)
    with torch.no_grad():
        for cond, key in ((inputs, "score"), (empty, "uncond")):
            target, _ = objective.teacher_outputs(x_t, t, cond, groups, False, styles)
            out = student(x_t, t, cond.cond.encoder_hidden_states, class_labels=styles, **cond.cond.unet_kwargs()).sample
            torch.testing.assert_close(losses[key], score_distillation_loss(out, target), rtol=1e-5, atol=1e-7)
    expected = (losses["score"] + 0.5 * losses["uncond"] + trainer.recipe.loss.lambda_feat * losses["feat"]
                + trainer.recipe.loss.lambda_adv * losses["gen"])
    torch.testing.assert_close(losses["total"], expected)


def test_off_by_default_and_a_run_with_it_resumes_exactly_and_exports(world, tmp_path):
    plain = DistillationTrainer(tiny_world.recipe(world, tmp_path / "plain"))
    assert "uncond" not in plain.micro_step(next(iter(plain.stream)), plain.micro_styles[0], 1.0,
                                            plain.micro_groups[0])

    def recipe(out, steps, **train):  # with mixtures too: their uncond targets are blended like the captioned ones
        return tiny_world.recipe(world, tmp_path / out, loss={"uncond_weight": 1.0, "mix_share": 0.5},
                                 train={"max_steps": steps, "checkpoint_every": 2, **train})

    merged = run(recipe("full", 4))
    run(recipe("part", 2))
    run(recipe("part", 4, resume="latest"))
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step-00000004" / "student.safetensors"))
            for n in ("full", "part"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    exported = load_file(str(next((merged / "unet").glob("*.safetensors"))))
    for k, v in exported.items():  # the style codebook lives elsewhere in the export; every UNet weight is the run's
        if k in a:
            torch.testing.assert_close(v, a[k], rtol=0, atol=0)
    assert sum(k in a for k in exported) > 0.9 * len(exported)


def test_splam_refuses_it(world, tmp_path):
    from dmm.objectives.splam import SplamObjective

    r = tiny_world.recipe(world, tmp_path / "s", loss={"uncond_weight": 0.5}, model={"init_from": str(tmp_path)})
    with pytest.raises(ValueError, match="uncond_weight"):
        SplamObjective.check(r, None)
