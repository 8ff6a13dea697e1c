"""Signals end a run with a checkpoint: real launcher processes of a tiny recipe, real signals.

Ctrl-C (SIGINT) and SIGTERM finish the step, write a checkpoint, print one line saying how to
resume and exit 130 / 143 without a traceback; the same command then continues from that
checkpoint. A second Ctrl-C aborts at once. The SLURM job's USR2 takes the same path and then
hands over to submitit's handler (a stand-in here that records the call). Each step is slowed
to SLOW_S (a sleep around the real step) so a signal lands mid-step deterministically."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.world import recipe_dict, write_recipe

REPO = Path(__file__).resolve().parents[2]
SLOW_S = 0.4
# The launcher (or the SLURM job) with every training step slowed down; nothing else changes.
SLOWED = """
import runpy, sys, time
import dmm.train.trainer as t
real = t.DistillationTrainer.train_step
def slow(self, batch):
    time.sleep({slow})
    return real(self, batch)
t.DistillationTrainer.train_step = slow
{main}
"""
LAUNCHER = "sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path({path!r}, run_name='__main__')"
SLURM_JOB = """
import os, signal
def submitit_handler(signum, frame):  # stands in for submitit's: checkpoint() + requeue + exit
    open(sys.argv[2], "w").write(f"requeue asked by signal {signum}")
    os._exit(0)
signal.signal(signal.SIGUSR2, submitit_handler)
from dmm.train.slurm_job import DistillJob
DistillJob(sys.argv[1])()
"""


def _start(tmp_path: Path, name: str, main: str, *args: str) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"{name}.err"
    code = SLOWED.format(slow=SLOW_S, main=main)
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                                        "OMP_NUM_THREADS": "1"})
    return proc, err


def _launch(tmp_path: Path, name: str, recipe: Path):
    return _start(tmp_path, name, LAUNCHER.format(path=str(REPO / "launchers" / "train.py")), "--recipe", str(recipe))


def _wait_for(proc, err: Path, pattern: str, timeout: float = 240) -> re.Match:
    end = time.time() + timeout
    while time.time() < end:
        found = re.search(pattern, err.read_text())
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{err.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern!r}:\n{err.read_text()[-3000:]}")


def _finish(proc, err: Path) -> str:
    proc.wait(timeout=240)
    return err.read_text()


@pytest.fixture
def recipe(world, tmp_path):
    raw = recipe_dict(world, tmp_path / "run", train={"max_steps": 1000, "checkpoint_every": 1000, "log_every": 1})
    return write_recipe(tmp_path / "tiny.yaml", raw)


@pytest.mark.slow
def test_ctrl_c_then_sigterm_checkpoint_and_the_same_command_resumes(recipe, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    proc, err = _launch(tmp_path, "first", recipe)
    _wait_for(proc, err, r"distill:.*\b[1-9]\d*/1000")
    proc.send_signal(signal.SIGINT)
    text = _finish(proc, err)
    assert proc.returncode == 130, text[-3000:]
    assert "SIGINT received: finishing this step, writing a checkpoint, then stopping" in text
    stopped = re.search(r"stopped by SIGINT at step (\d+), checkpoint (\S+); to resume, run the same command "
                        r"again \(or add --set train\.resume=latest\)", text)
    assert stopped, text[-3000:]
    assert "Traceback" not in text
    k = int(stopped.group(1))
    assert stopped.group(2) == str(ckpts / f"step-{k:08d}")
    assert (ckpts / "latest").read_text() == f"step-{k:08d}"
    assert (ckpts / f"step-{k:08d}" / "trainer_state.json").is_file()

    proc, err = _launch(tmp_path, "second", recipe)  # the same command
    _wait_for(proc, err, rf"resumed from \S+step-{k:08d} at step {k} \(train\.resume=auto")
    _wait_for(proc, err, rf"distill:.*\b({k + 1}|{k + 2}|{k + 3})/1000")
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, err)
    assert proc.returncode == 143, text[-3000:]
    assert "Traceback" not in text
    k2 = int(re.search(r"stopped by SIGTERM at step (\d+)", text).group(1))
    assert k2 > k and (ckpts / "latest").read_text() == f"step-{k2:08d}"
    assert (ckpts / f"step-{k:08d}").is_dir()  # keep_last 2: both kept
    assert not (tmp_path / "run" / "previous-runs").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(recipe, tmp_path):
    proc, err = _launch(tmp_path, "abort", recipe)
    _wait_for(proc, err, r"distill:.*\b[1-9]\d*/1000")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, err, r"SIGINT received")
    proc.send_signal(signal.SIGINT)
    text = _finish(proc, err)
    assert proc.returncode == 130, text[-3000:]
    assert "aborted by Ctrl-C: nothing saved since the last checkpoint" in text and "Traceback" not in text
    assert "stopped by SIGINT" not in text
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # it stopped mid-step, before any checkpoint


@pytest.mark.slow
def test_slurm_usr2_checkpoints_then_hands_over_to_submitit(world, tmp_path):
    raw = recipe_dict(world, tmp_path / "run", train={"max_steps": 1000, "checkpoint_every": 1000})
    recipe = write_recipe(tmp_path / "tiny.yaml", raw)
    marker = tmp_path / "requeued"
    proc, err = _start(tmp_path, "job", SLURM_JOB, str(recipe), str(marker))
    _wait_for(proc, err, r"distill:.*\b[1-9]\d*/1000")
    proc.send_signal(signal.SIGUSR2)
    text = _finish(proc, err)
    assert proc.returncode == 0, text[-3000:]
    assert marker.read_text() == f"requeue asked by signal {int(signal.SIGUSR2)}"
    k = int(re.search(r"stopped at step (\d+) on request; checkpoint saved", text).group(1))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step-{k:08d}"
    assert (ckpts / f"step-{k:08d}" / "trainer_state.json").is_file()
