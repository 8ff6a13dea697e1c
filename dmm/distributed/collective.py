"""Errors that every rank agrees on: a failure on one rank must not leave the others waiting."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """Raised on every rank when a step failed on at least one of them; names the ranks and their errors."""


def all_gather_object(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(fn, *args, what: str = "setup", collective: bool = True, **kwargs):
    """Run `fn` on every rank; if it raised anywhere, raise the same error everywhere.

    The original exception is re-raised unchanged on a lone process. With several ranks every
    rank raises one message listing each failing rank's error (the type of the first failure is
    kept when it is a plain built-in error, so callers can still catch FileNotFoundError etc.).
    `collective=False` (a process that trains alone inside a larger group) runs `fn` plainly.
    """
    if not collective:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported collectively below
        error = err
    reports = all_gather_object(None if error is None else (type(error).__name__, str(error)))
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return result
    if len(reports) == 1:
        raise error
    message = f"{what} failed on {len(failed)} of {len(reports)} ranks: " + "; ".join(
        f"rank {r}: {msg}" for r, (_, msg) in failed)
    kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(failed[0][1][0])
    if kind is not None:
        raise kind(message) from error
    raise CollectiveError(message) from error


class ProcessGroupCollectives:
    """The Engine collectives over the default torch.distributed group (for the distributed engines)."""

    world_size: int

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
