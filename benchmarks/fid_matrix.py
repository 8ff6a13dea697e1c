"""Benchmark: an N x N FID matrix with eval.fid against torchmetrics' FID called once per pair.

Same process, same float64 features, both timed from raw features (statistics included):
  * ours:         eval.fid.fid_matrix(student_sets, teacher_sets)
  * torchmetrics: for each pair a FrechetInceptionDistance(feature=<identity module>),
                  update(teacher j, real=True), update(student i, real=False), compute()

Run (5-10 minutes on 2 shared CPU cores at the defaults, mostly torchmetrics; run it once):
  HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/fid_matrix.py --threads 1
Quick look (extrapolates the torchmetrics time from a few pairs, says so):
  .venv/bin/python benchmarks/fid_matrix.py --torchmetrics-pairs 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.fid import fid_matrix


class _Identity(torch.nn.Module):
    """Feature 'extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def make_sets(count: int, n: int, dim: int, seed: int) -> list[torch.Tensor]:
    """``count`` Gaussian sets with distinct means and anisotropic covariances (float64)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    sets = []
    for _ in range(count):
        own = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        scale = torch.logspace(0, -2, dim, dtype=torch.float64)  # a decaying spectrum, like CNN features
        mix = (shared + 0.5 * own) * scale
        mu = torch.randn(dim, generator=g, dtype=torch.float64) * 0.3
        z = torch.randn(n, dim, generator=g, dtype=torch.float64)
        sets.append(z @ mix.T + mu)
    return sets


def torchmetrics_pair(fake: torch.Tensor, real: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance  # imported before timing starts

    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), normalize=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=int, default=8, help="N: the matrix is N x N (default 8)")
    p.add_argument("--n", type=int, default=2048, help="samples per set (default 2048)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchmetrics-pairs", type=int, default=None,
                   help="time torchmetrics on only this many pairs and extrapolate (default: all N*N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    students = make_sets(args.sets, args.n, args.dim, args.seed)
    teachers = make_sets(args.sets, args.n, args.dim, args.seed + 1)
    print(f"data: 2 x {args.sets} sets of {args.n} x {args.dim} float64 ({time.perf_counter() - t0:.1f} s)",
          flush=True)

    load_before = os.getloadavg()[0]
    t_ours_runs = []

    def run_ours():
        t0 = time.perf_counter()
        out = fid_matrix(students, teachers)
        t_ours_runs.append(time.perf_counter() - t0)
        print(f"eval.fid.fid_matrix: {t_ours_runs[-1]:.2f} s for {args.sets}x{args.sets}", flush=True)
        return out

    ours = run_ours()

    pairs = [(i, j) for i in range(args.sets) for j in range(args.sets)]
    if args.torchmetrics_pairs is not None:
        pairs = pairs[: args.torchmetrics_pairs]
    ref = np.full_like(ours, np.nan)
    import torchmetrics.image.fid

    t0 = time.perf_counter()
    for k, (i, j) in enumerate(pairs):
        ref[i, j] = torchmetrics_pair(students[i], teachers[j])
        print(f"  torchmetrics pair {k + 1}/{len(pairs)}: {time.perf_counter() - t0:.1f} s", flush=True)
    t_tm_measured = time.perf_counter() - t0
    t_tm = t_tm_measured * (args.sets**2) / len(pairs)
    again = run_ours()  # timed again after torchmetrics: the machine's load drifts
    assert np.array_equal(again, ours)
    t_ours = max(t_ours_runs)  # the slower of the two: a conservative ratio
    done = ~np.isnan(ref)
    rel = np.abs(ours[done] - ref[done]) / np.abs(ref[done])
    result = {
        "matrix": f"{args.sets}x{args.sets}",
        "samples_per_set": args.n,
        "dim": args.dim,
        "ours_s": round(t_ours, 3),
        "ours_runs_s": [round(t, 3) for t in t_ours_runs],
        "torchmetrics_s": round(t_tm, 3),
        "torchmetrics_pairs_timed": len(pairs),
        "torchmetrics_extrapolated": len(pairs) < args.sets**2,
        "speedup": round(t_tm / t_ours, 2),
        "max_rel_diff": float(rel.max()),
        "fid_range": [float(ours.min()), float(ours.max())],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    try:
        import torchmetrics

        result["torchmetrics"] = torchmetrics.__version__
    except ImportError:
        pass
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0 if rel.max() <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
