"""Training checkpoints: complete or absent, never half-written, the newest kept.

A checkpoint is written into a hidden temporary folder, completed by `trainer_state.json`,
swapped into place once every rank has finished writing (`dmm.io.replace_dir`) and only then
named in `latest`. A crash at any point leaves a complete checkpoint to continue from: the one
`latest` names or, when `latest` is missing or names nothing complete, the newest complete one.
Pruning keeps the `keep_last` newest complete checkpoints by step, and never the one just
written nor the one `latest` names. Every write goes through `dmm.io`.

`choose_resume` decides what a run does with its run folder (`train.resume`, docs/run-folder.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dmm.engines.base import Engine
from dmm.recipes import MISSING_DEFAULT, default_of, is_resumable
from dmm.schema import flatten
from dmm.io import (atomic_torch_save, atomic_write_json, atomic_write_text, make_dir, move_into, remove_dir,
                    restore_replaced, replace_dir)

log = logging.getLogger("dmm.train")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE = "trainer_state.json"
# What an earlier run leaves in its folder; a fresh start moves these to previous-runs/<time>/.
RUN_ENTRIES = ("checkpoints", "merged", "recipe.yaml", "tb")
PREVIOUS_RUNS = "previous-runs"
NEVER = (None, "", "none", "never")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (an incompatible run, an incomplete checkpoint)."""


def _resumable(key: str) -> bool:
    """Declared in the recipe schema (`setting(..., resumable=True)`); where and how to resume always may."""
    return key.startswith(("train.resume", "train.output_dir")) or is_resumable(key)


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """The keys that differ between two recipes and may not change on resume."""
    a, b = flatten(saved), flatten(current)
    for key in set(b) - set(a):  # a key added to the schema after the run was saved: its default then
        default = default_of(key)
        if default is not MISSING_DEFAULT:
            a[key] = default
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not _resumable(k)]


def rng_state() -> dict:
    """Every RNG, as tensors and ints only, so it reloads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def step_of(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


def is_complete(folder: Path) -> bool:
    """`trainer_state.json` is written last, inside the temporary folder: its presence means complete."""
    return (folder / STATE).is_file()


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def folders(self) -> list[Path]:
        """Every `step-N` folder, oldest step first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=step_of)

    def complete(self) -> list[Path]:
        return [p for p in self.folders() if is_complete(p)]

    def pointer(self) -> Path | None:
        """The folder `latest` names (complete or not), or None without a readable `latest`."""
        try:
            name = (self.root / "latest").read_text().strip()
        except OSError:
            return None
        return self.root / name if name else None

    def latest(self, quiet: bool = False) -> Path | None:
        """The checkpoint to continue from: the one `latest` names if it is complete, else the newest
        complete one (saying which), else None."""
        named = self.pointer()
        if named is not None and is_complete(named):
            return named
        complete = self.complete()
        if not complete:
            return None
        if not quiet:
            why = "there is no `latest`" if named is None else f"`latest` names {named.name}, which is not complete"
            log.warning("%s in %s: using %s, the newest complete checkpoint", why, self.root, complete[-1].name)
        return complete[-1]

    def recover(self) -> None:
        """Main rank, before reading: undo a crash between the two moves of a `replace_dir`."""
        if not self.root.is_dir():
            return
        for aside in self.root.glob(".step-*.replaced"):
            final = self.root / aside.name[1:-len(".replaced")]
            if restore_replaced(final):
                log.warning("restored %s, which a crash had left moved aside", final.name)

    def save(self, engine: Engine, step: int, state: dict, rank_state: dict,
             main_files: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it. `state` is the trainer's (rank 0's), `rank_state` each rank's own;
        `main_files(folder)` writes the main rank's extra files (weight averages) into the checkpoint."""
        name = f"step-{step:08d}"
        tmp = self.root / f".tmp-{name}"
        if engine.is_main:
            make_dir(self.root)
            remove_dir(tmp)  # a leftover of a crashed save of this step
            tmp.mkdir()
        engine.barrier()
        engine.save(tmp)
        atomic_torch_save({**rank_state, "rng": rng_state()}, tmp / f"rank{engine.rank:05d}.pt")
        if engine.is_main and main_files is not None:
            main_files(tmp)
        engine.barrier()
        final = self.root / name
        if engine.is_main:
            atomic_write_json(tmp / STATE, {**state, "step": step, "world_size": engine.world_size})
            replace_dir(tmp, final)
            atomic_write_text(self.root / "latest", name)
            self.prune(final)
        engine.barrier()
        return final

    def prune(self, newest: Path) -> None:
        """Keep the `keep_last` newest complete checkpoints by step, `newest` and what `latest` names;
        remove older ones, incomplete `step-N` folders below the newest complete one, and the
        hidden leftovers of crashed saves."""
        complete = self.complete()
        keep = set(complete[-self.keep_last:]) | {newest, self.pointer()}
        top = step_of(complete[-1]) if complete else -1
        for folder in self.folders():
            if folder not in keep and (folder in complete or step_of(folder) < top):
                remove_dir(folder)
        for leftover in self.root.glob(".*"):
            stale_aside = leftover.name.endswith(".replaced") and (self.root / leftover.name[1:-9]).exists()
            if leftover.is_dir() and (leftover.name.startswith(".tmp-step-") or leftover.name.endswith(".removing")
                                      or stale_aside):
                remove_dir(leftover)
            elif leftover.is_file() and leftover.name.endswith(".tmp"):  # a crashed atomic write
                leftover.unlink(missing_ok=True)

    @staticmethod
    def read_state(folder: Path) -> dict:
        return json.loads((folder / STATE).read_text())

    @staticmethod
    def load_state(folder: Path, rank: int) -> tuple[dict, dict]:
        state = CheckpointManager.read_state(folder)
        rank_file = folder / f"rank{rank:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no state for rank {rank}: it was written by {state.get('world_size')} ranks"
            )
        return state, torch.load(rank_file, map_location="cpu", weights_only=True)


