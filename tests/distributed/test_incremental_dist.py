"""The incremental objective on two real processes (gloo) under DeepSpeed ZeRO-2 and FSDP2.

A merged model of style0 and style1 gains style2; the frozen copy of the merged model (the
regulariser) is the second supervisor slot, so rank 0 holds teacher style2 and rank 1 the
previous student, each loaded only there. Three training steps; every step's losses on each rank
equal a single-process replay of the same batches and random draws with both supervisors, with
activation checkpointing of the student and the discriminator on (the generator loss's frozen
pass recomputed in backward after the discriminator is trainable again).
"""

from __future__ import annotations

import json

import pytest

from dmm.objectives.incremental import PREVIOUS
from dmm.recipes import parse_recipe
from dmm.testing import tiny_recipe_dict
from dmm.train.run import run
from tests.distributed.launch import launch, tail
from tests.distributed.world import recipe_dict, write_recipe

pytest.importorskip("deepspeed")

# (distributed section, train.gradient_checkpointing): both with the student's and the discriminator's
# activation checkpointing, as sdxl_4 ships (the replay in one process checkpoints too); the other
# distributed tests run without it.
ENGINES = {"deepspeed": ({"engine": "deepspeed", "options": {"zero_stage": 2}}, True),
           "fsdp2": ({"engine": "fsdp2"}, True)}
STEPS = 3


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    """A 2-style merged model (style0, style1) of the distributed tests' world, 2 steps in one process."""
    root = tmp_path_factory.mktemp("incremental-first")
    raw = tiny_recipe_dict(world, root / "run", teachers=2, train={"max_steps": 2}, log={"samples": False})
    return run(parse_recipe(raw))


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_regulariser_slot_and_losses_match_one_process(world, merged, tmp_path, engine):
    dist, checkpointing = ENGINES[engine]
    raw = recipe_dict(world, tmp_path / "run", teachers=3, distributed=dist,
                      model={"init_from": str(merged)}, objective={"name": "incremental"},
                      train={"max_steps": STEPS, "gradient_checkpointing": checkpointing}, log={"samples": False})
    raw["teachers"] = raw["teachers"][2:]  # style2 is new; the regulariser keeps style0 and style1
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = launch(["incremental", str(recipe), str(tmp_path / "out")])
    assert proc.returncode == 0, tail(proc)
    ranks = [json.loads((tmp_path / "out" / f"incremental.rank{r}.json").read_text()) for r in range(2)]

    for r, res in enumerate(ranks):
        assert res["slots"] == ["style2", PREVIOUS]
        assert res["local"] == [r] and res["styles"] == [r] * 2  # one slot per rank, its samples only
        assert res["loaded"] == {str(r): ["style2", PREVIOUS][r]}  # the frozen copy exists on rank 1 only
    main = ranks[0]
    assert main["reference_loaded"] == {"0": "style2", "1": PREVIOUS}
    assert len(main["rank_losses"]) == STEPS
    for step, (got_ranks, want_ranks) in enumerate(zip(main["rank_losses"], main["reference_losses"])):
        for got, want in zip(got_ranks, want_ranks):
            assert set(got) == set(want) >= {"score", "feat", "gen", "disc", "total"}
            # Step 1 from the same weights; later steps after the engine's reduced update vs one process's.
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5 if step == 0 else 1e-4), (step, k)
