"""A real one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) running a 2-task CPU
job of a tiny recipe (tiny real pipelines + shards, FSDP2 over gloo) submitted with
launchers/submit.py through submitit; preempted with `scancel --signal USR2`, the job
checkpoints, requeues, resumes from `latest` and finishes. Skips, with the reason, where the
daemons are not installed or cannot start (.ci/run installs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.world import recipe_dict, write_recipe

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "slurm"))
import local_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    missing = local_cluster.missing_programs()
    if missing:
        pytest.skip(f"SLURM not installed here (missing {missing}); .ci/run installs it")
    root = Path(tmp_path_factory.mktemp("slurm"))
    try:
        env = local_cluster.start(root)
    except local_cluster.ClusterError as err:
        local_cluster.stop(root)
        pytest.skip(f"the local SLURM cluster did not start: {err}")
    yield env
    local_cluster.stop(root)


def _submit(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _sacct_state(env, job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], env=env, capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[0] if out else "UNKNOWN"


def _wait_for(what, check, timeout):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_finishes(cluster, world, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(world, out, teachers=2, distributed={"engine": "fsdp2"},
                      train={"max_steps": 12, "checkpoint_every": 1000, "keep_last": 3})
    recipe = write_recipe(tmp_path / "toy.yaml", raw)
    env = {**cluster, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    done = _submit(env, "--recipe", str(recipe), "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30",
                   "--folder", str(tmp_path / "slurm"))
    assert done.returncode == 0, done.stderr
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)

    # Preempt once the trainer has started stepping (its progress bar is in task 0's log).
    log = tmp_path / "slurm" / f"{job}_0_log.err"
    _wait_for("the first training step", lambda: log.is_file() and re.search(r"distill:.*\b[1-9]\d*/12", log.read_text()),
              240)
    subprocess.run(["scancel", "--signal", "USR2", job], env=env, check=True, timeout=30)

    _wait_for("the job to finish", lambda: _sacct_state(env, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
              420)
    text = log.read_text()
    assert _sacct_state(env, job) == "COMPLETED", text[-3000:]
    stopped = re.search(r"stopped at step (\d+) on request; checkpoint saved", text)
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert 0 < k < 12
    assert "Requeued job" in text
    assert re.search(rf"resumed from \S+step-{k:08d} at step {k}", text), text[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    assert (ckpts / f"step-{k:08d}").is_dir()
    assert (out / "merged" / "unet").is_dir()  # exported by the finished job


@pytest.mark.slurm
def test_unsatisfiable_request_is_refused_plainly(cluster, world, tmp_path):
    recipe = write_recipe(tmp_path / "toy.yaml", recipe_dict(world, tmp_path / "run", teachers=2,
                                                             distributed={"engine": "fsdp2"}))
    env = {**cluster, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = _submit(env, "--recipe", str(recipe), "--gpus-per-node", "2", "--folder", str(tmp_path / "slurm"))
    assert done.returncode == 3
    assert "error: SLURM refused the job (1 node(s) x 2 task(s), 2 GPU(s) per node): " in done.stderr
    assert "sbatch: error" in done.stderr
    # An impossible teacher layout is refused before anything is queued.
    done = _submit(env, "--recipe", str(recipe), "--tasks-per-node", "3", "--folder", str(tmp_path / "slurm"))
    assert done.returncode == 2 and "cannot give 2 teachers equal weight on 3 ranks" in done.stderr
