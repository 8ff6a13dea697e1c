"""The `dmm` command line (`dmm VERB ...` or `python -m dmm VERB ...`) for merged models.

Verbs live in the `VERBS` registry ("cli verb"), so a later verb (`merge`, `regions`) is one
registered class in its own module: `arguments(parser)` declares its flags, `run(args)` does the
work and returns the exit status. Every error the library raises for bad input is printed as one
line `error: ...` and exits 2. Training and evaluation keep their own entry points
(`launchers/train.py`, `python -m eval.suite`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from dmm.io import atomic_file
from dmm.registry import Registry

VERBS: Registry = Registry("cli verb")


class UsageError(ValueError):
    """A command line argparse cannot read; printed as one `error:` line like any other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block and exit itself
        raise UsageError(f"{message} (see {self.prog} --help)")


def _model_and_style(parser) -> None:
    """The two flags every verb that uses a merged model's styles takes."""
    parser.add_argument("--model", required=True, metavar="DIR", help="a merged model folder")
    parser.add_argument("--style", required=True,
                        help="a style name (neon), an index (2) or a mixture of weights summing to 1 "
                             "(0.3*anime+0.7*real); `dmm styles DIR` lists the names")


@VERBS.register("styles", description="list the styles a merged model was trained on")
class StylesVerb:
    @staticmethod
    def arguments(parser) -> None:
        parser.add_argument("model", metavar="DIR", help="a merged model folder")

    @staticmethod
    def run(args) -> int:
        from dmm.pipeline import merged_style_names

        for index, name in enumerate(merged_style_names(args.model)):
            print(f"{index}\t{name}")
        return 0


@VERBS.register("generate", description="generate images of one style or mixture with a merged model")
class GenerateVerb:
    @staticmethod
    def arguments(parser) -> None:
        _model_and_style(parser)
        parser.add_argument("--prompt", required=True, help="the caption of every image")
        parser.add_argument("--n", type=int, default=4, help="number of images (default 4)")
        parser.add_argument("--seed", type=int, default=0, help="image k uses seed SEED+k (default 0)")
        parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
        parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
        parser.add_argument("--negative-prompt", default=None, help="caption to steer away from")
        parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
        parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
        parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
        parser.add_argument("--out", required=True, metavar="DIR", help="folder for 0000.png, ... and grid.png")

    @staticmethod
    def run(args) -> int:
        from tqdm.auto import tqdm

        from dmm.models.student import resolve_style
        from dmm.pipeline import generate, load_merged, merged_style_names, parse_style
        from dmm.sampling import check_sampling

        # every check before the weights load
        if args.n < 1:
            raise UsageError(f"--n must be at least 1 (number of images), got {args.n}")
        check_sampling(args.steps, args.guidance, args.batch_size,
                       flags={"steps": "--steps", "guidance_scale": "--guidance", "batch_size": "--batch-size"})
        style = parse_style(args.style)
        resolve_style(style, merged_style_names(args.model))
        pipe = load_merged(args.model)
        pipe.set_progress_bar_config(disable=True)
        sizes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
        with tqdm(total=args.n, desc="images", unit="img", file=sys.stderr) as bar:
            images = generate(pipe, [args.prompt] * args.n, style, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                              batch_size=args.batch_size, on_batch=lambda done, _: bar.update(done - bar.n),
                              **sizes)
        out = Path(args.out)
        for k, image in enumerate(images):
            _save_png(image, out / f"{k:04d}.png")
        _save_png(_grid(images), out / "grid.png")
        print(f"wrote {len(images)} images and grid.png to {out}")
        return 0


@VERBS.register("export", description="bake a style or fixed mixture into a stock model: diffusers folder, "
                                       "A1111/ComfyUI single file, or style LoRA")
class ExportVerb:
    @staticmethod
    def arguments(parser) -> None:
        from dmm.pipeline import EXPORT_DTYPES, EXPORT_FORMATS

        _model_and_style(parser)
        parser.add_argument("--format", default="diffusers", choices=EXPORT_FORMATS,
                            help="diffusers: a stock pipeline folder; single-file: one original-layout "
                                 ".safetensors for A1111/ComfyUI (full-size SD1.5/SDXL only); lora: a kohya LoRA "
                                 "of the style against --base, with an error report NAME.json next to it")
        parser.add_argument("--out", required=True, metavar="PATH",
                            help="the folder (diffusers) or NAME.safetensors to write; an existing one is replaced "
                                 "only once the export succeeded")
        parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default=None,
                            help="fp16 or fp32 weights (default fp16 for single-file and lora; the diffusers folder "
                                 "keeps the merged model's unless given)")
        parser.add_argument("--rank", type=int, default=None, help="lora: the rank of every layer's SVD truncation")
        parser.add_argument("--base", metavar="DIR", default=None,
                            help="lora: the diffusers folder of the base model the merged one was trained from "
                                 "(the LoRA is the difference to it)")

    @staticmethod
    def run(args) -> int:
        from dmm.pipeline import export_baked, lora_summary, parse_style

        out = export_baked(args.model, parse_style(args.style), args.out, fmt=args.format, dtype=args.dtype,
                           rank=args.rank, base=args.base)
        if args.format == "lora":
            print(f"wrote a LoRA of style {args.style!r} to {out}\n{lora_summary(out)}")
        else:
            kind = "a stock diffusers folder" if args.format == "diffusers" else "an A1111/ComfyUI single file"
            print(f"wrote {kind} with style {args.style!r} baked in to {out}")
        return 0


