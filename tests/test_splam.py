"""The SPLAM few-step stage: its pieces by hand, a run that exports a 2-4 step model, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from dmm.losses import pseudo_huber_loss
from dmm.models.student import StyleUNet2DConditionModel
from dmm.diffusion import predict_x0
from dmm.objectives.splam import decode_x0, gamma_embedding, sub_path
from dmm.pipeline import generate, load_merged
from dmm.recipes import parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("splam")
    world = tiny_world.build(root / "w")
    return world, run(tiny_world.recipe(world, root / "first", train={"max_steps": 2}, log={"samples": False}))


def splam(world, merged, out, steps=2, resume="auto", **options):
    return parse_recipe(tiny_recipe_dict(
        world, out, train={"max_steps": steps, "checkpoint_every": 2, "resume": resume}, log={"samples": False},
        model={"init_from": str(merged)}, optim={"lr": 1e-4},
        objective={"name": "splam", "options": {"ddim_steps": 10, "guidance": 2.0, "cond_dim": 32, **options}}))


def test_pseudo_huber_by_hand():
    assert pseudo_huber_loss(torch.zeros(3), torch.zeros(3), 1e-3).item() == 0.0
    # d = 3, c = 4: sqrt(9 + 16) - 4 = 1; d = 0: 0; mean 0.5
    assert pseudo_huber_loss(torch.tensor([3.0, 0.0]), torch.zeros(2), 4.0).item() == pytest.approx(0.5)


def test_gamma_one_is_what_a_stock_pipeline_passes_at_guidance_one():
    stock = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([1.0 - 1.0]), embedding_dim=8)
    assert torch.equal(gamma_embedding(torch.ones(1), 8), stock)
    assert not torch.equal(gamma_embedding(torch.tensor([0.5]), 8), stock)


def test_sub_path_endpoints_decode_the_clean_latent():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a_s, a_e = torch.tensor(0.6).view(1, 1, 1, 1), torch.tensor(0.8).view(1, 1, 1, 1)
    s_s, s_e = (1 - a_s ** 2).sqrt(), (1 - a_e ** 2).sqrt()
    z, x_prev = a_s * x0 + s_s * eps, a_e * x0 + s_e * eps
    for gamma, expected_sigma in ((1.0, s_s), (0.0, s_e * a_s / a_e)):
        point, sigma = sub_path(z, x_prev, torch.full((2,), gamma), a_s, a_e)
        torch.testing.assert_close(sigma.expand(2, 1, 1, 1), expected_sigma.expand(2, 1, 1, 1))
        torch.testing.assert_close((point - sigma * eps) / a_s, x0)  # the true noise decodes x0 exactly


def test_v_prediction_decoding_is_exact_and_finite_at_zero_signal():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for a_s, sigma in ((0.6, 0.5), (0.6, 0.8), (1e-5, 0.7)):
        a, s = torch.tensor(a_s).view(1, 1, 1, 1), torch.tensor(sigma).view(1, 1, 1, 1)
        point = a * x0 + s * eps
        tau = (a ** 2 + s ** 2).sqrt()
        v = (a * eps - s * x0) / tau  # the true v of the point rescaled to unit variance
        got = decode_x0(v, point, s, a, "v_prediction")
        torch.testing.assert_close(got, x0, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(decode_x0(torch.randn_like(v), point, s, a, "v_prediction")).all()
    # gamma = 1 (sigma = s_t, a unit-variance point) is the usual a x - s v
    abar = torch.tensor([0.36])
    a, s = abar.sqrt().view(1, 1, 1, 1), (1 - abar).sqrt().view(1, 1, 1, 1)
    x, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(decode_x0(out, x, s, a, "v_prediction"),
                               predict_x0(out, x, torch.zeros(2, dtype=torch.long), abar, "v_prediction"))


def test_grown_student_starts_as_the_merged_model(merged):
    _, folder = merged
    old = StyleUNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
    new = StyleUNet2DConditionModel.from_merged(folder / "unet", {"time_cond_proj_dim": 32})
    assert new.config.time_cond_proj_dim == 32 and old.config.time_cond_proj_dim is None
    cfg = old.config
    x = torch.randn(2, cfg.in_channels, 8, 8)
    hidden = torch.randn(2, 5, cfg.cross_attention_dim)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim
                                                                  - 6 * cfg.addition_time_embed_dim),
                                       "time_ids": torch.randn(2, 6)}
    labels, t = torch.tensor([0, 1]), torch.tensor([10, 500])
    with torch.no_grad():
        a = old(x, t, hidden, class_labels=labels, **kwargs).sample
        b = new(x, t, hidden, class_labels=labels, timestep_cond=gamma_embedding(torch.rand(2), 32), **kwargs).sample
    torch.testing.assert_close(a, b)


def test_splam_stage_exports_a_few_step_model_and_resumes_exactly(merged, tmp_path):
    world, folder = merged
    out = run(splam(world, folder, tmp_path / "full", steps=4))
    pipe = load_merged(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 32
    info = json.loads((out / "dmm_merge.json").read_text())
    assert info["sampling"] == {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
    for style in pipe.unet.style_names:
        images = generate(pipe, ["a red circle"], style, steps=2, guidance_scale=1.0, output_type="np")
        assert images.shape[0] == 1 and torch.isfinite(torch.as_tensor(images)).all()

    run(splam(world, folder, tmp_path / "part", steps=2))
    run(splam(world, folder, tmp_path / "part", steps=4, resume="latest"))
    a, b = (tmp_path / name / "checkpoints" / "step-00000004" for name in ("full", "part"))
    for name in ("student.safetensors", "ema-splam_target.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)
    # The target trails the student: an EMA, not a copy.
    x, y = load_file(str(a / "student.safetensors")), load_file(str(a / "ema-splam_target.safetensors"))
    assert any(not torch.equal(x[k], y[k]) for k in y)


def test_one_splam_step_trains_the_new_gamma_input(merged, tmp_path):
    world, folder = merged
    trainer = DistillationTrainer(splam(world, folder, tmp_path / "probe"))
    student = trainer.models["student"]
    before = student.time_embedding.cond_proj.weight.detach().clone()
    assert not before.any()  # starts at zero: the student starts as the merged model
    losses = trainer.train_step(next(iter(trainer.stream)))
    assert losses["consistency"] > 0 and losses["consistency"] == losses["total"]
    assert student.time_embedding.cond_proj.weight.detach().abs().sum() > 0
    assert "disc" not in trainer.models


def test_bad_splam_inputs_are_refused_before_loading(merged, tmp_path):
    world, folder = merged
    raw = tiny_recipe_dict(world, tmp_path / "x", objective={"name": "splam"})
    with pytest.raises(ValueError, match="init_from"):
        DistillationTrainer(parse_recipe(raw))
    first = run(splam(world, folder, tmp_path / "few", steps=2))
    with pytest.raises(ValueError, match="cond_dim to 32"):
        DistillationTrainer(splam(world, first, tmp_path / "y", cond_dim=64))
