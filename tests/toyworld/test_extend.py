"""Adding teachers of new styles to a built toy world (`python -m dmm.toyworld.extend`)."""
import json

import pytest
import torch

import dmm.toyworld.extend as extend
from dmm.toyworld import load_world
from dmm.toyworld.build import main
from dmm.toyworld.extend import main as extend_main
from dmm.toyworld.classifier import ToyClassifier
from dmm.toyworld.extend import ExtendError, check_extension


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_extend_adds_teachers_and_classes_keeping_the_world(tmp_path, monkeypatch):
    world_dir = tmp_path / "world"
    main(["--out", str(world_dir), "--scale", "tiny", "--styles", "flat,neon", "--seed", "1",
          "--cache", str(tmp_path / "cache"), "--no-progress"])
    before = _files(world_dir)
    old_clf = ToyClassifier.load(world_dir / "classifier")
    meta0 = json.loads(before["world.json"])

    # a crash while the new world is assembled leaves the old one as it was, and no side folder
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(extend, "save_pipeline", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extend_main([str(world_dir), "--styles", "hatched,sepia", "--cache", str(tmp_path / "xcache"),
              "--no-progress"])
    assert _files(world_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "world", "xcache"]
    monkeypatch.undo()

    extend_main([str(world_dir), "--styles", "hatched,sepia", "--cache", str(tmp_path / "xcache"),
          "--no-progress"])
    after = _files(world_dir)
    # everything the world had is byte-identical, except its classifier and world.json
    changed = [k for k in before if after.get(k) != before[k]]
    assert sorted(changed) == ["classifier/classifier.json", "classifier/classifier.safetensors", "world.json"]
    world = load_world(world_dir)
    assert world.style_names == ["flat", "neon", "hatched", "sepia"]
    meta = world.meta
    assert meta["paths"]["teachers"]["sepia"] == "teachers/sepia"
    assert set(meta["metrics"]["own_style_accuracy"]) == set(world.style_names)
    assert "teacher_hatched" in meta["timings_s"] and meta["timings_s"]["base"] == meta0["timings_s"]["base"]
    ext = meta["extensions"][-1]
    assert ext["styles"] == ["hatched", "sepia"] and ext["previous_styles"] == ["flat", "neon"]
    assert set(ext["classifier_own_style_accuracy"]["before"]) == {"flat", "neon"}
    assert set(ext["teacher_bytes"]) == {"hatched", "sepia"}
    # the new teacher is a pipeline of the same base: same text encoders and VAE, its own UNet
    pipe = world.load_pipeline("sepia")
    base = world.load_pipeline("base")
    assert pipe.unet.dtype == torch.float32
    for a, b in [(pipe.vae, base.vae), (pipe.text_encoder_2, base.text_encoder_2)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(pipe.unet.state_dict().values(),
                                                      base.unet.state_dict().values()))
    image = pipe(world.prompts(1), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # the classifier knows the new classes; the old rows start from the old head (fine-tuned since)
    clf = world.classifier
    assert clf.config.heads["style"] == ["flat", "neon", "hatched", "sepia"]
    assert clf.heads["style"].out_features == 4
    grown = ToyClassifier.load(tmp_path / "xcache" / "classifier_render")
    assert grown.heads["style"].weight[:2].equal(old_clf.heads["style"].weight)
    assert grown.heads["shape"].weight.equal(old_clf.heads["shape"].weight)
    # extending again by a style it now has is refused
    with pytest.raises(ExtendError, match="already has"):
        check_extension(world_dir, "sepia")


def _stub_world(root, styles=("flat", "neon")):
    """A folder load_world accepts (world.json + the folders it names); enough for the refusals."""
    paths = {"base": "base", "clip": "clip", "tokenizer": "tokenizer", "classifier": "classifier",
             "teachers": {s: f"teachers/{s}" for s in styles}}
    for rel in [paths["base"], paths["clip"], paths["tokenizer"], paths["classifier"], *paths["teachers"].values()]:
        (root / rel).mkdir(parents=True)
    meta = {"styles": list(styles), "arch": "sdxl", "resolution": 32, "seed": 0, "paths": paths,
            "sampling": {"num_inference_steps": 2, "guidance_scale": 3.0}, "build": {"config": {}}}
    (root / "world.json").write_text(json.dumps(meta))
    return root


def test_extend_refuses_a_style_the_world_has(tmp_path):
    _stub_world(tmp_path)
    with pytest.raises(ExtendError, match=r"already has \['neon'\].*its styles: \['flat', 'neon'\]"):
        check_extension(tmp_path, "sepia,neon")


def test_extend_refuses_an_unknown_style_listing_the_registered(tmp_path):
    _stub_world(tmp_path)
    with pytest.raises(ExtendError, match=r"unknown style\(s\) \['watercolour'\]; registered: \[.*'hatched'"):
        check_extension(tmp_path, "watercolour")


def test_extend_refuses_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ExtendError, match="not a toy world.*world.json missing"):
        check_extension(tmp_path / "stuff", "sepia")
    with pytest.raises(SystemExit):  # the CLI insists on naming the new styles
        extend_main([str(tmp_path / "stuff")])


def test_extend_refuses_a_world_without_build_settings(tmp_path):
    _stub_world(tmp_path)
    meta = json.loads((tmp_path / "world.json").read_text())
    del meta["build"]
    (tmp_path / "world.json").write_text(json.dumps(meta))
    with pytest.raises(ExtendError, match="no build settings"):
        check_extension(tmp_path, "sepia")
