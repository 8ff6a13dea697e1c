"""Errors that every rank agrees on: a failure on one rank must not leave the others waiting."""

from __future__ import annotations

import torch.distributed as dist


class CollectiveError(RuntimeError):
    """Raised on every rank when a step failed on at least one of them; names the ranks and their errors."""


def one_line(err: BaseException) -> str:
    """An error's message on one line (never a traceback): what every rank prints."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _kind(err: BaseException) -> str | None:
    """The built-in family an error belongs to, so that every rank can raise the same catchable type."""
    for family in (FileNotFoundError, ValueError):
        if isinstance(err, family):
            return family.__name__
    return None


def all_gather_object(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(fn, *args, what: str = "setup", collective: bool = True, **kwargs):
    """Run `fn` on every rank; if it raised anywhere, raise the same error everywhere.

    The original exception is re-raised unchanged on a lone process. With several ranks every
    rank raises one single-line message listing each failing rank's error message (no
    traceback: the launcher prints it as is on every rank). Bad input stays catchable as such:
    when the first failure is a FileNotFoundError or a ValueError (subclasses included) every
    rank raises that built-in type, otherwise `CollectiveError`. The raised error carries
    `.errors`, a list of (rank, type name, message). `collective=False` (a process that trains
    alone inside a larger group) runs `fn` plainly.
    """
    if not collective:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported collectively below
        error = err
    report = None if error is None else (type(error).__name__, one_line(error), _kind(error))
    reports = all_gather_object(report)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return result
    if len(reports) == 1:
        raise error
    message = f"{what} failed on {len(failed)} of {len(reports)} ranks: " + "; ".join(
        f"rank {r}: {msg}" for r, (_, msg, _) in failed)
    kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(failed[0][1][2], CollectiveError)
    agreed = kind(message)
    agreed.errors = [(r, name, msg) for r, (name, msg, _) in failed]
    raise agreed from error


class ProcessGroupCollectives:
    """The Engine collectives over the default torch.distributed group (for the distributed engines)."""

    world_size: int

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
