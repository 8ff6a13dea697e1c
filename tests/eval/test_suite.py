"""End to end: `python -m eval.suite` on a tiny merged model and its teachers writes the full report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.features import FEATURE_EXTRACTORS, ModuleFeatures
from eval.suite import main, teachers_from_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def colour_features():
    """A registered extractor: per-channel means and spreads of 4x4 pooled images (24-d)."""

    class Net(torch.nn.Module):
        def forward(self, x):
            p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
            return torch.cat([p, p**2], 1)

    FEATURE_EXTRACTORS.add("test-colour", lambda cfg: ModuleFeatures(Net(), name="test-colour", dim=24),
                           description="pooled colour statistics (test)")
    yield "test-colour"
    FEATURE_EXTRACTORS.remove("test-colour")


def _args(tiny_models, out, prompts, features, clip_dir, *extra):
    teachers = [a for s, p in tiny_models["teachers"].items() for a in ("--teacher", f"{s}={p}")]
    return ["--merged", tiny_models["merged"], *teachers, "--out", str(out), "--prompts", str(prompts),
            "--num-samples", "4", "--steps", "2", "--batch-size", "4", "--features", features,
            "--clip-model", str(clip_dir), "--grid-images", "3", "--no-progress", *extra]


def test_suite_writes_full_report_and_resumes(tiny_models, tiny_clip_dir, colour_features, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "eval"
    styles = tiny_models["styles"]
    rc = main(_args(tiny_models, out, prompts, colour_features, tiny_clip_dir,
                    "--interpolate", styles[0], styles[1], "--interp-prompts", "1", "--interp-samples", "1",
                    "--mix", *styles,
                    "--baseline", f"wm={tiny_models['base']}"))
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    fid = report["fid"]
    m, m_ref = np.array(fid["M"]), np.array(fid["M_ref"])
    assert m.shape == m_ref.shape == (2, 2) and np.isfinite(m).all() and (m >= 0).all()
    assert fid["FIDt"] == pytest.approx(np.trace(m)) and fid["FIDt_ref"] == pytest.approx(np.trace(m_ref))
    assert fid["rows"] == styles and fid["cols"] == styles and fid["pairing"] == "by name"
    assert report["features"]["name"] == "test-colour"
    assert report["settings"]["sampling"]["negative_prompt"].startswith("worst quality")
    assert report["settings"]["sampling"]["scheduler"] == "dpmsolver++"
    assert report["settings"]["num_samples"] == 4 and report["resolution"] == [16, 16]
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    clip = report["scores"]["clip_score"]
    assert str(Path(tiny_clip_dir).resolve()) in clip["backbone"]
    assert set(clip["per_set"]) == {f"merged/{s}" for s in styles} | {f"teacher/{s}" for s in styles} | {
        f"merged/mix({'+'.join(styles)})", "baseline/wm"}
    assert "skipped" in report["scores"]["aesthetic"] and "skipped" in report["scores"]["pick_score"]
    # merged, teacher, reference, mix, baseline, strip; the strip's 0.5/0.5 image is the mix's first
    assert report["generated_this_run"] == 2 * 4 * 3 + 4 + 4 + 11 - 1
    assert report["baselines"] == {"wm": tiny_models["base"]}
    for name in ["fid_heatmaps.png", *report["files"]["grids"].values(), report["files"]["interpolation"]]:
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / report["files"]["grids"][styles[0]]) as im:
        assert im.size[1] > im.size[0] / 3 / 2  # two rows of three cells
    rows = [json.loads(line) for line in (out / "scores_per_image.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 4 and {"set", "image", "prompt", "seed", "clip_score"} <= set(rows[0])
    first = [r["clip_score"] for r in rows if r["set"] == f"merged/{styles[0]}"]
    assert np.mean(first) == pytest.approx(clip["per_set"][f"merged/{styles[0]}"]["mean"])
    md = (out / "report.md").read_text()
    assert "FIDt" in md and "fid_heatmaps.png" in md and "aesthetic" in md

    # a second run reads everything from the cache and gives the same numbers
    rc = main(_args(tiny_models, out, prompts, colour_features, tiny_clip_dir))
    assert rc == 0
    again = json.loads((out / "report.json").read_text())
    assert again["generated_this_run"] == 0
    assert again["fid"]["M"] == fid["M"] and again["fid"]["M_ref"] == fid["M_ref"]


def test_suite_errors_are_clear(tiny_models, tiny_clip_dir, colour_features, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = _args(tiny_models, tmp_path / "o", prompts, colour_features, tiny_clip_dir)
    bad = list(args)
    bad[1] = tiny_models["teachers"]["red_style"]  # a teacher is not a merged model
    assert main(bad) == 2
    assert "StyleUNet2DConditionModel" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = list(args)
    bad[bad.index("--prompts") + 1] = str(empty)
    assert main(bad) == 2
    assert "no prompts" in capsys.readouterr().err
    bad = list(args)
    bad[bad.index("--num-samples") + 1] = "1"
    assert main(bad) == 2
    assert "at least 2" in capsys.readouterr().err
    # options that would only fail after sampling are checked first: nothing is generated
    assert main([*args, "--mix", "red_style", "nope"]) == 2
    assert "--mix" in capsys.readouterr().err
    assert main([*args, "--aesthetic-weights", str(tmp_path / "missing.pth")]) == 2
    assert "--aesthetic-weights" in capsys.readouterr().err
    assert main([*args, "--pick-model", str(tmp_path / "nothing")]) == 2
    assert "--pick-model" in capsys.readouterr().err
    assert not list((tmp_path / "o").rglob("*.png"))


def test_teachers_from_recipe(tmp_path):
    (tmp_path / "t1").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teachers:\n  - {name: anime, path: t1}\n  - {name: real, path: /abs/real}\n")
    assert teachers_from_recipe(recipe) == {"anime": str(tmp_path / "t1"), "real": "/abs/real"}
    recipe.write_text("student: {}\n")
    with pytest.raises(ValueError, match="teachers"):
        teachers_from_recipe(recipe)


def test_cli_help():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "eval.suite", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--merged", "--teachers-from-recipe", "--inception-weights", "--clip-model", "--interpolate",
                 "FIDt", "runs/toy_sdxl_4/merged"):
        assert flag in res.stdout
