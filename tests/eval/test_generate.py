"""Generation cache: resume after interruption, corrupted files, model folder and prompt errors."""

import json

import numpy as np
import pytest

from eval.generate import (
    GenerationCache,
    ImageSet,
    ModelFolderError,
    PromptFileError,
    SamplingConfig,
    check_merged_folder,
    load_prompts,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "small red square", "large blue circle"]


def _sampling():
    return SamplingConfig(steps=2, batch_size=2)


class _Stop(Exception):
    pass


def test_resume_after_interruption(tiny_models, tmp_path):
    s = ImageSet("teacher/red", tiny_models["teachers"]["red_style"], "teacher", None, PROMPTS, list(range(5)))
    first = GenerationCache(tmp_path, _sampling())
    saved = []

    def stop_after_two(path):
        saved.append(path)
        if len(saved) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        first.ensure(s, on_image=stop_after_two)
    folder = first.set_dir(s)
    assert len(list(folder.glob("*.png"))) == 2
    assert not list(folder.glob("*.tmp"))
    (folder / ".junk.png.123.tmp").write_bytes(b"partial")  # a crash mid-write leaves only temp files

    second = GenerationCache(tmp_path, _sampling())
    paths = second.ensure(s)
    assert second.generated == 3  # only the rest
    assert [p.name for p in paths] == s.file_names()
    assert all(p.is_file() for p in paths)
    before = {p.name: p.read_bytes() for p in saved}
    assert all(before[p.name] == p.read_bytes() for p in saved)  # finished images were not touched

    # a corrupted (truncated) image is not trusted: regenerated, and only it
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    third = GenerationCache(tmp_path, _sampling())
    third.ensure(s)
    assert third.generated == 1
    assert GenerationCache.load_images([paths[3]]).shape[1] == 3

    # a fully cached set never loads the pipeline
    def no_loader(model, kind):
        raise AssertionError("pipeline loaded although everything is cached")

    fourth = GenerationCache(tmp_path, _sampling(), loader=no_loader)
    assert fourth.ensure(s) == paths and fourth.generated == 0


def test_cache_key_separates_settings_styles_and_models(tiny_models, tmp_path):
    merged = tiny_models["merged"]
    a = ImageSet("m/a", merged, "merged", "red_style", PROMPTS[:1], [0])
    b = ImageSet("m/b", merged, "merged", "blue_style", PROMPTS[:1], [0])
    c1, c2 = GenerationCache(tmp_path, _sampling()), GenerationCache(tmp_path, SamplingConfig(steps=3))
    assert c1.set_dir(a) != c1.set_dir(b)
    assert c1.set_dir(a) != c2.set_dir(a)
    assert c1.set_dir(a) == GenerationCache(tmp_path, SamplingConfig(steps=2, batch_size=7)).set_dir(a)
    t = ImageSet("t", tiny_models["teachers"]["red_style"], "teacher", None, PROMPTS[:1], [0])
    assert c1.set_dir(t) != c1.set_dir(a)
    ia, ib = c1.ensure(a), c1.ensure(b)  # real merged pipeline, two styles
    assert json.loads((c1.set_dir(a) / "set.json").read_text())["style"] == "red_style"
    assert not np.array_equal(GenerationCache.load_images(ia).numpy(), GenerationCache.load_images(ib).numpy())


def test_features_are_cached_per_image(tiny_models, tmp_path):
    import torch

    from eval.features import ModuleFeatures

    s = ImageSet("t", tiny_models["teachers"]["blue_style"], "teacher", None, PROMPTS[:3], [0, 1, 2])
    cache = GenerationCache(tmp_path, _sampling())
    paths = cache.ensure(s)
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x.mean(dim=(2, 3))

    ext = ModuleFeatures(Net(), name="mean-rgb", dim=3)
    f1 = cache.features(s, paths, ext)
    assert f1.shape == (3, 3) and sum(calls) == 3
    f2 = cache.features(s, paths, ext)
    assert torch.equal(f1, f2) and sum(calls) == 3  # read back, not recomputed
    torch.testing.assert_close(f1, GenerationCache.load_images(paths).double().mean(dim=(2, 3)))
    # a damaged feature cache or set.json is not trusted: recomputed / rewritten, same result
    for f in cache.set_dir(s).glob("features-*.npz"):
        f.write_bytes(b"PK\x03\x04 truncated")
    (cache.set_dir(s) / "set.json").write_text("{not json")
    f3 = cache.features(s, cache.ensure(s), ext)
    assert torch.equal(f1, f3) and sum(calls) == 6 and cache.generated == 3


def test_not_a_merged_model_says_what_was_expected(tiny_models, tmp_path):
    with pytest.raises(ModelFolderError, match="StyleUNet2DConditionModel"):
        check_merged_folder(tiny_models["teachers"]["red_style"])
    with pytest.raises(ModelFolderError, match="model_index.json"):
        check_merged_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="not found"):
        check_merged_folder(tmp_path / "missing")
    assert check_merged_folder(tiny_models["merged"]) == tiny_models["styles"]


def test_prompt_files(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("a red circle\n\n  a blue square  \n")
    assert load_prompts(good) == ["a red circle", "a blue square"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts(tmp_path / "missing.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts(binary)


def test_a_few_step_merged_model_samples_as_its_export_records(tiny_models, tmp_path):
    """A SPLAM export records LCM / 4 steps / guidance 1: its sets use them, teachers keep the suite's."""
    import shutil

    folder = tmp_path / "few"
    shutil.copytree(tiny_models["merged"], folder)
    info_path = folder / "dmm_merge.json"
    info = json.loads(info_path.read_text())
    info["sampling"] = {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
    info_path.write_text(json.dumps(info))
    cache = GenerationCache(tmp_path / "cache", SamplingConfig(steps=2, guidance_scale=3.0, batch_size=2))
    style = json.loads(info_path.read_text())["style_names"][0]
    merged = ImageSet("merged/x", str(folder), "merged", style, PROMPTS[:1], [0])
    plain = ImageSet("merged/y", tiny_models["merged"], "merged", style, PROMPTS[:1], [0])
    teacher = ImageSet("teacher/x", next(iter(tiny_models["teachers"].values())), "teacher", None, PROMPTS[:1], [0])
    few = cache.sampling_for(merged)
    assert (few.steps, few.guidance_scale, few.scheduler, few.negative_prompt) == (4, 1.0, "pipeline", "")
    assert cache.sampling_for(plain) == cache.sampling_for(teacher) == cache.sampling
    assert cache.set_key(merged)["sampling"]["steps"] == 4
