"""The `make demo` summary (eval.demo): the eval package's own steps give the numbers it always printed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_demo_summary_matches_a_direct_computation(world, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.recipes import load_recipe
    from dmm.train.export import export_merged
    from eval.demo import REF_SEED, summarise
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
    assert f"FIDt {summary['FIDt']:.2f} against the teachers' own reference {summary['FIDt_ref']:.2f}" in printed
    assert f"ratio {summary['FIDt_ratio']:.2f}; target <= 1.10" in printed

    # the old dmm.demo computation, from the same cached images: features of all images at once
    # (a teacher's folder holds its images at both seed ranges: files are named by seed)
    by_label = {}
    for meta in (tmp_path / "cache").glob("*/set.json"):
        label = json.loads(meta.read_text())["label"]
        files = sorted(meta.parent.glob("*.png"))
        ref = [f for f in files if int(f.name[1:11]) >= REF_SEED]
        by_label[label] = GenerationCache.load_images([f for f in files if f not in ref])
        if ref:
            by_label[label.replace("teacher/", "teacher-ref/")] = GenerationCache.load_images(ref)
    assert sorted(by_label) == sorted([f"{kind}/{s}" for kind in ("merged", "teacher", "teacher-ref") for s in styles])
    clf = world.classifier
    with torch.no_grad():
        feats = {k: clf.features(v).double() for k, v in by_label.items()}
        heads = clf.config.heads["style"]
        acc = {k: float((clf.predict(v)["style"] == heads.index(k.split("/")[1])).float().mean())
               for k, v in by_label.items()}
    m = fid_matrix([feats[f"merged/{s}"] for s in styles], [feats[f"teacher/{s}"] for s in styles])
    np.testing.assert_allclose(np.array(summary["fid_matrix"]), m, rtol=1e-6, atol=1e-6)
    # FIDt and its reference as the eval suite defines them: columns are the teachers on other seeds
    refs = [feats[f"teacher-ref/{s}"] for s in styles]
    fidt = np.trace(fid_matrix([feats[f"merged/{s}"] for s in styles], refs))
    fidt_ref = np.trace(fid_matrix([feats[f"teacher/{s}"] for s in styles], refs))
    np.testing.assert_allclose([summary["FIDt"], summary["FIDt_ref"]], [fidt, fidt_ref], rtol=1e-6)
    assert summary["FIDt_ratio"] == pytest.approx(fidt / fidt_ref)
    assert not torch.equal(by_label["teacher/flat"], by_label["teacher-ref/flat"])  # other seeds
    for row in summary["styles"]:
        assert row["style_acc_merged"] == acc[f"merged/{row['style']}"]
        assert row["style_acc_teacher"] == acc[f"teacher/{row['style']}"]
