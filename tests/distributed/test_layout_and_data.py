"""Teacher layout rule and the data stream's rank/worker split (one process, no engines)."""

from collections import Counter

import pytest

from dmm.data import ShardStream
from dmm.distributed.env import first_host, launch_env
from dmm.train.layout import LayoutError, TeacherLayout


@pytest.mark.parametrize("world_size,teachers,accum", [(2, 2, 1), (4, 2, 1), (2, 4, 2), (3, 2, 2), (6, 4, 2),
                                                        (5, 4, 4), (16, 8, 1), (1, 3, 3)])
def test_rotation_gives_every_teacher_equal_slots(world_size, teachers, accum):
    layout = TeacherLayout(world_size, teachers, accum)
    assert layout.rotates
    slots = Counter(layout.styles_for_batch(r, 1, m)[0] for r in range(world_size) for m in range(accum))
    assert set(slots) == set(range(teachers))
    assert len(set(slots.values())) == 1  # equal weight
    for r in range(world_size):  # a rank holds exactly the teachers it uses
        used = {layout.styles_for_batch(r, 1, m)[0] for m in range(accum)}
        assert set(layout.teachers_for_rank(r)) == used


def test_paper_layout_is_rank_mod_n():
    layout = TeacherLayout(16, 8, 1)
    assert [layout.teachers_for_rank(r) for r in range(16)] == [[r % 8] for r in range(16)]


def test_batch_split_when_ranks_divide_teachers():
    layout = TeacherLayout(1, 2, 1)  # one process, no accumulation: every batch split between teachers
    assert not layout.rotates
    assert layout.styles_for_batch(0, 4) == [0, 1, 0, 1]


@pytest.mark.parametrize("world_size,teachers,accum", [(3, 2, 1), (6, 4, 1), (5, 4, 2)])
def test_impossible_layouts_are_refused_with_the_fix(world_size, teachers, accum):
    with pytest.raises(LayoutError, match="grad_accum_steps to a multiple of"):
        TeacherLayout(world_size, teachers, accum)


def test_refused_before_any_model_is_loaded(tmp_path):
    from dmm.recipes import parse_recipe
    from dmm.train.trainer import DistillationTrainer

    class ThreeRanks:  # only the world size matters: the layout check comes first
        rank, world_size, is_main = 0, 3, True

    raw = {"name": "x", "model": {"base": str(tmp_path / "no-base")},
           "teachers": [{"name": "a", "path": str(tmp_path / "a")}, {"name": "b", "path": str(tmp_path / "b")}],
           "data": {"shards": ["x.tar"]}}
    with pytest.raises(LayoutError, match="cannot give 2 teachers equal weight on 3 ranks"):
        DistillationTrainer(parse_recipe(raw), engine=ThreeRanks())


def test_launch_env_from_slurm_and_torchrun():
    slurm = launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                        "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.source) == (3, 8, 1, "slurm")
    assert slurm.master_addr.startswith("gpu") and slurm.master_port == 20000 + 4242
    tr = launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9"})
    assert (tr.rank, tr.world_size, tr.master_addr, tr.master_port, tr.source) == (1, 2, "h", 9, "torchrun")
    assert not launch_env({}).distributed
    assert first_host("node[03-05,9],other") in ("node03",)


def _batches(stream, n):
    it = iter(stream)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((b["pixels"].clone(), list(b["captions"]), stream.epoch, stream.consumed))
    return out


def test_workers_give_the_same_batches_and_positions(world):
    shards = [str(s) for s in world.shards]
    kw = dict(batch_size=3, resolution=16, seed=1, rank=1, world_size=2, shuffle_buffer=8)
    plain = _batches(ShardStream(shards, **kw), 14)  # 32 samples per rank: crosses an epoch
    shared = _batches(ShardStream(shards, num_workers=2, **kw), 14)
    for a, b in zip(plain, shared):
        assert a[1:] == b[1:] and (a[0] == b[0]).all()
    # Resume from the middle: the same continuation.
    resumed = ShardStream(shards, num_workers=2, **kw)
    resumed.load_state_dict({"epoch": plain[6][2], "consumed": plain[6][3], "seed": 1, "rank": 1, "world_size": 2})
    for a, b in zip(plain[7:], _batches(resumed, 7)):
        assert a[1:] == b[1:] and (a[0] == b[0]).all()


def test_ranks_see_disjoint_samples_within_an_epoch(world):
    shards = [str(s) for s in world.shards]
    seen = []
    for rank in range(2):
        stream = ShardStream(shards, batch_size=1, resolution=16, seed=3, rank=rank, world_size=2)
        keys = []
        for batch in stream:
            if stream.epoch > 0:
                break
            keys.append(batch["pixels"].sum().item())
        seen.append(keys)
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1])
