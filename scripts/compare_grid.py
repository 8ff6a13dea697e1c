"""One picture comparing models style by style, from an eval suite cache (no sampling here).

Rows: for each style, the teacher, then each merged model in that style; columns: the first N
images (the suite gives every set the same prompts and seeds, so a column is one prompt and seed).
Used for BENCHMARKS.md's SPLAM grid (20-step merged vs 4-step):

  python scripts/compare_grid.py --cache runs/.evalcache --model 20-step=runs/toy_sdxl_4/merged \
      --model 4-step=runs/toy_splam_4/merged --n 8 --out docs/toy_splam_grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from eval.generate import model_fingerprint


def sets(cache: Path) -> list[tuple[dict, Path]]:
    out = []
    for folder in sorted(p for p in cache.iterdir() if p.is_dir()):
        try:
            out.append((json.loads((folder / "set.json").read_text()), folder))
        except (OSError, ValueError):
            continue
    return out


def find(found, model: Path, style: str | None, kind: str) -> Path:
    """The cached set of the folder as it is now (a retrained folder has another fingerprint)."""
    fingerprint, model = model_fingerprint(str(model)), str(model.resolve())
    hits = [f for meta, f in found if meta.get("model") == model and meta.get("kind") == kind
            and meta.get("model_fingerprint") == fingerprint and (kind != "merged" or meta.get("style") == style)]
    if not hits:
        raise SystemExit(f"no cached {kind} set of {model} (style {style}) in the cache: run the eval suite first")
    return max(hits, key=lambda f: len(list(f.glob("*.png"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=FOLDER")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    models = [(label, Path(folder)) for label, folder in (m.split("=", 1) for m in args.model)]
    info = json.loads((models[0][1] / "dmm_merge.json").read_text())
    styles, teachers = info["style_names"], info.get("teachers", {})
    found = sets(args.cache)
    rows: list[tuple[str, list[Path]]] = []
    for style in styles:
        if style in teachers:
            rows.append((f"{style}: teacher", sorted(find(found, Path(teachers[style]), None, "teacher").glob("*.png"))))
        for label, folder in models:
            rows.append((f"{style}: {label}", sorted(find(found, folder, style, "merged").glob("*.png"))))
    first = Image.open(rows[0][1][0])
    w, h = first.width * args.scale, first.height * args.scale
    label_w = 130
    sheet = Image.new("RGB", (label_w + args.n * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, paths) in enumerate(rows):
        y = r * (h + 2)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for c, path in enumerate(paths[: args.n]):
            sheet.paste(Image.open(path).convert("RGB").resize((w, h), Image.NEAREST), (label_w + c * (w + 2), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(rows)} rows x {args.n})")


if __name__ == "__main__":
    main()
