"""The command line of the evaluation suite (`python -m eval.suite`): generate, score, report.

For every style i the merged model (style i) and every teacher j are sampled with the same
prompts and seeds; each teacher is sampled a second time with other seeds (the reference batch).
  M(i, j)     = FID(merged with style i,  teacher j reference batch)
  M_ref(i, j) = FID(teacher i,             teacher j reference batch)
  FIDt = trace(M), the teacher reference FIDt = trace(M_ref) (the paper's Eq. 14-15, Fig. 4).
Both matrices share their columns, so they differ only in the rows' model. CLIP score, LAION
aesthetic v2 and PickScore are computed per set (Table 3) when their local weights are given,
and skipped with the reason in the report otherwise. Images and features are cached on disk;
rerunning after an interruption only generates what is missing.

Metrics and FID feature networks are registries: `--metric NAME` (repeatable) picks metrics,
`--plugin MODULE_OR_FILE.py` imports your module that registers more (eval.metrics.METRICS,
eval.features.FEATURE_EXTRACTORS), `--metric-option NAME.KEY=VALUE` sets their typed options.

Toy demo (after `make demo`):
  python -m eval.suite --merged runs/toy_sdxl_4/merged \\
      --teachers-from-recipe runs/toy_sdxl_4/recipe.yaml --out runs/toy_sdxl_4/eval

Real models (paper settings are the defaults):
  python -m eval.suite --merged out/merged --teacher anime=/ckpt/anime --teacher real=/ckpt/real \\
      --prompts coco_val_captions.txt --num-samples 5000 --out out/eval \\
      --inception-weights /weights/pt_inception-2015-12-05-6726825d.pth \\
      --clip-model /weights/clip-vit-large-patch14 \\
      --aesthetic-weights /weights/sac+logos+ava1-l14-linearMSE.pth --aesthetic-clip /weights/clip-vit-large-patch14 \\
      --pick-model /weights/PickScore_v1 --pick-processor /weights/CLIP-ViT-H-14-laion2B-s32B-b79K
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dmm.schema import ConfigError
from eval.features import FEATURE_EXTRACTORS, RESIZE_MODES, FeatureConfig
from eval.generate import NEGATIVE_PROMPT, ModelFolderError
from eval.metrics import METRICS
from eval.plan import REPO_ROOT, SuiteConfig, recipe_toyworld, teachers_from_recipe
from eval.scores import AESTHETIC_WEIGHTS_NAME

__all__ = ["build_parser", "config_from_args", "main"]


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _option(text: str) -> tuple[str, str, object]:
    """NAME.KEY=VALUE, the value read as YAML (3 is an int, 0.5 a float, true a bool)."""
    key, value = _kv(text)
    if "." not in key:
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (e.g. clip_score.model=/w/clip), got {text!r}")
    name, field = key.split(".", 1)
    return name, field, yaml.safe_load(value)


def _registered() -> str:
    """The built-in metrics and feature extractors with their options (plugins add to these)."""
    return (f"registered metrics (--metric NAME, --metric-option NAME.KEY=VALUE):\n{METRICS.describe()}\n\n"
            f"registered feature extractors (--features NAME, --feature-option KEY=VALUE):\n"
            f"{FEATURE_EXTRACTORS.describe()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.suite", description=__doc__, epilog=_registered(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--merged", required=True, help="dmm merged model folder (unet/ is a StyleUNet2DConditionModel)")
    g.add_argument("--teacher", action="append", type=_kv, default=[], metavar="NAME=PATH",
                   help="a teacher pipeline folder; repeat once per style (NAME = the style name)")
    g.add_argument("--teachers-from-recipe", metavar="RECIPE.yaml",
                   help="take the teachers from a recipe's 'teachers:' list of {name, path}")
    g.add_argument("--baseline", action="append", type=_kv, default=[], metavar="NAME=PATH",
                   help="extra pipeline folder to score like a teacher (e.g. a weight-merged model, Table 3)")
    g = p.add_argument_group("sampling (defaults: the paper's)")
    g.add_argument("--prompts", metavar="FILE", help="captions, one per line (e.g. MS-COCO val); default: the toy "
                   "world's prompts")
    g.add_argument("--num-samples", type=int, default=64, help="images per set (paper: 5000; default 64)")
    g.add_argument("--seed", type=int, default=0, help="first seed of the merged/teacher batches (default 0)")
    g.add_argument("--ref-seed", type=int, default=1_000_000, help="first seed of the teacher reference batch")
    g.add_argument("--no-reference", action="store_true", help="skip the reference batch and M_ref")
    g.add_argument("--steps", type=int, help="inference steps (default 25; toy prompts: the toy world's)")
    g.add_argument("--guidance-scale", type=float, help="CFG scale (default 7; toy prompts: the toy world's)")
    g.add_argument("--negative-prompt", help=f"default: the paper's ({NEGATIVE_PROMPT!r}); toy prompts: none")
    g.add_argument("--scheduler", choices=["dpmsolver++", "pipeline"],
                   help="DPM-Solver++ (default) or the folder's own scheduler")
    g.add_argument("--height", type=int, default=None, help="default: the pipeline's")
    g.add_argument("--width", type=int, default=None, help="default: the pipeline's")
    g.add_argument("--batch-size", type=int, help="images per pipeline call (default 8; does not change images)")
    g.add_argument("--device", help="torch device (default cpu)")
    g = p.add_argument_group("FID features")
    g.add_argument("--features", default="auto", help="registered extractor: inception, toyworld, ... (auto: "
                   "inception when --inception-weights is given, else the toy world's)")
    g.add_argument("--feature-option", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="an option of the --features extractor (repeatable)")
    g.add_argument("--inception-weights", metavar="FILE", help="local pt_inception-2015-12-05-6726825d.pth")
    g.add_argument("--resize", choices=RESIZE_MODES, default="bilinear",
                   help="resize filter to the Inception input (recorded in the report; default bilinear)")
    g = p.add_argument_group("metrics (skipped with a reason when not given)")
    g.add_argument("--metric", action="append", metavar="NAME",
                   help="a registered metric to compute (repeatable; default: clip_score, aesthetic, pick_score)")
    g.add_argument("--metric-option", action="append", type=_option, default=[], metavar="NAME.KEY=VALUE",
                   help="an option of a metric (repeatable), e.g. clip_score.model=/weights/clip")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE.py",
                   help="import a module (dotted name or .py file) that registers metrics or feature extractors")
    g.add_argument("--clip-model", help="CLIP score backbone: HF CLIPModel folder or open_clip:NAME:WEIGHTS_FILE "
                   "(default: the toy world's CLIP)")
    g.add_argument("--clip-processor", help="tokenizer/image-processor folder (default: the model folder; toy: "
                   "the world's tokenizer)")
    g.add_argument("--clip-preprocess", choices=["processor", "minus1to1"],
                   help="image input of the CLIP: its image processor (default) or 2x-1 at native size (toy CLIP)")
    g.add_argument("--aesthetic-weights", metavar="FILE", help=f"LAION aesthetic v2 MLP ({AESTHETIC_WEIGHTS_NAME})")
    g.add_argument("--aesthetic-clip", help="CLIP ViT-L/14 for the aesthetic MLP (HF folder or open_clip:...)")
    g.add_argument("--pick-model", help="PickScore_v1 CLIPModel folder")
    g.add_argument("--pick-processor", help="its processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K)")
    g = p.add_argument_group("report")
    g.add_argument("--out", required=True, help="report folder (report.json, report.md, PNGs)")
    g.add_argument("--cache", help="image/feature cache folder (default: OUT/cache)")
    g.add_argument("--grid-images", type=int, default=8, help="images per row in the style grids")
    g.add_argument("--interpolate", nargs=2, metavar=("STYLE_A", "STYLE_B"),
                   help="also draw a strip at weights 0.0..1.0 between two styles (Figure 10)")
    g.add_argument("--interp-prompts", type=int, default=2, help="rows (prompts) in the interpolation strip")
    g.add_argument("--interp-samples", type=int, default=8,
                   help="images per weight for the mixing-smoothness curves under the strip (toy classifier "
                   "probability of STYLE_B, CLIP position between the ends; at most --num-samples; default 8)")
    g.add_argument("--mix", nargs="+", metavar="STYLE", help="also score an equal-weight mixture of these styles")
    g.add_argument("--toyworld", help="toy world folder for the toy defaults (default: the recipe's "
                   "data.toyworld.world, else assets/toyworld)")
    g.add_argument("--no-progress", action="store_true")
    return p


# the built-in metrics' own flags, as their options
METRIC_FLAGS = {
    "clip_score": {"model": "clip_model", "processor": "clip_processor", "preprocess": "clip_preprocess"},
    "aesthetic": {"weights": "aesthetic_weights", "clip": "aesthetic_clip"},
    "pick_score": {"model": "pick_model", "processor": "pick_processor"},
}


def _metric_options(args, selected: list[str] | None) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for name, flags in METRIC_FLAGS.items():
        given = {key: getattr(args, attr) for key, attr in flags.items() if getattr(args, attr) is not None}
        if given and (selected is None or name in selected):
            options[name] = given
    for name, key, value in args.metric_option:
        options.setdefault(name, {})[key] = value
    return options


def config_from_args(args) -> SuiteConfig:
    teachers = dict(teachers_from_recipe(args.teachers_from_recipe)) if args.teachers_from_recipe else {}
    teachers.update(dict(args.teacher))
    return SuiteConfig(
        merged=args.merged, teachers=teachers, out=args.out, cache=args.cache, prompts=args.prompts,
        num_samples=args.num_samples, seed=args.seed, ref_seed=args.ref_seed, reference=not args.no_reference,
        sampling_overrides={k: v for k, v in dict(
            steps=args.steps, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
            scheduler=args.scheduler, height=args.height, width=args.width, batch_size=args.batch_size,
            device=args.device).items() if v is not None},
        features=FeatureConfig(name=args.features, weights=args.inception_weights, resize=args.resize,
                               options={k: yaml.safe_load(v) for k, v in args.feature_option}),
        metrics=args.metric, metric_options=_metric_options(args, args.metric), plugins=list(args.plugin),
        toyworld=args.toyworld or (args.teachers_from_recipe and recipe_toyworld(args.teachers_from_recipe))
        or str(REPO_ROOT / "assets" / "toyworld"), grid_images=args.grid_images,
        interpolate=tuple(args.interpolate) if args.interpolate else None, interp_prompts=args.interp_prompts,
        interp_samples=args.interp_samples,
        mix=args.mix, baselines=dict(args.baseline), progress=not args.no_progress,
    )


def main(argv=None) -> int:
    from eval.run import run_suite

    args = build_parser().parse_args(argv)
    try:
        report = run_suite(config_from_args(args))
    except (ValueError, FileNotFoundError, ModelFolderError, KeyError, FloatingPointError, ConfigError) as exc:
        print(f"eval.suite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval.suite: interrupted; finished images and features are cached: rerun the same command "
              "to continue where it stopped", file=sys.stderr)
        return 130
    fid = report["fid"]
    ref = "" if fid["FIDt_ref"] is None else f", teacher reference FIDt {fid['FIDt_ref']:.2f}"
    print(f"FIDt {fid['FIDt']:.2f}{ref}; report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    import torch

    torch.set_grad_enabled(False)
    raise SystemExit(main())
