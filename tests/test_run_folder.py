"""A run folder never loses work: resume decisions, pruning, atomic folder replacement, file
modes, `latest` recovery, and a crash injected between every pair of filesystem operations of
a checkpoint save. Real files; the umask check runs in real processes; no model but a Linear."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmm.engines.single import SingleProcessEngine
from dmm.io import replace_dir, restore_replaced
from dmm.train.checkpoint import (CheckpointManager, RunFolderError, choose_resume, is_complete,
                                  recipe_differences)

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"name": "r", "loss": {"lambda_feat": 0.0}, "train": {"max_steps": 10, "resume": "auto", "output_dir": "x"},
          "teachers": [{"name": "a", "path": "/t/a"}]}


def _engine(seed: int = 0) -> SingleProcessEngine:
    torch.manual_seed(seed)
    engine = SingleProcessEngine()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.prepare({"student": model}, {"student": opt}, {"student": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)})
    return engine


def _save(mgr: CheckpointManager, step: int, engine=None, recipe=RECIPE) -> Path:
    return mgr.save(engine or _engine(step), step, {"recipe": recipe}, {"data": {"step": step}})


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


# ---------------------------------------------------------------- resume decisions
def test_auto_continues_a_compatible_run_and_says_so(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    _save(mgr, 2)
    longer = {**RECIPE, "train": {**RECIPE["train"], "max_steps": 20}}  # resumable key
    folder, message = choose_resume(tmp_path, mgr, "auto", longer, 1)
    assert folder == tmp_path / "checkpoints" / "step-00000002"
    assert f"resumed from {folder} at step 2 (train.resume=auto" in message


def test_auto_refuses_an_incompatible_run_naming_keys_and_ways_out(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    _save(mgr, 2)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    other = {**RECIPE, "loss": {"lambda_feat": 0.5}}
    with pytest.raises(RunFolderError, match=r"differing keys: \['loss.lambda_feat'\]") as err:
        choose_resume(tmp_path, mgr, "auto", other, 1)
    assert "train.resume=never" in str(err.value) and "another train.output_dir" in str(err.value)
    with pytest.raises(RunFolderError, match="written by 1 ranks, this run has 2"):
        choose_resume(tmp_path, mgr, "auto", RECIPE, 2)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written or moved


@pytest.mark.parametrize("resume", ["never", "none", None])
def test_never_moves_an_earlier_run_aside_and_deletes_nothing(tmp_path, resume):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    _save(mgr, 2)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model").write_text("m")
    (tmp_path / "recipe.yaml").write_text("old")
    (tmp_path / "slurm").mkdir()  # not the run's: stays
    folder, message = choose_resume(tmp_path, mgr, resume, RECIPE, 1)
    assert folder is None and "starting at step 0" in message
    moved = list((tmp_path / "previous-runs").iterdir())
    assert len(moved) == 1 and str(moved[0]) in message
    assert (moved[0] / "merged" / "model").read_text() == "m" and (moved[0] / "recipe.yaml").read_text() == "old"
    assert is_complete(moved[0] / "checkpoints" / "step-00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous-runs", "slurm"]
    assert choose_resume(tmp_path, mgr, resume, RECIPE, 1) == (None, f"starting at step 0 in {tmp_path}")


def test_latest_in_an_empty_folder_starts_at_step_0(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert choose_resume(tmp_path, mgr, "latest", RECIPE, 1)[0] is None
    assert not (tmp_path / "previous-runs").exists()


def test_an_explicit_checkpoint_must_be_complete(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    _save(mgr, 2)
    (tmp_path / "checkpoints" / "step-00000004").mkdir()
    with pytest.raises(RunFolderError, match=r"step-00000004 is not a complete checkpoint.*\['step-00000002'\]"):
        choose_resume(tmp_path, mgr, str(tmp_path / "checkpoints" / "step-00000004"), RECIPE, 1)
    folder, _ = choose_resume(tmp_path / "elsewhere", mgr, str(tmp_path / "checkpoints" / "step-00000002"),
                              RECIPE, 1)
    assert folder.name == "step-00000002"


@pytest.mark.parametrize("pointer", [None, "step-00000009", "step-00000004"])
def test_latest_recovers_the_newest_complete_checkpoint(tmp_path, pointer, caplog):
    """`latest` missing, naming a missing folder, or naming an incomplete one."""
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    for step in (1, 2, 3):
        _save(mgr, step)
    (tmp_path / "checkpoints" / "step-00000004").mkdir()  # incomplete (no trainer_state.json)
    latest = tmp_path / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="dmm.train"):
        folder, message = choose_resume(tmp_path, mgr, "latest", RECIPE, 1)
    assert folder.name == "step-00000003" and "at step 3" in message
    assert "using step-00000003, the newest complete checkpoint" in caplog.text


def test_recipe_differences_ignore_resumable_keys_and_name_list_items():
    a = {**RECIPE, "train": {**RECIPE["train"], "resume": None, "output_dir": "y", "max_steps": 99}}
    assert recipe_differences(RECIPE, a) == []
    b = {**RECIPE, "teachers": [{"name": "a", "path": "/t/other"}]}
    assert recipe_differences(RECIPE, b) in (["teachers[0].path"], [])  # a teacher may be moved if declared so
    c = {**RECIPE, "teachers": [{"name": "b", "path": "/t/a"}]}
    assert recipe_differences(RECIPE, c) == ["teachers[0].name"]


def test_a_run_saved_before_a_key_existed_reads_as_its_default():
    newer = {**RECIPE, "perf": {"host_sync": "auto", "channels_last": False}, "model": {"init_from": ""},
             "teachers": [{"name": "a", "path": "/t/a", "lora": ""}], "stages": []}
    assert recipe_differences(RECIPE, newer) == []
    changed = {**newer, "perf": {"host_sync": "auto", "channels_last": True}, "model": {"init_from": "/m"}}
    assert recipe_differences(RECIPE, changed) == ["model.init_from"]  # channels_last may change on resume


# ---------------------------------------------------------------- the trainer in a used run folder
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests import tiny_world

    return tiny_world.build(tmp_path_factory.mktemp("tiny"))


def test_rerunning_in_a_run_folder_continues_refuses_or_starts_afresh(world, tmp_path, caplog):
    from dmm.pipeline import MERGE_INFO
    from dmm.train.run import run
    from tests import tiny_world

    out = tmp_path / "run"
    run(tiny_world.recipe(world, out, train={"max_steps": 2}))  # the default train.resume (auto)
    recipe_yaml = (out / "recipe.yaml").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match=r"differing keys: \['loss.lambda_feat'\].*train.resume=never"):
        run(tiny_world.recipe(world, out, train={"max_steps": 4}, loss={"lambda_feat": 0.5}))
    assert (out / "recipe.yaml").read_bytes() == recipe_yaml  # a refused resume writes nothing
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    with caplog.at_level(logging.INFO, logger="dmm.train"):
        run(tiny_world.recipe(world, out, train={"max_steps": 3}))
    resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(resumed) == 1 and f"{out / 'checkpoints' / 'step-00000002'} at step 2 (train.resume=auto" in resumed[0]
    assert _steps(out / "checkpoints") == ["step-00000002", "step-00000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    assert json.loads((out / "merged" / MERGE_INFO).read_text())["step"] == 3

    run(tiny_world.recipe(world, out, train={"max_steps": 1, "resume": "never"}))
    (previous,) = (out / "previous-runs").iterdir()
    assert _steps(previous / "checkpoints") == ["step-00000002", "step-00000003"]
    assert json.loads((previous / "merged" / MERGE_INFO).read_text())["step"] == 3
    assert _steps(out / "checkpoints") == ["step-00000001"]
    assert json.loads((out / "merged" / MERGE_INFO).read_text())["step"] == 1


def test_a_second_process_cannot_train_in_the_same_folder(world, tmp_path):
    """Two runs in one folder would overwrite and prune each other's checkpoints."""
    from dmm.train.checkpoint import RunLock
    from dmm.train.run import run
    from tests import tiny_world

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(120)", str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"another process is training in {out} .*another train.output_dir"):
            run(tiny_world.recipe(world, out, train={"max_steps": 1}))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out)  # a killed holder leaves no stale lock
    lock.acquire()
    lock.release()


