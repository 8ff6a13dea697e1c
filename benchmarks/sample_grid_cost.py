#!/usr/bin/env python
"""What the TensorBoard sample grids (`log.samples`, dmm/train/tblog.py) add to a training run:
the same recipe trained twice in one process, grids on and off, interleaved order per repeat.

  python benchmarks/sample_grid_cost.py recipes/toy_sdxl_4.yaml --steps 20 --checkpoint-every 10

Reports the wall and process-CPU time of `fit` for both (CPU time is steadier on a shared
machine), the grid time the run itself logged (`perf/sample_grids_s`), and the overhead at the
recipe's own `train.checkpoint_every` (one grid per checkpoint): grid seconds /
(checkpoint_every x seconds per step).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_once(recipe_path: str, out: Path, samples: bool, args) -> tuple[float, float, float]:
    """(wall seconds in fit, CPU seconds of this process in fit, wall seconds the run logged for its grids)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmm.recipes import load_recipe
    from dmm.train.trainer import DistillationTrainer

    recipe = load_recipe(recipe_path, [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}",
                                       f"train.output_dir={out}", f"log.samples={str(samples).lower()}",
                                       f"data.toyworld.n_samples={args.n_samples}", "train.resume=never"])
    trainer = DistillationTrainer(recipe)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    grids = sum(e.value for e in acc.Scalars("perf/sample_grids_s")) if samples else 0.0
    return seconds, cpu, grids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=10, help="grids are drawn at each checkpoint")
    p.add_argument("--n-samples", type=int, default=1024, help="toy world: training images rendered")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    from dmm.recipes import load_recipe

    every = load_recipe(args.recipe).train.checkpoint_every
    runs = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="grid-cost-") as tmp:
        for k in range(args.repeats):
            for samples in ((True, False) if k % 2 == 0 else (False, True)):
                runs[samples].append(train_once(args.recipe, Path(tmp) / f"{samples}-{k}", samples, args))
    on, cpu_on, grid_total = (sum(r[i] for r in runs[True]) / args.repeats for i in range(3))
    off, cpu_off, _ = (sum(r[i] for r in runs[False]) / args.repeats for i in range(3))
    grids_per_run = args.steps // args.checkpoint_every + (args.steps % args.checkpoint_every > 0)
    grid = grid_total / grids_per_run
    step = off / args.steps
    print(f"\n{args.recipe}: {args.steps} steps, a checkpoint every {args.checkpoint_every} "
          f"({grids_per_run} grids per run), {args.repeats} repeat(s)\n")
    grid_cpu, step_cpu = (cpu_on - cpu_off) / grids_per_run, cpu_off / args.steps
    print("| clock | fit, grids on | fit, grids off | on / off | one grid | one grid / one step | "
          f"overhead at checkpoint_every={every} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| wall (grid: as logged) | {on:.1f} s | {off:.1f} s | {on / off:.3f} | {grid:.2f} s | "
          f"{grid / step:.2f} steps | {100 * grid / (every * step):.2f} % |")
    print(f"| process CPU (grid: on - off) | {cpu_on:.1f} s | {cpu_off:.1f} s | {cpu_on / cpu_off:.3f} | "
          f"{grid_cpu:.2f} s | {grid_cpu / step_cpu:.2f} steps | {100 * grid_cpu / (every * step_cpu):.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
