"""The synthesized-data stage on two real processes (gloo): the command splits the teachers across
ranks, the training run generates its folder on the ranks holding each teacher and then trains;
either way the images are byte for byte those one process makes."""

from __future__ import annotations

import tarfile

import pytest

from dmm.data.slots import read_synthesized
from dmm.data.synthesize import generate_for
from dmm.recipes import parse_recipe
from tests.distributed.launch import REPO, launch, tail
from tests.distributed.world import recipe_dict, write_recipe

SETTINGS = {"per_teacher": 5, "steps": 2, "guidance_scale": 2.0, "batch_size": 2, "samples_per_shard": 4}


def raw_recipe(world, out, images, **sections):
    return recipe_dict(world, out, data={"synthesized": {"path": str(images), **SETTINGS}}, log={"samples": False},
                       **sections)


def members(folder, style) -> dict[str, bytes]:
    out = {}
    for shard in sorted((folder / style).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-one")
    recipe = parse_recipe(raw_recipe(world, root / "run", root / "images"))
    generate_for(recipe, recipe.data.synthesized)
    return root / "images"


@pytest.mark.slow
def test_command_on_two_ranks_makes_the_same_images(world, one_process, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", raw_recipe(world, tmp_path / "run", tmp_path / "images"))
    proc = launch(["--recipe", str(recipe)], script=REPO / "dmm" / "data" / "synthesize.py")
    assert proc.returncode == 0, tail(proc)
    assert sorted(read_synthesized(tmp_path / "images")["styles"]) == ["style0", "style1"]
    for style in ("style0", "style1"):
        assert members(tmp_path / "images", style) == members(one_process, style)


@pytest.mark.slow
def test_training_on_two_ranks_generates_then_trains(world, one_process, tmp_path):
    raw = raw_recipe(world, tmp_path / "run", tmp_path / "images", distributed={"engine": "fsdp2"},
                     train={"max_steps": 2})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = launch(["--recipe", str(recipe)], script=REPO / "launchers" / "train.py")
    assert proc.returncode == 0, tail(proc)
    assert (tmp_path / "run" / "merged" / "unet").is_dir()
    for style in ("style0", "style1"):
        assert members(tmp_path / "images", style) == members(one_process, style)
