"""The `make demo` summary (eval.demo): the eval package's own steps give the numbers it always printed."""

import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def test_demo_summary_matches_a_direct_computation(world, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.recipes import load_recipe
    from dmm.train.export import export_merged
    from eval.demo import summarise
    from eval.fid import fid_matrix
    from eval.generate import GenerationCache

    recipe = load_recipe(REPO / "recipes" / "toy_sdxl_4.yaml",
                         ["sample.n_per_style=3", "sample.steps=2", "sample.grid_prompts=2",
                          f"data.toyworld.world={world.root}"])
    styles = recipe.style_names
    student = StyleUNet2DConditionModel.from_unet(
        UNet2DConditionModel.from_pretrained(str(world.base_path / "unet"), local_files_only=True), styles)
    with torch.no_grad():
        torch.manual_seed(0)
        student.class_embedding.mlp[2].weight.normal_(0, 0.1)
    merged = export_merged(student, world.base_path, tmp_path / "merged")
    summary = summarise(recipe, merged, cache_root=tmp_path / "cache", out=tmp_path / "summary")

    printed = capsys.readouterr().out
    assert "DMM toy demo: merged model vs its teachers (3 samples per style, toy-FID" in printed
    for row in summary["styles"]:
        line = f"{row['style']:10s} {row['fid_own_teacher']:8.2f} {row['fid_nearest_other_teacher']:10.2f}"
        assert line in printed
    assert f"merged model: {merged}" in printed and (tmp_path / "summary" / "summary.json").is_file()

    # the old dmm.demo computation, from the same cached images: features of all images at once
    by_label = {}
    for meta in (tmp_path / "cache").glob("*/set.json"):
        label = json.loads(meta.read_text())["label"]
        by_label[label] = GenerationCache.load_images(sorted(meta.parent.glob("*.png")))
    assert sorted(by_label) == sorted([f"merged/{s}" for s in styles] + [f"teacher/{s}" for s in styles])
    clf = world.classifier
    with torch.no_grad():
        feats = {k: clf.features(v).double() for k, v in by_label.items()}
        heads = clf.config.heads["style"]
        acc = {k: float((clf.predict(v)["style"] == heads.index(k.split("/")[1])).float().mean())
               for k, v in by_label.items()}
    m = fid_matrix([feats[f"merged/{s}"] for s in styles], [feats[f"teacher/{s}"] for s in styles])
    np.testing.assert_allclose(np.array(summary["fid_matrix"]), m, rtol=1e-6, atol=1e-6)
    for row in summary["styles"]:
        assert row["style_acc_merged"] == acc[f"merged/{row['style']}"]
        assert row["style_acc_teacher"] == acc[f"teacher/{row['style']}"]
