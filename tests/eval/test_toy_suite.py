"""The toy defaults: toy prompts, the toy classifier's FID features, the toy CLIP, style accuracy.

Runs on the shipped toy world (assets/toyworld, or $DMM_EVAL_TOYWORLD); skips with the reason when it
has not been built.
The merged model is the world's base UNet turned into a style UNet (untrained), which is enough to
exercise every toy code path end to end.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_suite_toy_defaults(world, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.train.export import export_merged
    from eval.suite import main

    styles = world.style_names[:2]
    base_unet = UNet2DConditionModel.from_pretrained(str(world.base_path / "unet"), local_files_only=True)
    student = StyleUNet2DConditionModel.from_unet(base_unet, styles)
    with torch.no_grad():
        torch.manual_seed(0)
        student.class_embedding.mlp[2].weight.normal_(0, 0.1)
    merged = export_merged(student, world.base_path, tmp_path / "merged")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teachers:\n" + "".join(f"  - {{name: {s}, path: {world.teacher_path(s)}}}\n" for s in styles))
    out = tmp_path / "eval"
    rc = main(["--merged", str(merged), "--teachers-from-recipe", str(recipe), "--out", str(out),
               "--toyworld", str(world.root), "--num-samples", "4", "--steps", "2", "--grid-images", "2", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["features"]["name"] == "toyworld"
    assert report["settings"]["prompts"]["source"].startswith("toy world")
    assert report["settings"]["sampling"]["negative_prompt"] == ""
    assert report["resolution"] == [world.resolution, world.resolution]
    assert np.isfinite(np.array(report["fid"]["M"])).all()
    clip = report["scores"]["clip_score"]
    assert "minus1to1" in clip["backbone"] and len(clip["per_set"]) == 4
    assert set(report["style_accuracy"]) == {f"merged/{s}" for s in styles} | {f"teacher/{s}" for s in styles}
    for name in ["fid_heatmaps.png", *report["files"]["grids"].values()]:
        with Image.open(out / name) as im:
            im.verify()
