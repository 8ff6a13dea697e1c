"""Weight averages under sharding: `optim.ema_decay` and the SPLAM stage's target over two ranks;
the student started from the teachers' average (`model.init_average`) on both ranks.

ZeRO-3 and FSDP2 hold only a shard of the student on each rank; the averages read the whole
weights through `engine.full_params` (a gather). Rank 0 replays them from the engine's full state
dict, and SPLAM's target must be the same whole model on both ranks.
"""

from __future__ import annotations

import json

import pytest

from dmm.recipes import parse_recipe
from dmm.train.run import run
from tests.distributed.launch import launch, tail
from tests.distributed.world import recipe_dict, write_recipe

pytest.importorskip("deepspeed")

ENGINES = {"deepspeed": {"engine": "deepspeed", "options": {"zero_stage": 3}}, "fsdp2": {"engine": "fsdp2"}}


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("averages")
    return run(parse_recipe(recipe_dict(world, out / "first", train={"max_steps": 1}, log={"samples": False})))


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_splam_target_and_export_average_over_two_sharded_ranks(world, merged, tmp_path, engine):
    raw = recipe_dict(world, tmp_path / "run", distributed=ENGINES[engine], train={"max_steps": 3},
                      model={"init_from": str(merged)}, optim={"lr": 1e-3, "ema_decay": 0.5},
                      objective={"name": "splam", "options": {"ddim_steps": 10, "guidance": 2.0, "cond_dim": 16}})
    proc = launch(["averages", str(write_recipe(tmp_path / "r.yaml", raw)), str(tmp_path / "out")])
    assert proc.returncode == 0, tail(proc)
    ranks = [json.loads((tmp_path / "out" / f"averages.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["names"] == ["splam_target", "student"] and ranks[1]["names"] == ["splam_target"]
    for name, err in ranks[0]["max_err"].items():
        assert err < 1e-5, (name, err)
    assert ranks[0]["moved"] > 1e-6  # the averages trail the trained weights
    assert ranks[0]["target_sum"] == ranks[1]["target_sum"]
    assert all(l["consistency"] > 0 for r in ranks for l in r["losses"])


@pytest.mark.slow
def test_every_rank_starts_from_the_average_rank_0_made(world, tmp_path):
    raw = recipe_dict(world, tmp_path / "run", distributed=ENGINES["fsdp2"], model={"init_average": True})
    proc = launch(["init_average", str(write_recipe(tmp_path / "r.yaml", raw)), str(tmp_path / "out")])
    assert proc.returncode == 0, tail(proc)
    got = json.loads((tmp_path / "out" / "init_average.json").read_text())
    assert got["keys"] > 100 and got["max_err"] == 0.0, got
