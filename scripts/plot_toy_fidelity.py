"""One picture of a style's distance to its own teacher against the images of that style the student saw.

Each point is an eval suite report (`report.json`): the diagonal toy-FID of `--style` (merged model in
that style vs its teacher), at the number of that style's samples the run trained on (steps x the
batch's share of the style). Series are drawn as lines; the teacher's own reference (the same
teacher on other seeds) is the dashed floor. Used for BENCHMARKS.md's "Starting from the teachers'
average" (a style distilled alone against the same style shared with three others):

  python scripts/plot_toy_fidelity.py --style neon --out docs/toy_sharing.png \
      --point "alone=runs/ablate/neon_only125/eval/report.json@4000" ...
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", required=True)
    parser.add_argument("--point", action="append", required=True, metavar="SERIES=REPORT@SAMPLES",
                        help="a report.json and the style's samples seen in training, in a named series")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, reference = defaultdict(list), None
    for spec in args.point:
        name, _, rest = spec.partition("=")
        path, _, samples = rest.rpartition("@")
        if not (name and path and samples):
            parser.error(f"--point {spec!r}: write SERIES=REPORT.json@SAMPLES")
        fid = json.loads(Path(path).read_text())["fid"]
        series[name].append((int(samples), fid["diagonal"][args.style]))
        if fid.get("M_ref"):  # the suite's teacher reference (absent with --no-reference)
            reference = fid["M_ref"][fid["rows"].index(args.style)][fid["cols"].index(args.style)]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="gray", label=f"teacher vs itself ({reference:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel(f"{args.style} images seen by the student")
    ax.set_ylabel(f"toy-FID to the {args.style} teacher")
    ax.set_title(args.title or f"{args.style}: distance to its teacher")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