# ---------------------------------------------------------------- pruning
def test_pruning_keeps_the_checkpoint_just_written_and_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep_last=2)
    for step in (100, 101, 102):
        _save(mgr, step)
    assert _steps(root) == ["step-00000101", "step-00000102"]
    # A run restarted at step 0 in this folder (the old behaviour) wrote step 2: it must survive.
    _save(mgr, 2)
    assert (root / "latest").read_text() == "step-00000002"
    assert _steps(root) == ["step-00000002", "step-00000101", "step-00000102"]
    assert mgr.latest() == root / "step-00000002"
    # Leftovers of crashed saves are swept; incomplete step folders below the newest complete one go.
    (root / ".tmp-step-00000003").mkdir()
    (root / "step-00000001").mkdir()
    (root / ".latest.abc.tmp").write_text("x")
    _save(mgr, 3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003", "step-00000101", "step-00000102"]


# ---------------------------------------------------------------- atomic folder replacement
def test_replace_dir_keeps_old_or_new_at_every_crash_point(tmp_path, monkeypatch):
    real = os.replace
    for crash_at in (1, 2):
        root = tmp_path / str(crash_at)
        (root / "final").mkdir(parents=True)
        (root / "final" / "v").write_text("old")
        (root / "tmp").mkdir()
        (root / "tmp" / "v").write_text("new")
        calls = []

        def flaky(a, b, _n=crash_at):
            calls.append(a)
            if len(calls) == _n:
                raise OSError("crash")
            return real(a, b)

        monkeypatch.setattr(os, "replace", flaky)
        with pytest.raises(OSError):
            replace_dir(root / "tmp", root / "final")
        monkeypatch.setattr(os, "replace", real)
        restore_replaced(root / "final")
        assert (root / "final" / "v").read_text() == "old"
    replace_dir(root / "tmp", root / "final")
    assert (root / "final" / "v").read_text() == "new" and sorted(os.listdir(root)) == ["final"]


# ---------------------------------------------------------------- crash between every pair of operations
class Crash(BaseException):
    """A simulated kill: not an Exception, so no `except Exception` handler swallows it."""


@contextlib.contextmanager
def crash_at(k: int | None, kill: bool = False):
    """Count every filesystem mutation; instead of performing the k-th one raise Crash or, with
    `kill`, SIGKILL this process (no handler, no cleanup runs)."""
    calls = [0]
    patched = [(os, "replace"), (os, "rename"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in patched]

    def wrap(real):
        def op(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                if kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise Crash(f"crash at operation {k}")
            return real(*args, **kwargs)
        return op

    for mod, name, real in originals:
        setattr(mod, name, wrap(real))
    try:
        yield calls
    finally:
        for mod, name, real in originals:
            setattr(mod, name, real)


def _crash_in_save(root: Path, step: int, engine, k: int, kill: bool) -> None:
    if not kill:
        with crash_at(k), pytest.raises(Crash):
            _save(CheckpointManager(root, keep_last=2), step, engine)
        return
    pid = os.fork()  # a real process killed at operation k
    if pid == 0:
        try:
            with crash_at(k, kill=True):
                _save(CheckpointManager(root, keep_last=2), step, engine)
        finally:
            os._exit(3)  # not killed: the count was wrong
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)


@pytest.mark.parametrize("kill", [False, True], ids=["raise", "sigkill"])
@pytest.mark.parametrize("new_step", [4, 3], ids=["new-step", "replace-latest"])
def test_a_crash_anywhere_in_a_save_loses_no_complete_checkpoint(tmp_path, new_step, kill):
    base = tmp_path / "base"
    mgr = CheckpointManager(base / "checkpoints", keep_last=2)
    for step in (1, 2, 3):
        _save(mgr, step)
    before = _steps(base / "checkpoints")
    assert before == ["step-00000002", "step-00000003"]
    engine = _engine(42)  # the weights of the new save: tell them from the old step 3's
    dry = tmp_path / "dry"
    shutil.copytree(base, dry)
    with crash_at(None) as calls:
        _save(CheckpointManager(dry / "checkpoints", keep_last=2), new_step, engine)
    n = calls[0]
    assert n >= 8, n  # mkdir, temp files, trainer_state, the swap, latest, pruning ...
    outcomes = set()
    for k in range(1, n + 1):
        run = tmp_path / f"crash{k}"
        shutil.copytree(base, run)
        root = run / "checkpoints"
        _crash_in_save(root, new_step, engine, k, kill)
        after = CheckpointManager(root, keep_last=2)
        after.recover()
        latest = after.latest(quiet=True)
        assert latest is not None and is_complete(latest), k
        state, _ = after.load_state(latest, 0)
        new_written = state["step"] == new_step and _weights(latest) == _weights_of(engine)
        outcomes.add(new_written)
        complete = [p.name for p in after.complete()]
        if not new_written:  # the previous state is intact: every complete checkpoint is still there
            assert set(before) <= set(complete), (k, complete)
            assert latest.name == "step-00000003", k
        else:  # the new one is in place; the newest two complete ones are kept
            assert latest.name == f"step-{new_step:08d}" and complete[-2:] == sorted({*before, latest.name})[-2:], k
        # ... and the run goes on: the next save succeeds and leaves no leftovers.
        _save(after, 5)
        assert sorted(p.name for p in root.iterdir()) == ["latest", complete[-1], "step-00000005"], k
    assert outcomes == {False, True}


def _weights(folder: Path) -> list:
    from safetensors.torch import load_file

    return [v.tolist() for _, v in sorted(load_file(str(folder / "student.safetensors")).items())]


def _weights_of(engine) -> list:
    return [v.tolist() for _, v in sorted(engine.models["student"].state_dict().items())]


# ---------------------------------------------------------------- file modes
MODES = """
import os, stat, sys, torch
from pathlib import Path
from dmm.io import atomic_write_text, atomic_torch_save, atomic_save_safetensors, make_dir, replace_dir
out = Path(sys.argv[1])
atomic_write_text(out / "latest", "x")
atomic_torch_save({"a": 1}, out / "state.pt")
atomic_save_safetensors({"w": torch.zeros(2)}, out / "w.safetensors")
tmp = make_dir(out / ".tmp-d")
atomic_write_text(tmp / "f", "y")
replace_dir(tmp, out / "d")
print({p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [out / "latest", out / "state.pt", out / "w.safetensors",
       out / "d", out / "d" / "f"]})
"""


@pytest.mark.parametrize("umask,file_mode,dir_mode", [("022", "0o644", "0o755"), ("027", "0o640", "0o750")])
def test_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / umask
    out.mkdir()
    done = subprocess.run(["sh", "-c", f'umask {umask} && exec "$0" -c "$1" "$2"', sys.executable, MODES, str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    modes = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed dict
    assert modes == {"latest": file_mode, "state.pt": file_mode, "w.safetensors": file_mode, "d": dir_mode,
                     "f": file_mode}


def test_trainer_state_is_the_last_file_written(tmp_path):
    """`is_complete` reads trainer_state.json: it must not exist before the rank files do."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    folder = _save(mgr, 1)
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 1
    assert (folder / "rank00000.pt").is_file() and (folder / "student.safetensors").is_file()
