#!/usr/bin/env python
"""Distil N teachers into one style-promptable student.

  python launchers/train.py --recipe recipes/toy_sdxl_4.yaml [--set train.max_steps=10 ...]
  deepspeed launchers/train.py --recipe recipes/sdxl_4.yaml
  torchrun --nproc_per_node 8 launchers/train.py --recipe recipes/sd15_8.yaml
  python launchers/train.py --recipe recipes/sdxl_4.yaml --dry-run --gpus 8 --gpu-memory 80GiB   (does it fit?)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.max_steps=10 (repeatable)")
    parser.add_argument("--demo", action="store_true",
                        help="after training, sample the merged model and every teacher and print the toy summary")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each rank's memory plan (models on the meta device, no weights read) and whether "
                             "it fits in --gpu-memory; train nothing")
    parser.add_argument("--gpus", type=int, default=None,
                        help="with --dry-run: world size (default 1 for engine none, else the number of supervisor slots (teachers, and any the objective adds))")
    parser.add_argument("--gpu-memory", default="80GiB", help="with --dry-run: memory of each GPU, e.g. 80GiB, 24GB")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from dmm.recipes import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:  # before any process group or model: sizes only
        from dmm.train.dryrun import DryRunError, dry_run, render

        try:
            plan = dry_run(recipe, args.gpus, args.gpu_memory)
        except DryRunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(render(plan))
        return 0 if plan.fits else 1
    from dmm.train.run import run
    from dmm.train.signals import exit_code, resume_hint, signal_name
    from dmm.train.trainer import StopRequested

    try:  # engines deepspeed/fsdp2 start the process group from torchrun/deepspeed/SLURM variables
        merged = run(recipe)
    except (ValueError, FileNotFoundError, PermissionError) as err:  # bad input: one clear line on every rank
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StopRequested as stop:  # SIGINT/SIGTERM: the checkpoint is written; say how to go on
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
            print(f"stopped by {signal_name(stop.signum)} at step {stop.step}, checkpoint {stop.checkpoint}; "
                  f"{resume_hint()}", file=sys.stderr)
        return exit_code(stop.signum)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"aborted by Ctrl-C: nothing saved since the last checkpoint; {resume_hint()}", file=sys.stderr)
        return exit_code(signal.SIGINT)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if merged is not None:
        print(f"merged model: {merged}")
        if args.demo:
            from eval.demo import summarise

            summarise(recipe, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
