"""Two real processes over gloo for each distributed engine (DeepSpeed ZeRO, FSDP2).

One launch per engine checks the layout, the teacher-missing error, sharding and the gradient;
three launches per engine check exact resume after SIGKILL. DeepSpeed compiles a communication
op once (~50 s per rank, cached in TORCH_EXTENSIONS_DIR; the Makefile sets it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import launch, tail
from tests.distributed.world import recipe_dict, write_recipe

pytest.importorskip("deepspeed")

ENGINES = {
    # ZeRO-3 shards the student's parameters; the props run checks it.
    "deepspeed": {"engine": "deepspeed", "options": {"zero_stage": 3}},
    "fsdp2": {"engine": "fsdp2"},
}


def read_json(path: Path):
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_ranks_layout_sharding_gradient_and_missing_teacher(world, tmp_path, engine):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(world, tmp_path / "run", teachers=2,
                                                           distributed=ENGINES[engine]))
    proc = launch(["props", str(recipe), str(tmp_path / "out")])
    assert proc.returncode == 0, tail(proc)
    ranks = [read_json(tmp_path / "out" / f"props.rank{r}.json") for r in range(2)]

    for r, res in enumerate(ranks):
        # Rank r holds teacher r mod N only (frozen), and every sample it sees carries that style.
        assert res["local_teachers"] == [r % 2] and res["loaded_teachers"] == [r % 2]
        assert res["styles"] == [r % 2] * 2 and res["teacher_requires_grad"] is False
        # A teacher missing on rank 1 only: both ranks stop with the same clear message.
        kind, message = res["missing"]
        assert kind == "FileNotFoundError"
        assert "rank 1: teacher path(s) not found: style1" in message
        assert message == ranks[0]["missing"][1]
        # The student is really sharded: each rank holds about half of its parameters.
        local, total = res["numel"]["student"]
        assert 0.45 <= local / total <= 0.55, res["numel"]

    main = ranks[0]
    # Each rank's losses are the single-process losses with that rank's teacher and batch.
    for got, want in zip(main["rank_losses"], main["reference_losses"]):
        assert got == pytest.approx(want, rel=1e-5)
    assert main["grad_count"] == main["param_count"]  # every trained parameter got its gradient
    # One optimizer step (SGD, lr 1) moved the weights by the single-process gradient summed
    # over the teachers' batches with weight 1/W each (Eq. 8-9).
    for which, err in main["grad_rel_err_by_model"].items():
        assert err < 1e-4, (which, err)


def _train(recipe: Path, out: Path, launcher: str, kill_in_save: int | None = None):
    args = ["train", str(recipe), str(out)] + (["--kill-in-save", str(kill_in_save)] if kill_in_save else [])
    return launch(args, launcher=launcher)


def _log(out: Path, rank: int = 0) -> dict[int, dict]:
    lines = (out / f"train.rank{rank}.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


RESUME = {
    # ZeRO-2 (resumed under the deepspeed launcher); FSDP2 under torchrun with 4 teachers on 2 ranks rotating
    # through 2 gradient-accumulation micro-steps.
    "deepspeed": ({"engine": "deepspeed", "options": {"zero_stage": 2}}, 2, "deepspeed"),
    "fsdp2": ({"engine": "fsdp2", "grad_accum_steps": 2}, 4, "torchrun"),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(RESUME))
def test_exact_resume_after_sigkill(world, tmp_path, engine):
    dist_cfg, teachers, launcher = RESUME[engine]
    n, kill_in_save = 5, 4  # checkpoints every 2 steps: step 2 complete, step 4 half-written

    def recipe(name):
        raw = recipe_dict(world, tmp_path / name, teachers=teachers, distributed=dist_cfg,
                          train={"max_steps": n, "checkpoint_every": 2, "keep_last": 2, "resume": "latest"})
        return write_recipe(tmp_path / f"{name}.yaml", raw)

    straight = recipe("straight")
    proc = _train(straight, tmp_path / "log-straight", "torchrun")
    assert proc.returncode == 0, tail(proc)

    crashed = recipe("crashed")
    proc = _train(crashed, tmp_path / "log-killed", "torchrun", kill_in_save=kill_in_save)
    assert proc.returncode != 0  # really killed
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert (ckpts / ".tmp-step-00000004").is_dir()  # the crash hit the write of step 4 ...
    assert (ckpts / "latest").read_text().strip() == "step-00000002"  # ... and latest stayed complete
    assert not (ckpts / "step-00000004").exists()
    proc = _train(crashed, tmp_path / "log-resumed", launcher)  # the deepspeed launcher for DeepSpeed
    assert proc.returncode == 0, tail(proc)

    # Keep the last 2; the sharded latest checkpoint exports to the same merged folder as one process.
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-00000004",
                                                                                      "step-00000005"]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    from dmm.train.export import export_from_checkpoint

    merged = export_from_checkpoint(ckpts / "step-00000005", tmp_path / "merged")
    exported = load_file(str(merged / "unet" / "diffusion_pytorch_model.safetensors"))
    final = load_file(str(tmp_path / "log-resumed" / "final_student.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)

    for rank in range(2):
        ref = _log(tmp_path / "log-straight", rank)
        killed, resumed = _log(tmp_path / "log-killed", rank), _log(tmp_path / "log-resumed", rank)
        assert sorted(ref) == list(range(1, n + 1))
        assert sorted(killed) == list(range(1, kill_in_save + 1)) and sorted(resumed) == list(range(3, n + 1))
        for step in range(1, n + 1):  # bitwise: the same float32 losses and grad norms
            got = killed[step] if step < 3 else resumed[step]
            assert step > kill_in_save or killed[step] == ref[step], (rank, step)
            assert got == ref[step], (rank, step)
    for which in ("student", "disc"):
        a = load_file(str(tmp_path / "log-straight" / f"final_{which}.safetensors"))
        b = load_file(str(tmp_path / "log-resumed" / f"final_{which}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), which

