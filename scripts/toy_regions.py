"""Regional styles on the toy merged model, judged by the toy world's classifier.

Generates `--n` panoramas (one toy caption each, seed k) whose left, middle and right thirds carry
the styles of `--styles`, classifies each third (a 32x32 crop: the classifier's own resolution)
and prints how often each third is called its region's style, next to the same model's accuracy
when the whole image has that style (plain generation, same captions and seeds). `--png` saves
the first four panoramas, 4x enlarged, as the README's example picture.

    .venv/bin/python scripts/toy_regions.py --model runs/toy_sdxl_4/merged --png docs/toy_regions.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dmm.io import atomic_file, atomic_write_json
from dmm.pipeline import generate, load_merged
from dmm.regions import generate_regions
from dmm.toyworld.world import load_world


def to_uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def timing(args) -> int:
    """Seconds per image of a panorama (each decoding) and of one plain call at the same canvas size."""
    import time

    world = load_world(args.world)
    styles, side = args.styles.split(","), world.resolution
    pipe = load_merged(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = {"width": side * len(styles), "height": side}
    runs = {"plain": lambda k: generate(pipe, ["a red circle"], styles[0], seed=k, steps=args.steps, **size),
            **{f"regions, decode={d}": (lambda k, d=d: generate_regions(
                pipe, "a red circle", styles, overlap=args.overlap, decode=d, seed=k, steps=args.steps, **size))
               for d in ("regions", "canvas")}}
    spent = dict.fromkeys(runs, 0.0)
    for k in range(args.timing):
        for name, run in runs.items():
            start = time.perf_counter()
            run(k)
            spent[name] += time.perf_counter() - start
    for name, total in spent.items():
        print(f"{name}: {total / args.timing:.2f} s/image, {total / spent['plain']:.2f}x plain "
              f"({size['width']}x{size['height']}, {args.steps} steps, {len(world.style_names)}-style model)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/toy_sdxl_4/merged", help="the toy merged model folder")
    parser.add_argument("--world", default="assets/toyworld", help="the toy world (classifier, captions)")
    parser.add_argument("--styles", default="flat,neon,pixel", help="left, middle, right styles")
    parser.add_argument("--n", type=int, default=16, help="panoramas (captions, seeds 0..n-1)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--overlap", type=int, default=8, help="blend band in pixels")
    parser.add_argument("--decode", default="regions", choices=("regions", "canvas"),
                        help="VAE decoding by region (default) or of the whole canvas at once")
    parser.add_argument("--no-plain", action="store_true", help="skip the whole-image reference accuracy")
    parser.add_argument("--png", default=None, help="write the first four panoramas here")
    parser.add_argument("--json", default=None, help="write the accuracies here")
    parser.add_argument("--timing", type=int, default=0, metavar="K",
                        help="instead: time K panoramas against K plain generations of the same canvas, interleaved")
    args = parser.parse_args(argv)
    if args.timing:
        return timing(args)

    world = load_world(args.world)
    styles = args.styles.split(",")
    side = world.resolution
    pipe = load_merged(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = world.prompts(args.n, seed=1)
    sampling = {"steps": args.steps, "guidance_scale": float(world.sampling.get("guidance_scale", 3.0))}

    panoramas = np.stack([to_uint8(generate_regions(pipe, p, styles, width=side * len(styles), height=side, seed=k,
                                                    overlap=args.overlap, decode=args.decode,
                                                    output_type="np", **sampling))
                          for k, p in enumerate(prompts)])
    regional, plain = {}, {}
    for j, style in enumerate(styles):
        crops = panoramas[:, :, j * side:(j + 1) * side]
        regional[style] = float(np.mean([s == style for s in world.classifier.predict_names(crops)["style"]]))
        if not args.no_plain:
            whole = to_uint8(generate(pipe, prompts, style, seed=0, output_type="np", **sampling))
            plain[style] = float(np.mean([s == style for s in world.classifier.predict_names(whole)["style"]]))
        print(f"{['left', 'middle', 'right'][j] if len(styles) == 3 else j}: {style:8s} "
              f"regional {regional[style]:.0%}  whole image {plain.get(style, float('nan')):.0%}  (n={args.n})")
    result = {"styles": styles, "n": args.n, "steps": args.steps, "overlap": args.overlap, "decode": args.decode,
              "regional_accuracy": regional, "whole_image_accuracy": plain}
    if args.json:
        atomic_write_json(Path(args.json), result)
    if args.png:
        from PIL import Image

        rows = panoramas[:4]
        gap = 4
        sheet = Image.new("RGB", (rows.shape[2] * 4, len(rows) * (side * 4 + gap) - gap), "white")
        for k, row in enumerate(rows):
            big = Image.fromarray(row).resize((row.shape[1] * 4, row.shape[0] * 4), Image.NEAREST)
            sheet.paste(big, (0, k * (side * 4 + gap)))
        with atomic_file(Path(args.png)) as tmp:
            sheet.save(tmp, format="PNG")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
