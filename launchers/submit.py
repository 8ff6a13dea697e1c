#!/usr/bin/env python
"""Submit a distillation recipe to SLURM through submitit (checkpointable: preempted or timed-out
jobs save, requeue and resume from `latest`).

  python launchers/submit.py --recipe recipes/sdxl_4.yaml --nodes 2 --gpus-per-node 8 \
      --partition gpu --time 2880
  python launchers/submit.py --recipe R --tasks-per-node 2 --cpus-per-task 1   # CPU test cluster

One SLURM task per GPU (or per --tasks-per-node on CPU); ranks and the rendezvous come from
SLURM's variables. Prints the job id; --wait blocks until the job ends and prints its result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (one task each); 0 on CPU")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node, or 1")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the time limit (checkpoint + requeue)")
    p.add_argument("--max-requeues", type=int, default=10, help="timeouts after which the job gives up")
    p.add_argument("--folder", default=None, help="submitit logs and pickles (default: <output_dir>/slurm)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dmm.recipes import RecipeError, load_recipe
    from dmm.train.layout import LayoutError, TeacherLayout

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    world = args.nodes * tasks
    try:  # refuse an impossible teacher layout before anything is queued
        TeacherLayout(world, len(recipe.teachers), recipe.distributed.grad_accum_steps)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if world > 1 and recipe.distributed.engine == "none":
        print(f"error: {world} tasks need distributed.engine deepspeed or fsdp2 (--set distributed.engine=fsdp2)",
              file=sys.stderr)
        return 2

    import submitit

    from dmm.train.slurm_job import DistillJob

    folder = Path(args.folder or Path(recipe.train.output_dir) / "slurm").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    recipe.save(folder / "recipe.yaml")  # the resolved recipe the job runs (overrides applied)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    params = {"name": f"dmm-{recipe.name}", "nodes": args.nodes, "tasks_per_node": tasks,
              "timeout_min": args.time, "slurm_signal_delay_s": args.signal_delay_s}
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    try:
        job = executor.submit(DistillJob(str(folder / "recipe.yaml")))
    except Exception as err:  # noqa: BLE001 - submitit raises sbatch's refusal in several types
        message = str(err).strip()
        print(f"error: SLURM refused the job ({args.nodes} node(s) x {tasks} task(s)"
              f"{f', {args.gpus_per_node} GPU(s) per node' if args.gpus_per_node else ''}): {message}",
              file=sys.stderr)
        return 3
    print(f"submitted job {job.job_id}; logs in {folder}", flush=True)
    if args.wait:
        print(f"merged model: {job.result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
