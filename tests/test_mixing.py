"""`loss.mix_share`: samples trained on a mixture of two teachers' styles, with the same mixture of
their outputs as the target."""

from __future__ import annotations

import pytest
import torch

from dmm.objectives.dmm import Mixtures
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("mixing"))


def test_blend_by_hand():
    mix = Mixtures(weights=torch.zeros(2, 2), partners={1: [0]}, own=torch.tensor([0.25, 1.0]).view(-1, 1, 1, 1),
                   mixed=torch.tensor([True, False]))
    own, partner = torch.full((2, 1, 1, 1), 4.0), torch.tensor([8.0, float("nan")]).view(-1, 1, 1, 1)
    assert mix.blend(own, partner).flatten().tolist() == [0.25 * 4 + 0.75 * 8, 4.0]  # unset rows never leak


def test_mixed_samples_get_mixed_styles_and_targets(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", loss={"mix_share": 0.5}, data={"batch_size": 8})
    trainer = DistillationTrainer(recipe)
    objective = trainer.objective
    groups = trainer.micro_groups[0]
    styles = trainer.micro_styles[0]
    state = trainer.generator.get_state()
    mix = objective.mixtures(styles, groups)
    assert mix is not None and 0 < int(mix.mixed.sum()) < 8
    for j in range(8):
        w = mix.weights[j]
        assert w.sum().item() == pytest.approx(1.0)
        assert w[styles[j]].item() == pytest.approx(mix.own.flatten()[j].item())
        if mix.mixed[j]:
            partner = next(p for p, rows in mix.partners.items() if j in rows)
            assert partner != styles[j] and w[partner] > 0
        else:
            assert w[styles[j]] == 1.0
    trainer.generator.set_state(state)  # the same draws again: resumable
    again = objective.mixtures(styles, groups)
    assert torch.equal(again.weights, mix.weights) and again.partners == mix.partners

    # The score target of a mixed sample is the blend of its two teachers' outputs.
    captured = {}
    original = objective.teacher_outputs

    def spy(x_t, t, inputs, grp, want, labels=None):
        out, feats = original(x_t, t, inputs, grp, want, labels)
        captured.setdefault("calls", []).append((grp, out))
        return out, feats

    drawn = objective.mixtures

    def keep(labels, grp):
        captured["mix"] = drawn(labels, grp)
        return captured["mix"]

    objective.teacher_outputs, objective.mixtures = spy, keep
    losses = trainer.micro_step(next(iter(trainer.stream)), styles, 1.0, groups)
    assert torch.isfinite(losses["total"]) and "gen" in losses
    (own_groups, _), (partner_groups, _) = captured["calls"]
    assert own_groups == groups and partner_groups == captured["mix"].partners


def test_mixing_off_draws_nothing_and_training_resumes_exactly(world, tmp_path):
    trainer = DistillationTrainer(tiny_world.recipe(world, tmp_path / "off"))
    state = trainer.generator.get_state()
    assert trainer.objective.mixtures(trainer.micro_styles[0], trainer.micro_groups[0]) is None
    assert torch.equal(trainer.generator.get_state(), state)

    a, b = tiny_world.students_after_4_steps(world, tmp_path, loss={"mix_share": 0.5})
    assert all(torch.equal(a[k], b[k]) for k in a)
