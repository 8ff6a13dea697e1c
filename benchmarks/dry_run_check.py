#!/usr/bin/env python
"""The dry run's estimate next to the measured peak of a real run of the same recipe, on this CPU.

  python benchmarks/dry_run_check.py --recipe recipes/toy_sdxl_4.yaml --steps 3 [--set key=value ...]

A fresh process imports everything, lets the data source write its shards, then records its
resident set, resets the peak (/proc/self/clear_refs) and builds the real `DistillationTrainer`
(engine none) and runs `--steps` training steps (no checkpoint is written); the peak rise over the
recorded level is the measured figure. The dry run's plan (`dmm.train.dryrun.plan`, device cpu:
AdamW steps tensor by tensor there) is printed beside it with the ratio. Prints one JSON line
last: {"estimate": bytes, "measured": bytes, "ratio": estimate / measured, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(recipe_path: str, overrides: list[str], steps: int) -> dict:
    import torch

    from dmm.recipes import load_recipe
    from dmm.train.dryrun import peak_rise
    from dmm.train.trainer import DistillationTrainer, training_shards

    torch.set_num_threads(max(1, int(os.environ.get("DMM_CHECK_THREADS", "2"))))
    recipe = load_recipe(recipe_path, overrides)
    training_shards(recipe, Path(recipe.train.output_dir).parent / ".shards")  # written before the baseline

    def train():
        trainer = DistillationTrainer(recipe)
        data = iter(trainer.stream)
        for _ in range(steps):
            trainer.train_step([next(data) for _ in range(recipe.distributed.grad_accum_steps)])

    return {"measured": peak_rise(train)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.recipe, args.overrides, args.steps)))
        return 0

    cmd = [sys.executable, __file__, "--child", "--recipe", args.recipe, "--steps", str(args.steps)]
    for o in args.overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return proc.returncode
    measured = json.loads(proc.stdout.strip().splitlines()[-1])

    from dmm.recipes import load_recipe
    from dmm.train.dryrun import fmt, plan, render

    recipe = load_recipe(args.recipe, args.overrides)
    p = plan(recipe, 1, 10**15, device="cpu")
    print(render(p))
    rank = p.ranks[0]
    result = {"recipe": recipe.name, "steps": args.steps, "estimate": rank.peak, "estimate_phase": rank.peak_phase,
              "estimate_resident": rank.resident_bytes, "measured": measured["measured"],
              "ratio": rank.peak / measured["measured"]}
    print(f"\nestimate {fmt(rank.peak)} ({rank.peak_phase}) vs measured peak rise {fmt(measured['measured'])}: "
          f"ratio {result['ratio']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
