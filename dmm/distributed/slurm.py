"""The SLURM job: a submitit-checkpointable callable that trains a recipe and survives preemption.

On USR2 (preemption: `scancel --signal USR2`, or the time-limit warning submitit asks SLURM
for with `--signal=USR2@<delay>`) every rank only raises a flag. The ranks agree on it at the
next step boundary (one all-reduce per step), write a checkpoint together, and then rank 0
hands over to submitit's own handler, which calls `checkpoint()` (a fresh copy of this job with
`train.resume=latest`), requeues the job and exits. The requeued job starts from `latest`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

log = logging.getLogger("dmm.slurm")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a collective when a process group is up)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class DistillJob:
    """Pickled by submitit and run once per SLURM task (SLURM_PROCID = rank)."""

    def __init__(self, recipe_path: str, overrides: list[str] | tuple = ()):
        self.recipe_path = str(recipe_path)
        self.overrides = list(overrides)

    def __call__(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        from dmm.recipes import load_recipe
        from dmm.train.run import run
        from dmm.train.trainer import StopRequested

        recipe = load_recipe(self.recipe_path, [*self.overrides, "train.resume=latest"])
        requested = {"stop": False}
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def on_usr2(signum, frame):
            requested["stop"] = True
            log.warning("USR2 received: checkpointing at the next step boundary, then requeueing")

        signal.signal(signal.SIGUSR2, on_usr2)
        try:
            return str(run(recipe, stop_flag=lambda: any_rank(requested["stop"])))
        except StopRequested as stop:
            log.warning("%s", stop)
            rank = int(os.environ.get("SLURM_PROCID", "0"))
            if rank == 0 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
            # Other ranks wait for the requeue to end this attempt.
            time.sleep(600)
            sys.exit(1)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(DistillJob(self.recipe_path, self.overrides))
