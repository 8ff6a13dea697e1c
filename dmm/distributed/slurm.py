"""Collectives that agree on a per-rank flag at a step boundary (stop requests: signals, SLURM).

The SLURM job itself (submitit's checkpointable callable) lives above the trainer, in
`dmm.train.slurm_job`; this layer only holds what needs no trainer.
"""

from __future__ import annotations

import os


def max_over_ranks(value: int, world_size: int | None = None) -> int:
    """The largest `value` over all ranks, on every rank (one all-reduce when a process group of
    more than one rank is up and `world_size` is not 1; the tensor lies on the GPU under NCCL)."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a collective when a process group is up)."""
    return bool(max_over_ranks(1 if flag else 0))


def slurm_rank() -> int:
    """This task's rank in a SLURM job (0 outside one)."""
    return int(os.environ.get("SLURM_PROCID", "0"))