class LazyVerb:
    """A verb whose module imports only when that verb runs (or shows its help): `dmm styles`
    should not pay for a heavy dependency of another verb (the merge baselines load sd-mecha)."""

    def __init__(self, target: str):
        self.target = target  # "module:Class"

    def _load(self):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def arguments(self, parser) -> None:
        self._load().arguments(parser)

    def run(self, args) -> int:
        return self._load().run(args)


VERBS.add("merge", LazyVerb("dmm.merge.cli:MergeVerb"),
          description="merge checkpoints' weights with a registered method (weighted sum, TIES, DARE, ...)")


@VERBS.register("regions", description="one image whose regions carry different styles (panoramas, layouts)")
class RegionsVerb:
    @staticmethod
    def arguments(parser) -> None:
        parser.add_argument("--model", required=True, metavar="DIR", help="a merged model folder")
        parser.add_argument("--prompt", required=True, help="the caption of the whole image")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--styles", help="a left-to-right panorama of equal strips, styles joined by commas "
                                            "(flat,neon,0.5*neon+0.5*pixel); `dmm styles DIR` lists the names")
        where.add_argument("--layout", help="boxes in pixels: LEFT,TOP,RIGHT,BOTTOM=STYLE joined by ';' "
                                            "(0,0,64,64=flat;64,0,128,64=neon); together they must cover the canvas")
        parser.add_argument("--width", type=int, required=True, help="canvas width in pixels")
        parser.add_argument("--height", type=int, required=True, help="canvas height in pixels")
        parser.add_argument("--overlap", type=int, default=None,
                            help="pixels where neighbouring regions blend (default: a quarter of the smallest region side)")
        parser.add_argument("--blend", default="cosine", help="blend weights: cosine (default) or gaussian")
        parser.add_argument("--size-ids", default="tile", choices=("tile", "canvas"),
                            help="SDXL size conditioning per region: tile (each region as a whole image, default) "
                                 "or canvas (the whole canvas' sizes)")
        parser.add_argument("--decode", default="regions", choices=("regions", "canvas"),
                            help="VAE decoding: regions (each region's latents decoded on their own and blended, "
                                 "default: keeps one style's colours out of another's) or canvas (one decode)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
        parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
        parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
        parser.add_argument("--negative-prompt", default=None, help="caption to steer away from")
        parser.add_argument("--out", required=True, metavar="FILE", help="the PNG to write")

    @staticmethod
    def run(args) -> int:
        from dmm.pipeline import load_merged, merged_style_names, parse_style
        from dmm.regions import (
            BLENDS,
            check_regions,
            generate_regions,
            panorama_regions,
            parse_layout,
            vae_grid,
        )
        from dmm.sampling import check_sampling

        # every check before the weights load
        check_sampling(args.steps, args.guidance, flags={"steps": "--steps", "guidance_scale": "--guidance"})
        BLENDS.get(args.blend)
        grid = vae_grid(args.model)
        if args.styles is not None:
            regions = panorama_regions([parse_style(s) for s in args.styles.split(",")], args.width, args.height, grid)
        else:
            regions = parse_layout(args.layout, parse_style)
        check_regions(regions, args.width, args.height, grid, merged_style_names(args.model))
        pipe = load_merged(args.model)
        pipe.set_progress_bar_config(desc="steps", file=sys.stderr)
        image = generate_regions(pipe, args.prompt, regions, width=args.width, height=args.height,
                                 overlap=args.overlap, blend=args.blend, size_ids=args.size_ids,
                                 decode=args.decode, seed=args.seed,
                                 steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt)
        _save_png(image, Path(args.out))
        print(f"wrote a {args.width}x{args.height} image with {len(regions)} regions to {args.out}")
        return 0


def _save_png(image, path: Path) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def _grid(images):
    """All images in one PNG, as square as the count allows."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * w, (k // cols) * h))
    return grid


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb is listed; only `verb`'s flags are built (so only its module is imported)."""
    parser = _Parser(prog="dmm", description="Use merged models: list styles, generate, export. "
                                             "Train with launchers/train.py, evaluate with python -m eval.suite.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    for entry in VERBS.entries():
        sub = verbs.add_parser(entry.name, help=entry.description, description=entry.description)
        if entry.name == verb:
            entry.obj.arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; bad input of any kind is one `error:` line and exit status 2."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
        return VERBS.get(args.verb).obj.run(args)
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
