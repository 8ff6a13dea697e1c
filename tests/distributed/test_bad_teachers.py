"""A teacher with NaN weights on one rank of two: both ranks stop at load with the same clean line.

Two real processes of `launchers/train.py` on gloo (FSDP2 engine), started with the environment
torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so each
rank's own stderr and exit status can be checked (torchrun would kill the slower rank as soon as
the first one exits).
"""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.distributed.launch import error_lines_of_two_ranks
from tests.distributed.world import recipe_dict, write_recipe


def poison(folder, key: str = "mid_block.resnets.0.conv1.weight") -> str:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    return key


@pytest.mark.slow
def test_nan_teacher_on_one_rank_stops_both_with_one_line(world, tmp_path):
    bad = tmp_path / "style1-nan"
    shutil.copytree(world.teachers["style1"], bad)
    key = poison(bad)
    raw = recipe_dict(world, tmp_path / "run", teachers=2, distributed={"engine": "fsdp2"})
    raw["teachers"][1]["path"] = str(bad)  # rank r holds teacher r: only rank 1 loads the bad one
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    errors = error_lines_of_two_ranks(recipe)
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"error: teacher loading failed on 1 of 2 ranks: rank 1: teacher 'style1' ({bad}): "
                                f"non-finite weights, first in {key} (1 of ")
    assert "lr" not in errors[0]  # not blamed on the learning rate at step 1
