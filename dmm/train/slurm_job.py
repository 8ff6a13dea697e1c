"""The SLURM job: a submitit-checkpointable callable that trains a recipe and survives preemption.

On USR2 (preemption: `scancel --signal USR2`, or the time-limit warning submitit asks SLURM
for with `--signal=USR2@<delay>`) every rank only records it (dmm.train.signals, the same path
as Ctrl-C and SIGTERM). The ranks agree at the next step boundary, write a checkpoint together,
and then rank 0 hands over to submitit's own handler, which calls `checkpoint()` (a fresh copy
of this job), requeues the job and exits. The requeued job continues from `latest`. SIGTERM
(plain `scancel`) checkpoints and ends the job without a requeue.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

log = logging.getLogger("dmm.slurm")


class DistillJob:
    """Pickled by submitit and run once per SLURM task (SLURM_PROCID = rank)."""

    def __init__(self, recipe_path: str, overrides: list[str] | tuple = ()):
        self.recipe_path = str(recipe_path)
        self.overrides = list(overrides)

    def __call__(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        from dmm.distributed.slurm import slurm_rank
        from dmm.recipes import load_recipe
        from dmm.train.run import run
        from dmm.train.signals import StopSignals, exit_code
        from dmm.train.trainer import StopRequested

        recipe = load_recipe(self.recipe_path, [*self.overrides, "train.resume=latest"])
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        stop = StopSignals((signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
        try:
            return str(run(recipe, stop_flag=stop))
        except StopRequested as err:
            log.warning("%s", err)
            if getattr(err, "signum", signal.SIGUSR2) != signal.SIGUSR2:
                sys.exit(exit_code(err.signum))  # cancelled: saved, not requeued
            if slurm_rank() == 0 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
            # Other ranks wait for the requeue to end this attempt.
            time.sleep(600)
            sys.exit(1)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(DistillJob(self.recipe_path, self.overrides))
