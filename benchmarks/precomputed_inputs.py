#!/usr/bin/env python
"""Training steps from images vs from precomputed inputs (dmm.data.precompute), in ONE process.

Both trainers are built from the same recipe (the second with data.precomputed), their batches
are read ahead, then their steps alternate (images, latents, images, ...) so that load from other
jobs falls on both alike; the ratio of the median step times is the figure to quote. The first
`--warmup` steps of each are not timed. The precomputed folder must exist:

  python -m dmm.data.precompute --recipe R [--set ...] --out DIR
  python benchmarks/precomputed_inputs.py --recipe R [--set ...] --precomputed DIR --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--precomputed", required=True, help="folder written by python -m dmm.data.precompute")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from dmm.recipes import load_recipe
    from dmm.train.trainer import DistillationTrainer, set_threads

    set_threads()
    work = Path(tempfile.mkdtemp(prefix="precomputed-bench-"))
    trainers, batches, build_s = {}, {}, {}
    for name, extra in (("images", []), ("precomputed", [f"data.precomputed={Path(args.precomputed).resolve()}"])):
        recipe = load_recipe(args.recipe, [*args.overrides, f"train.output_dir={work / name}", *extra])
        started = time.perf_counter()
        trainers[name] = DistillationTrainer(recipe)
        build_s[name] = time.perf_counter() - started
        data = iter(trainers[name].stream)
        batches[name] = [next(data) for _ in range(args.warmup + args.steps)]
    times = {name: [] for name in trainers}
    for k in range(args.warmup + args.steps):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            metrics = trainer.train_step(batches[name][k])
            if k >= args.warmup:
                times[name].append(time.perf_counter() - started)
        assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    result = {name: {"median_step_s": statistics.median(t), "steps_s": [round(x, 3) for x in t],
                     "build_s": round(build_s[name], 2)} for name, t in times.items()}
    result["step_ratio_images_over_precomputed"] = (result["images"]["median_step_s"]
                                                    / result["precomputed"]["median_step_s"])
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