class RunLock:
    """One training process per run folder: two runs in one folder would overwrite and prune each
    other's checkpoints. An exclusive `flock` on `<out>/.lock`, released by `release()` or when
    the process ends, however it ends (no stale lock after a kill). Where the filesystem has no
    locks, a warning says so and the run goes on."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        make_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"another process is training in {self.path.parent} (it holds {self.path}): "
                                     "wait for it to end, or choose another train.output_dir") from None
            log.warning("cannot lock %s (%s): nothing stops a second run in this folder", self.path, err)
            return
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def holds_run(out: Path) -> bool:
    """Anything an earlier run left in `out` (checkpoints, merged model, recipe, logs)."""
    for entry in RUN_ENTRIES:
        path = out / entry
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def archive_run(out: Path) -> Path:
    """Move an earlier run's files to `out/previous-runs/<UTC time>/`: a fresh start deletes nothing."""
    dest = out / PREVIOUS_RUNS / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    move_into([out / e for e in RUN_ENTRIES if (out / e).exists()], dest)
    return dest


def _check_compatible(folder: Path, state: dict, recipe: dict, world_size: int, out: Path, auto: bool) -> None:
    diffs = recipe_differences(state["recipe"], recipe)
    ways_out = (f"To start afresh, add --set train.resume=never (the earlier run is moved to {out / PREVIOUS_RUNS}/) "
                "or choose another train.output_dir.")
    if diffs:
        what = f"{out} holds a run (step {state['step']})" if auto else f"cannot resume from {folder}: it was"
        raise RunFolderError(f"{what} written by a different recipe; differing keys: {diffs}. "
                             + (ways_out if auto else "Resume with the recipe that wrote it."))
    if state.get("world_size") != world_size:
        raise RunFolderError(f"cannot resume from {folder}: written by {state.get('world_size')} ranks, this run "
                             f"has {world_size}. Run with {state.get('world_size')} ranks"
                             + (f", or: {ways_out}" if auto else "."))


def choose_resume(out: Path, manager: CheckpointManager, resume: str | None, recipe: dict,
                  world_size: int) -> tuple[Path | None, str]:
    """Main rank, before anything is written: the checkpoint to continue from (None: step 0) and
    the one log line that says why. Refuses an incompatible run; a fresh start moves an earlier
    run aside. `resume`: auto | never | latest | a checkpoint folder (None/"none" = never)."""
    out = Path(out)
    manager.recover()
    mode = "never" if resume in NEVER else resume
    if mode not in ("auto", "never", "latest"):
        folder = Path(mode)
        if not is_complete(folder):
            raise RunFolderError(f"train.resume: {folder} is not a complete checkpoint (no {STATE}); "
                                 f"complete ones in {manager.root}: {[p.name for p in manager.complete()] or 'none'}")
        state = manager.read_state(folder)
        _check_compatible(folder, state, recipe, world_size, out, auto=False)
        return folder, f"resumed from {folder} at step {state['step']} (train.resume names it)"
    folder = None if mode == "never" else manager.latest()
    if folder is None:
        if not holds_run(out):
            return None, f"starting at step 0 in {out}"
        moved = archive_run(out)
        why = "train.resume=never" if mode == "never" else f"no complete checkpoint in {manager.root}"
        return None, f"starting at step 0 ({why}); the earlier run in {out} was moved to {moved}"
    state = manager.read_state(folder)
    _check_compatible(folder, state, recipe, world_size, out, auto=mode == "auto")
    return folder, (f"resumed from {folder} at step {state['step']} (train.resume={mode}: {out} holds a run "
                    "of this recipe; train.resume=never starts afresh)")
