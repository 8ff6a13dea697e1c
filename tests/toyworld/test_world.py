"""The shipped world in assets/toyworld: loads, and meets the quality bar recorded at build time."""
import json
import shutil

import pytest
import torch

from dmm.toyworld import ToyClassifier, WorldNotFoundError, load_world
from dmm.toyworld.world import resolve_world_path


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_shipped_world_metadata(world):
    assert world.arch == "sdxl" and world.resolution == 32
    assert world.style_names[:4] == ["flat", "outline", "neon", "pixel"]  # + styles added by --extend
    acc = world.meta["metrics"]["own_style_accuracy"]
    assert set(acc) == set(world.style_names)
    for style in world.style_names:
        rep = world.meta["metrics"]["teachers"][style]
        assert rep["n"] >= 128
        assert acc[style] >= 0.9, (style, acc[style])


def test_shipped_classifier(world):
    from dmm.toyworld import render
    from dmm.toyworld.content import sample_contents

    clf = world.classifier
    assert isinstance(clf, ToyClassifier)
    contents = sample_contents(16, seed=5)
    images = [render(c, world.style_names[i % 4], i) for i, c in enumerate(contents)]
    pred = clf.predict(images)
    assert set(pred) == {"style", "shape", "colour", "size", "position"}
    styles = torch.tensor([i % 4 for i in range(16)])
    assert (pred["style"] == styles).float().mean() >= 0.9
    feats = clf.features(torch.stack([torch.from_numpy(__import__("numpy").asarray(im)).permute(2, 0, 1)
                                      for im in images]).float() / 255)
    assert feats.shape == (16, clf.config.feature_dim) and torch.isfinite(feats).all()


def test_shipped_teachers_load(world):
    from diffusers import StableDiffusionXLPipeline

    for style in world.style_names:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(world.teacher_path(style)))
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    world.load_pipeline("base")
    assert world.clip_path.is_dir() and world.tokenizer_path.is_dir()


def test_missing_world_error_names_path_and_command(tmp_path):
    with pytest.raises(WorldNotFoundError) as e:
        load_world(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "python -m dmm.toyworld.build --out" in str(e.value)


def test_corrupt_world_error(tmp_path):
    src = resolve_world_path()
    (tmp_path / "w").mkdir()
    shutil.copy(src / "world.json", tmp_path / "w" / "world.json")
    with pytest.raises(WorldNotFoundError, match="incomplete"):
        load_world(tmp_path / "w")  # folders missing
    (tmp_path / "w" / "world.json").write_text(json.dumps({"styles": []}))
    with pytest.raises(WorldNotFoundError, match="corrupt"):
        load_world(tmp_path / "w")
