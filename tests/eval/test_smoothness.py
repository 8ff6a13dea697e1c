"""Mixing smoothness (eval/smoothness.py): the figures on hand-checkable curves, then the suite end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.smoothness import clip_positions, curve_figures, largest_step, line_deviation, mixing_smoothness

W = [round(0.1 * k, 1) for k in range(11)]
RAMP = np.array(W)
STEP_EARLY = np.array([0.0] + [1.0] * 10)  # flips between 0.0 and 0.1
STEP_MID = np.array([0.0] * 6 + [1.0] * 5)  # flips between 0.5 and 0.6


def test_largest_step_and_line_deviation_by_hand():
    assert largest_step(RAMP)[0] == pytest.approx(0.1)
    assert largest_step(STEP_MID) == (1.0, 5)
    assert line_deviation(W, RAMP) == pytest.approx(0.0)
    assert line_deviation(W, 0.2 + 0.5 * RAMP) == pytest.approx(0.0)  # any straight line, not only 0 -> 1
    # |step - w| = 0, .9, .8, ..., .1, 0 -> 4.5 / 11; mid step: 0, .1, .., .5, .4, .., 0 -> 2.5 / 11
    assert line_deviation(W, STEP_EARLY) == pytest.approx(4.5 / 11)
    assert line_deviation(W, STEP_MID) == pytest.approx(2.5 / 11)
    with pytest.raises(ValueError, match="at least two"):
        largest_step([0.5])
    with pytest.raises(ValueError, match="weights"):
        line_deviation(W[:3], RAMP)


def test_curve_figures_separate_ramp_from_step():
    ramp = curve_figures(W, [RAMP, RAMP])
    assert ramp["curve"] == pytest.approx(list(RAMP)) and ramp["n_images"] == 2
    assert ramp["max_jump"] == pytest.approx(0.1) and ramp["max_jump_share"] == pytest.approx(0.1)
    assert ramp["line_l1"] == pytest.approx(0.0)
    step = curve_figures(W, [STEP_MID])
    assert step["max_jump"] == 1.0 and step["max_jump_between"] == [0.5, 0.6] and step["max_jump_share"] == 1.0
    # a narrow curve: the share is scale-free (CLIP positions never reach 0 and 1)
    narrow = curve_figures(W, [0.4 + 0.2 * STEP_MID])
    assert narrow["max_jump"] == pytest.approx(0.2) and narrow["max_jump_share"] == pytest.approx(1.0)
    assert narrow["line_l1_share"] == pytest.approx(2.5 / 11)
    # each image flips abruptly at its own weight: the mean curve is a ramp, the per-image figure says 1
    staggered = [np.array([0.0] * k + [1.0] * (11 - k)) for k in range(1, 11)]
    fig = curve_figures(W, staggered)
    assert fig["max_jump"] == pytest.approx(0.1) and fig["per_image_max_jump"] == 1.0
    flat = curve_figures(W, [np.full(11, 0.3)])
    assert flat["max_jump_share"] is None and flat["line_l1_share"] is None  # no span: no share
    with pytest.raises(ValueError, match="weights"):
        curve_figures(W, [RAMP[:5]])


def test_clip_positions_place_images_between_the_ends():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    emb = np.stack([[np.cos(t) * a + np.sin(t) * b] for t in np.linspace(0, np.pi / 2, 5)])  # [5 weights, 1, 3]
    pos = clip_positions(emb)
    assert pos.shape == (1, 5)
    assert pos[0, 0] == pytest.approx(0.0) and pos[0, -1] == pytest.approx(1.0) and pos[0, 2] == pytest.approx(0.5)
    assert np.all(np.diff(pos[0]) > 0)
    # two images per end: each end's mean is between them, so the ends are not exactly 0 and 1
    two = np.stack([np.stack([a + 0.1 * b, a - 0.1 * b]), np.stack([b + 0.1 * a, b - 0.1 * a])])
    p2 = clip_positions(two)
    assert 0 < p2[0, 0] < 0.5 < p2[0, 1] < 1
    # paired: each image against itself at the ends; content (a third direction per image) cancels
    c = np.array([0.0, 0.0, 1.0])
    mixed = np.stack([np.stack([np.cos(t) * a + np.sin(t) * b + 3 * c, np.cos(t) * a + np.sin(t) * b - 3 * c])
                      for t in np.linspace(0, np.pi / 2, 5)])
    paired = clip_positions(mixed, paired=True)
    assert paired[:, 0] == pytest.approx([0, 0]) and paired[:, -1] == pytest.approx([1, 1])
    assert paired[:, 2] == pytest.approx([0.5, 0.5])
    centroid = clip_positions(mixed)
    assert centroid[:, -1].max() - centroid[:, 0].min() < 0.5  # squeezed by the content
    with pytest.raises(ValueError, match="weights >= 2"):
        clip_positions(emb[:1])


class _PixelClassifier(torch.nn.Module):
    """A real module with the toy classifier's interface: style logits from the mean red / blue level."""

    def forward(self, images):
        x = images.float().mean((2, 3))
        return x, {"style": 8.0 * torch.stack([x[:, 0] - x[:, 2], x[:, 2] - x[:, 0]], -1)}


