"""The synthesized-data stage: each teacher makes its own images (resumable image by image, refused
when made with other settings), and slot i of a micro-batch trains on teacher i's images."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from dmm.data.slots import SynthesizedError, read_synthesized
from dmm.data.synthesize import generate_for, main, synthesized_recipe
from dmm.data.webdata import to_tensor
from dmm.recipes import RecipeError, parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.run import run
from dmm.train.trainer import DistillationTrainer
from tests import tiny_world

SETTINGS = {"per_teacher": 6, "steps": 2, "guidance_scale": 2.0, "batch_size": 4, "samples_per_shard": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("synth"))


def synth_raw(world, out, images, **sections):
    return tiny_recipe_dict(world, out, data={"synthesized": {"path": str(images), **SETTINGS}},
                            log={"samples": False}, **sections)


@pytest.fixture(scope="module")
def made(world, tmp_path_factory):
    """A folder made by the command in one go: (recipe file, folder)."""
    root = tmp_path_factory.mktemp("made")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(synth_raw(world, root / "run", root / "images")))
    assert main(["--recipe", str(path)]) == 0
    return path, root / "images"


def shard_members(folder, style) -> dict[str, bytes]:
    out = {}
    for shard in sorted((folder / style).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_each_teacher_writes_k_images_with_captions(made):
    _, folder = made
    manifest = read_synthesized(folder)
    assert sorted(manifest["styles"]) == ["a", "b"] and manifest["per_teacher"] == 6
    for style in ("a", "b"):
        members = shard_members(folder, style)
        assert sorted(members) == sorted(f"{k:06d}.{e}" for k in range(6) for e in ("png", "txt"))
        assert len(list((folder / style).glob("shard-*.tar"))) == 2  # 4 + 2 at samples_per_shard 4
        assert Image.open(io.BytesIO(members["000000.png"])).size == (16, 16)
        assert members["000000.txt"].decode().strip()
    assert not (folder / ".staging").exists()
    # the teachers differ, so their images of the same prompt and seed do
    a, b = shard_members(folder, "a"), shard_members(folder, "b")
    assert a["000000.txt"] == b["000000.txt"] and a["000000.png"] != b["000000.png"]


@pytest.mark.slow
def test_a_stopped_generation_resumes_to_the_same_bytes(world, made, tmp_path):
    _, whole = made
    raw = synth_raw(world, tmp_path / "run", tmp_path / "images")
    recipe = parse_recipe(raw)
    assert generate_for(recipe, recipe.data.synthesized, max_new_images=5) is None  # "killed" after 5 images
    assert len(list((tmp_path / "images" / ".staging").rglob("*.png"))) == 5
    with pytest.raises(SynthesizedError, match="not finished"):
        read_synthesized(tmp_path / "images")
    assert generate_for(recipe, recipe.data.synthesized) is not None
    for style in ("a", "b"):
        assert shard_members(tmp_path / "images", style) == shard_members(whole, style)
        for shard in (whole / style).glob("*.tar"):
            assert (tmp_path / "images" / style / shard.name).read_bytes() == shard.read_bytes()


def test_other_settings_are_refused_and_nothing_is_lost(made, capsys):
    path, folder = made
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(["--recipe", str(path), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings: steps is 2 there, 3 now" in err and "another folder" in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_command_without_a_synthesized_section_names_the_flags(world, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(world, tmp_path / "run")))
    assert main(["--recipe", str(path)]) == 2
    assert "give --out and --per-teacher" in capsys.readouterr().err


def test_recipe_refuses_a_synthesized_section_without_a_folder(world, tmp_path):
    with pytest.raises(RecipeError, match="data.synthesized.path is empty"):
        parse_recipe(tiny_recipe_dict(world, tmp_path / "run", data={"synthesized": {"per_teacher": 4}}))
    synthesized = {"path": str(tmp_path / "images"), "per_teacher": 4}
    with pytest.raises(RecipeError, match="`synthesized` and `buckets` do not go together"):
        parse_recipe(tiny_recipe_dict(world, tmp_path / "run", data={"synthesized": synthesized, "buckets": "sdxl"}))
    with pytest.raises(RecipeError, match="`synthesized` and `precomputed` do not go together"):
        parse_recipe(tiny_recipe_dict(world, tmp_path / "run", data={"synthesized": synthesized,
                                                                      "precomputed": str(tmp_path / "pre")}))


def style_images(folder, style, resolution=16) -> list[torch.Tensor]:
    members = shard_members(folder, style)
    return [to_tensor(Image.open(io.BytesIO(v)), resolution) for k, v in sorted(members.items()) if k.endswith(".png")]


@pytest.mark.parametrize("accum", [1, 2])  # 1: every batch split between a and b; 2: micro-step m is all teacher m
def test_every_position_reads_its_own_slots_images(world, made, tmp_path, accum):
    _, folder = made
    recipe = parse_recipe(synth_raw(world, tmp_path / "run", folder, distributed={"grad_accum_steps": accum}))
    trainer = DistillationTrainer(recipe)
    own = {i: style_images(folder, name) for i, name in enumerate(recipe.style_names)}
    data = iter(trainer.stream)
    for _ in range(3):  # past an epoch of a slot (6 images, 2 or 4 a micro-batch)
        for m in range(accum):
            batch = next(data)
            for j, slot in enumerate(trainer.micro_styles[m].tolist()):
                assert any(torch.equal(batch["pixels"][j], x) for x in own[slot]), (m, j, slot)
                assert not any(torch.equal(batch["pixels"][j], x) for x in own[1 - slot])


@pytest.mark.slow
def test_stage_after_distillation_makes_its_images_and_trains(world, tmp_path):
    raw = tiny_recipe_dict(world, tmp_path / "run", train={"max_steps": 1}, log={"samples": False})
    raw["stages"] = [{"name": "distill"},
                     {"name": "synthesized", "data": {"synthesized": {"path": str(tmp_path / "images"), **SETTINGS}}}]
    recipe = parse_recipe(raw)
    assert synthesized_recipe(recipe).data.synthesized.per_teacher == 6
    merged = run(recipe)
    assert merged == tmp_path / "run" / "2-synthesized" / "merged"
    assert read_synthesized(tmp_path / "images")["complete"]
    assert not torch.equal(load_file(str(next((merged / "unet").glob("*.safetensors"))))["conv_in.weight"],
                           load_file(str(next((tmp_path / "run" / "1-distill" / "merged" / "unet")
                                              .glob("*.safetensors"))))["conv_in.weight"])


@pytest.mark.slow
def test_synthesized_training_resumes_exactly(world, made, tmp_path):
    _, folder = made

    def recipe(out, steps, **train):
        return parse_recipe(synth_raw(world, out, folder, train={"max_steps": steps, "checkpoint_every": 2, **train},
                                      distributed={"grad_accum_steps": 2}))

    run(recipe(tmp_path / "full", 3))
    run(recipe(tmp_path / "part", 2))
    run(recipe(tmp_path / "part", 3, resume="latest"))
    ckpt = "checkpoints/step-00000003/student.safetensors"
    a, b = load_file(str(tmp_path / "full" / ckpt)), load_file(str(tmp_path / "part" / ckpt))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_shipped_synthesized_recipes(monkeypatch):
    from pathlib import Path

    from dmm.recipes import load_recipe

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    toy = load_recipe(root / "recipes" / "toy_sdxl_4_synth.yaml")
    distill, synth = toy.stages
    assert distill["data"].get("synthesized") is None and synth["data"]["synthesized"]["per_teacher"] == 64
    # stage 2 starts from stage 1's merged model (train.output_dir is relative to the current folder)
    assert synth["model"]["init_from"] == str(root / "runs" / "toy_sdxl_4_synth" / "1-distill" / "merged")
    assert synthesized_recipe(toy).data.synthesized.path == str(root / "runs" / "toy_sdxl_4_synth" / "images")
    sd15 = load_recipe(root / "recipes" / "sd15_synth.yaml")
    s = sd15.data.synthesized
    assert (s.per_teacher, sd15.data.batch_size, sd15.train.max_steps) == (1500, 10, 10000)  # the paper's settings
    assert sd15.model.init_from == str(root / "runs" / "sd15_8" / "merged")
