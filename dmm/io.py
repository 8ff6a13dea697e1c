"""Atomic writes: a reader never sees a half-written file or folder.

Every file is written under a temporary name in its target folder, flushed to disk, given the
mode a plain `open()` would have given it (0o666 less the umask: mkstemp's 0600 would hide
merged models and reports from the rest of a cluster group) and renamed into place. Folders
are written completely under a hidden name and swapped in (`replace_dir`); an older folder of
that name is moved aside first and deleted only once the new one is in place, so a crash at
any point leaves the old or the new folder findable (`restore_replaced`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _read_umask() -> int:
    """The process umask. /proc shows it without changing it; os.umask can only be read by
    setting it, which races with threads creating files, so it is the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.cache
def file_mode() -> int:
    """The mode of a file created by a plain `open()` in this process (read once)."""
    return 0o666 & ~_read_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable; a no-op where the filesystem cannot sync folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """A temporary file name in the target's folder for any writer (a tar, an npz, ...), moved
    onto `path` on success with the umask's mode, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, atomically and with the umask's mode."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a completely written folder into place; an older folder of that name is moved aside
    first and removed only once the new one is in place (`restore_replaced` undoes a crash
    between the two moves)."""
    tmp, final = Path(tmp), Path(final)
    aside = _aside(final)
    if final.exists():
        if aside.exists():  # left by a crash after the new folder was in place: stale
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)  # the older folder (or one a crash left aside): superseded


def restore_replaced(final: str | os.PathLike) -> bool:
    """After a crash inside `replace_dir`: put the older folder back if the new one never arrived.
    Returns True if it did."""
    final = Path(final)
    aside = _aside(final)
    if aside.is_dir() and not final.exists():
        os.replace(aside, final)
        fsync_dir(final.parent)
        return True
    return False


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder without ever leaving it half-deleted under its own name: it is renamed to a
    hidden name first (one atomic step), then deleted."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.removing")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def move_into(paths, folder: str | os.PathLike) -> Path:
    """Move files and folders (each one atomic rename) into `folder`, created first."""
    folder = make_dir(folder)
    for path in paths:
        os.replace(path, folder / Path(path).name)
    fsync_dir(folder)
    return folder


def make_dir(path: str | os.PathLike) -> Path:
    """A folder (and its parents), with the umask's mode like `mkdir -p`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