def test_mixing_smoothness_classifier_curve_on_generated_images():
    """Images that fade from red to blue: the probability of 'blue' rises monotonically from near 0 to near 1."""
    images = []
    for w in W:
        x = torch.zeros(4, 3, 8, 8)
        x[:, 0], x[:, 2] = 1 - w, w
        images.append(x)
    out = mixing_smoothness(W, images, "blue", _PixelClassifier(), ["red", "blue"])
    c = out["curves"]["classifier"]["curve"]
    assert c[0] < 0.01 and c[-1] > 0.99 and np.all(np.diff(c) > 0)
    assert "clip" not in out["curves"]
    skipped = mixing_smoothness(W, images, "green", _PixelClassifier(), ["red", "blue"])
    assert skipped["curves"] == {} and "green" in skipped["skipped"]["classifier"]


class _ColourStats(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_suite_reports_mixing_smoothness(tiny_models, tiny_clip_dir, tmp_path):
    """End to end on the tiny SD1.5-shaped models with a real tiny CLIP: JSON curve, markdown, plot."""
    from eval.suite import main

    styles = tiny_models["styles"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "eval"
    teachers = [a for s, p in tiny_models["teachers"].items() for a in ("--teacher", f"{s}={p}")]
    # FID features: per-channel colour statistics (the tiny models have no toy world)
    from eval.features import FEATURE_EXTRACTORS, ModuleFeatures

    name = "test-smoothness-colour"
    if name not in FEATURE_EXTRACTORS:
        FEATURE_EXTRACTORS.add(name, lambda cfg: ModuleFeatures(_ColourStats(), name=name, dim=6),
                               description="per-channel mean and spread (test)")
    try:
        rc = main(["--merged", tiny_models["merged"], *teachers, "--out", str(out), "--prompts", str(prompts),
                   "--num-samples", "3", "--steps", "2", "--batch-size", "4", "--no-reference", "--features", name,
                   "--clip-model", str(tiny_clip_dir), "--metric", "clip_score", "--grid-images", "1",
                   "--no-progress", "--toyworld", str(tmp_path / "no_world"), "--interpolate", *styles,
                   "--interp-prompts", "1", "--interp-samples", "3"])
    finally:
        FEATURE_EXTRACTORS.remove(name)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    sm = report["mixing_smoothness"]
    assert sm["styles"] == styles and sm["images_per_weight"] == 3
    clip = sm["curves"]["clip"]
    assert clip["weights"] == W and len(clip["curve"]) == len(W) and clip["n_images"] == 3
    assert all(0.0 <= v <= 1.0 for v in clip["curve"])
    assert clip["curve"][0] < clip["curve"][-1]  # nearer the w=0 mean at w=0, the w=1 mean at w=1
    paired = sm["curves"]["clip_paired"]["curve"]
    assert paired[0] == pytest.approx(0.0, abs=1e-6) and paired[-1] == pytest.approx(1.0, abs=1e-6)
    assert 0 <= clip["max_jump"] <= 1 and clip["line_l1"] >= 0
    assert str(tiny_clip_dir.resolve()) in clip["backbone"]
    assert "classifier" in sm["skipped"]  # no toy world here
    with Image.open(out / sm["plot"]) as im:
        im.verify()
    md = (out / "report.md").read_text()
    assert "Mixing smoothness" in md and sm["plot"] in md


def test_toy_suite_reports_classifier_and_clip_curves(world, tmp_path):
    """The toy defaults: the toy classifier's probability of style B and the toy CLIP's position, one value
    per weight in [0, 1], both with the strip in the plot (untrained codebook: structure only)."""
    from diffusers import UNet2DConditionModel

    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.train.export import export_merged
    from eval.suite import main

    a, b = world.style_names[:2]
    unet = UNet2DConditionModel.from_pretrained(str(world.base_path / "unet"), local_files_only=True)
    student = StyleUNet2DConditionModel.from_unet(unet, [a, b])
    with torch.no_grad():
        torch.manual_seed(1)
        student.class_embedding.mlp[2].weight.normal_(0, 0.2)
    merged = export_merged(student, world.base_path, tmp_path / "merged")
    out = tmp_path / "eval"
    rc = main(["--merged", str(merged), "--teacher", f"{a}={world.teacher_path(a)}",
               "--teacher", f"{b}={world.teacher_path(b)}", "--toyworld", str(world.root), "--out", str(out),
               "--num-samples", "2", "--steps", "2", "--no-reference", "--metric", "clip_score", "--grid-images", "1",
               "--no-progress", "--interpolate", a, b, "--interp-prompts", "1"])
    assert rc == 0
    sm = json.loads((out / "report.json").read_text())["mixing_smoothness"]
    assert sm["images_per_weight"] == 2 and sm["skipped"] == {}  # --interp-samples 8 capped at --num-samples
    for name in ("classifier", "clip", "clip_paired"):
        c = sm["curves"][name]
        assert len(c["curve"]) == len(W) and all(0.0 <= v <= 1.0 for v in c["curve"])
        assert c["max_jump_between"][1] == pytest.approx(c["max_jump_between"][0] + 0.1)
    assert "minus1to1" in sm["curves"]["clip"]["backbone"]
    with Image.open(out / sm["plot"]) as im:
        assert im.size[1] > im.size[0] / 4  # the strip and the plot beneath it
