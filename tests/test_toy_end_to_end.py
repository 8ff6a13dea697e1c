"""The whole method on the shipped toy world: a few distillation steps, export, every style generates."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "toy_sdxl_4.yaml"


def test_launcher_trains_exports_and_generates_every_style(tmp_path):
    from dmm.pipeline import generate, load_merged
    from dmm.recipes import load_recipe

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launchers" / "train.py"), "--recipe", str(RECIPE),
           "--set", "train.max_steps=3", "--set", f"train.output_dir={out}", "--set", "data.batch_size=8",
           "--set", "data.toyworld.n_samples=256", "--set", "train.checkpoint_every=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"merged model: {out / 'merged'}" in done.stdout
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.train.max_steps == 3
    pipe = load_merged(out / "merged")
    assert pipe.unet.style_names == ["flat", "outline", "neon", "pixel"]
    for style in pipe.unet.style_names + [{"flat": 0.5, "neon": 0.5}]:
        image = generate(pipe, ["a small red circle"], style, steps=4, guidance_scale=3.0)[0]
        assert image.size == (32, 32)
        assert torch.tensor(list(image.getdata())).float().std() > 0


def test_launcher_rejects_a_misspelt_key_with_the_closest_one():
    cmd = [sys.executable, str(ROOT / "launchers" / "train.py"), "--recipe", str(RECIPE),
           "--set", "train.max_step=3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key 'train.max_step'; did you mean 'max_steps'?" in done.stderr


@pytest.mark.parametrize("style", ["anime"])
def test_unknown_style_lists_known_ones(tmp_path, style):
    from dmm.testing import make_tiny_pipeline
    from dmm.models.student import StyleUNet2DConditionModel

    pipe = make_tiny_pipeline(tmp_path / "base", "sdxl")
    unet = StyleUNet2DConditionModel.from_unet(pipe.unet, ["flat", "neon"])
    with pytest.raises(ValueError, match=r"unknown style 'anime'; known styles: \['flat', 'neon'\]"):
        unet.set_style(style)
