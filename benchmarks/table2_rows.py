"""The paper's Table 2 at toy scale, from eval-suite reports: one row per (model, seed) and the spread.

Each `--row NAME=REPORT[,REPORT...]` names a model and its eval reports (one per training seed);
the table gives each style's toy-FID to its own teacher (the diagonal of M), the old styles' mean,
and style accuracy, then per model the mean and the range over seeds of the old-style mean (and its
ratio to the first row's, seed by seed) and of each new style. Example (BENCHMARKS.md, "Incremental merging"):

    python benchmarks/table2_rows.py --old flat,outline,neon,pixel --new hatched,sepia \
        --row "6 from scratch=runs/table2/toy_sdxl_6/report.json,runs/table2/toy_sdxl_6_s1/report.json"
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def read(report: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    data = json.loads(Path(report).read_text())
    acc = {k.split("/", 1)[1]: v for k, v in data["style_accuracy"].items() if k.startswith("merged/")}
    return data["fid"]["diagonal"], acc


def rows(spec: dict[str, list[str]], old: list[str], new: list[str]) -> list[str]:
    styles = old + new
    out = ["| row | seed | " + " | ".join(styles) + " | old mean | style acc (" + "/".join(styles) + ") |",
           "| --- | ---: | " + " | ".join("---:" for _ in styles) + " | ---: | --- |"]
    spread, first = [], None
    for name, reports in spec.items():
        olds, news = [], {s: [] for s in new}
        for seed, report in enumerate(reports):
            diag, acc = read(report)
            old_mean = statistics.fmean(diag[s] for s in old)
            olds.append(old_mean)
            for s in new:
                news[s].append(diag.get(s, float("nan")))
            cells = " | ".join(f"{diag[s]:.1f}" if s in diag else "-" for s in styles)
            accs = " / ".join(f"{acc[s]:.2f}" if s in acc else "-" for s in styles)
            out.append(f"| {name} | {seed} | {cells} | {old_mean:.1f} | {accs} |")
        line = f"| **{name}**, {len(reports)} seeds | old mean {statistics.fmean(olds):.1f} " \
               f"(range {min(olds):.1f}-{max(olds):.1f})"
        if first is None:
            first = (name, olds)
        elif len(first[1]) == len(olds):  # seed by seed against the first row, e.g. training from scratch
            ratios = [a / b for a, b in zip(olds, first[1])]
            line += f", {statistics.fmean(ratios):.2f}x {first[0]}'s (range {min(ratios):.2f}-{max(ratios):.2f})"
        for s in new:
            vals = news[s]
            if not any(math.isnan(v) for v in vals):  # the model has the style
                line += f"; {s} {statistics.fmean(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"
        spread.append(line + " |")
    return out + ["", "| model | mean over seeds (range) |", "| --- | --- |"] + spread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="comma-separated styles of the starting model")
    ap.add_argument("--new", default="", help="comma-separated styles added incrementally")
    ap.add_argument("--row", action="append", required=True, help="NAME=REPORT[,REPORT...] (one report per seed)")
    args = ap.parse_args(argv)
    spec = {}
    for item in args.row:
        name, _, reports = item.partition("=")
        if not reports:
            ap.error(f"--row {item!r}: give NAME=REPORT[,REPORT...]")
        spec[name] = reports.split(",")
    print("\n".join(rows(spec, args.old.split(","), [s for s in args.new.split(",") if s])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
