"""A bad shard read by one rank of two, mid-run: both ranks stop with the same clean line.

Without the per-step agreement the healthy rank would wait in the next collective until the
process group's timeout. Two real `launchers/train.py` processes on gloo (FSDP2).
"""

from __future__ import annotations

import tarfile

import pytest

from tests.distributed.launch import error_lines_of_two_ranks
from tests.distributed.world import recipe_dict, write_recipe


def without_captions(good, bad) -> None:
    """A copy of shard `good` whose samples lost their caption member."""
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".txt"):
                dst.addfile(member, src.extractfile(member))


@pytest.mark.slow
def test_a_bad_shard_on_one_rank_stops_both_ranks_with_one_line(world, tmp_path):
    bad = tmp_path / "shard-bad.tar"
    without_captions(world.shards[1], bad)
    raw = recipe_dict(world, tmp_path / "run", teachers=2, distributed={"engine": "fsdp2"},
                      train={"max_steps": 20, "checkpoint_every": 100})
    raw["data"]["shards"] = [str(world.shards[0]), str(bad)]  # two shards: each rank reads one of them
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    lines = error_lines_of_two_ranks(recipe)
    assert lines[0] == lines[1]
    assert lines[0].startswith("error: reading data for step 1 failed on 1 of 2 ranks: rank ")
    assert f"shard {bad}" in lines[0] and "no 'txt' caption" in lines[0]
