"""Evaluate a DMM merged model against its teachers: generate, score, report (one command).

For every style i the merged model (style i) and every teacher j are sampled with the same
prompts and seeds; each teacher is sampled a second time with other seeds (the reference batch).
  M(i, j)     = FID(merged with style i,  teacher j reference batch)
  M_ref(i, j) = FID(teacher i,             teacher j reference batch)
  FIDt = trace(M), the teacher reference FIDt = trace(M_ref) (the paper's Eq. 14-15, Fig. 4).
Both matrices share their columns, so they differ only in the rows' model. CLIP score, LAION
aesthetic v2 and PickScore are computed per set (Table 3) when their local weights are given,
and skipped with the reason in the report otherwise. Images and features are cached on disk;
rerunning after an interruption only generates what is missing.

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
import datetime as _dt
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.features import RESIZE_MODES, FeatureConfig, ToyWorldFeatures, build_feature_extractor
from eval.fid import FeatureStats, fid_matrix, fid_trace
from eval.generate import (
    NEGATIVE_PROMPT,
    GenerationCache,
    ImageSet,
    ModelFolderError,
    SamplingConfig,
    atomic_write_text,
    check_merged_folder,
    check_pipeline_folder,
    load_prompts,
)
from eval.report import image_grid, package_versions, plot_fid_heatmaps, safe_name, write_json, write_markdown
from eval.scores import (
    AESTHETIC_WEIGHTS_NAME,
    BackendUnavailable,
    aesthetic_score,
    build_embedder,
    clip_score,
    load_aesthetic_mlp,
    pick_score,
    summary,
)

__all__ = ["SuiteConfig", "main", "run_suite", "teachers_from_recipe"]

INTERP_WEIGHTS = [round(0.1 * k, 1) for k in range(11)]


@dataclass
class SuiteConfig:
    merged: str
    teachers: dict[str, str]  # name -> pipeline folder; paired with the merged model's styles by name
    out: str
    cache: str | None = None  # default: <out>/cache
    prompts: str | None = None  # a text file, one caption per line; None: the toy world's prompts
    num_samples: int = 64  # per set (FID is biased at small n: compare only at equal n)
    seed: int = 0  # merged and teacher batches: seeds seed .. seed+n-1
    ref_seed: int = 1_000_000  # teacher reference batch: ref_seed .. ref_seed+n-1
    reference: bool = True  # sample the reference batch and compute M_ref
    # None: the paper's settings, or in toy mode (toy prompts) the toy world's steps and CFG with no
    # negative prompt (its words are outside the toy vocabulary); overrides apply on top of either
    sampling: SamplingConfig | None = None
    sampling_overrides: dict = field(default_factory=dict)
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(name="auto"))
    clip_model: str | None = None  # HF CLIPModel folder or open_clip:NAME:FILE; None: the toy CLIP if any
    clip_processor: str | None = None  # None: the model folder (toy: the world's tokenizer)
    clip_preprocess: str | None = None  # processor | minus1to1; None: minus1to1 for the toy CLIP
    aesthetic_weights: str | None = None
    aesthetic_clip: str | None = None  # CLIP ViT-L/14 (HF folder or open_clip:ViT-L-14:FILE)
    pick_model: str | None = None
    pick_processor: str | None = None
    toyworld: str = "assets/toyworld"
    grid_images: int = 8
    interpolate: tuple[str, str] | None = None
    interp_prompts: int = 2
    mix: list[str] | None = None  # Table 3: equal-weight mixture of these styles, scored
    baselines: dict[str, str] = field(default_factory=dict)  # e.g. a weight-merged model, scored
    progress: bool = True


REPO_ROOT = Path(__file__).resolve().parents[1]


def _read_recipe(path) -> dict:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read recipe {p}: {type(exc).__name__}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _recipe_path(p: Path, value: str) -> str:
    """A relative recipe path as it resolves: from the current folder, the recipe's, or the repo root."""
    tp = Path(value)
    if tp.is_absolute() or tp.exists():
        return str(tp)
    for root in (p.parent, REPO_ROOT):
        if (root / tp).exists():
            return str(root / tp)
    return str(tp)


def recipe_toyworld(path) -> str | None:
    """The toy world a recipe trains on (``data.toyworld.world``), if any."""
    data = _read_recipe(path).get("data") or {}
    toy = data.get("toyworld") if isinstance(data, dict) else None
    world = toy.get("world") if isinstance(toy, dict) else None
    return _recipe_path(Path(path), str(world)) if world else None


def teachers_from_recipe(path) -> dict[str, str]:
    """``teachers:`` list of ``{name, path}`` from a recipe YAML; relative paths are tried from the
    current folder, then the recipe's folder, then the repository root."""
    p = Path(path)
    data = _read_recipe(p)
    items = data.get("teachers")
    if not isinstance(items, list) or not items:
        raise ValueError(f"recipe {p} has no 'teachers:' list of {{name: ..., path: ...}}")
    out = {}
    for t in items:
        if not isinstance(t, dict) or "name" not in t or "path" not in t:
            raise ValueError(f"recipe {p}: each teacher needs 'name' and 'path', got {t!r}")
        out[str(t["name"])] = _recipe_path(p, str(t["path"]))
    return out


def _load_world(path):
    try:
        from dmm.toyworld import load_world
    except ImportError as exc:
        return None, f"dmm.toyworld is not importable ({exc})"
    try:
        return load_world(path), None
    except Exception as exc:  # a half-built world folder
        return None, f"cannot load the toy world at {path}: {type(exc).__name__}: {exc}"


def _pair_styles(style_names: list[str], teachers: dict[str, str]) -> tuple[list[str], list[str], str]:
    """Teachers ordered like the styles: by name when they match, else by position (recorded)."""
    names = list(teachers)
    if sorted(names) == sorted(style_names):
        return list(style_names), list(style_names), "by name"
    if len(names) == len(style_names):
        return list(style_names), names, "by position (teacher names differ from style names)"
    raise ValueError(f"the merged model has {len(style_names)} styles {style_names} but {len(names)} teachers "
                     f"were given {names}: give one teacher per style (names matching the styles)")


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bars = {}

    def __call__(self, label: str, done: int, total: int):
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(label)
        if bar is None:
            bar = self._bars[label] = tqdm(total=total, desc=f"generate {label}", unit="img", leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()


def run_suite(cfg: SuiteConfig) -> dict:
    """Generate, score and write the report folder; returns the report dict (also report.json)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    style_names = check_merged_folder(cfg.merged)
    if not cfg.teachers:
        raise ValueError("no teachers given: use --teacher NAME=PATH (repeatable) or --teachers-from-recipe")
    for name, path in cfg.teachers.items():
        check_pipeline_folder(path, f"teacher {name!r}")
    for name, path in cfg.baselines.items():
        check_pipeline_folder(path, f"baseline {name!r}")
    styles, teacher_order, pairing = _pair_styles(style_names, cfg.teachers)
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs 2 samples), got {cfg.num_samples}")
    _preflight(cfg, style_names)  # fail before hours of sampling, not after

    world, world_reason = None, None
    needs_world = cfg.prompts is None or cfg.features.name in ("auto", "toyworld") or cfg.clip_model is None
    if needs_world:
        world, world_reason = _load_world(cfg.toyworld)

    # prompts
    if cfg.prompts is not None:
        pool = load_prompts(cfg.prompts)
        prompt_source = str(cfg.prompts)
    elif world is not None:
        pool = list(world.prompts(cfg.num_samples, cfg.seed))
        prompt_source = f"toy world {cfg.toyworld} prompts(n={cfg.num_samples}, seed={cfg.seed})"
    else:
        raise ValueError(f"no prompts: pass --prompts FILE (one caption per line); the toy default failed: {world_reason}")
    toy_mode = cfg.prompts is None
    sampling, sampling_source = _resolve_sampling(cfg, world if toy_mode else None)
    prompts = [pool[k % len(pool)] for k in range(cfg.num_samples)]
    seeds = [cfg.seed + k for k in range(cfg.num_samples)]
    ref_seeds = [cfg.ref_seed + k for k in range(cfg.num_samples)]

    # feature extractor
    fcfg = FeatureConfig(**asdict(cfg.features))
    if fcfg.name == "auto":
        if fcfg.weights:
            fcfg.name = "inception"
        elif world is not None:
            fcfg.name = "toyworld"
        else:
            raise ValueError("no FID feature network: pass --inception-weights FILE "
                             f"(pt_inception-2015-12-05-6726825d.pth) or --features NAME ({world_reason})")
    fcfg.toyworld = cfg.toyworld
    fcfg.device = sampling.device
    extractor = (ToyWorldFeatures(world, cfg.toyworld, fcfg.device) if fcfg.name == "toyworld" and world is not None
                 else build_feature_extractor(fcfg))

    # image sets
    cache = GenerationCache(cfg.cache or out / "cache", sampling, progress=_Progress(cfg.progress))
    merged_sets = [ImageSet(f"merged/{s}", cfg.merged, "merged", s, prompts, seeds) for s in styles]
    teacher_sets = [ImageSet(f"teacher/{t}", cfg.teachers[t], "teacher", None, prompts, seeds) for t in teacher_order]
    ref_sets = [ImageSet(f"teacher-ref/{t}", cfg.teachers[t], "teacher", None, prompts, ref_seeds)
                for t in teacher_order] if cfg.reference else []
    extra_sets = []
    if cfg.mix:
        weights = {s: 1.0 / len(cfg.mix) for s in cfg.mix}
        extra_sets.append(ImageSet(f"merged/mix({'+'.join(cfg.mix)})", cfg.merged, "merged", weights, prompts, seeds))
    extra_sets += [ImageSet(f"baseline/{n}", p, "teacher", None, prompts, seeds) for n, p in cfg.baselines.items()]

    all_sets = merged_sets + teacher_sets + ref_sets + extra_sets
    paths: dict[str, list[Path]] = {}
    for s in tqdm(all_sets, desc="image sets", disable=not cfg.progress):
        paths[s.label] = cache.ensure(s)

    # features and FID
    feats = {}
    for s in tqdm(merged_sets + teacher_sets + ref_sets, desc="features", disable=not cfg.progress):
        feats[s.label] = cache.features(s, paths[s.label], extractor, fcfg.batch_size)
    cols = ref_sets if cfg.reference else teacher_sets
    col_stats = [FeatureStats.from_features(feats[s.label], name=s.label) for s in cols]
    m = fid_matrix([FeatureStats.from_features(feats[s.label], name=s.label) for s in merged_sets], col_stats)
    m_ref = (fid_matrix([FeatureStats.from_features(feats[s.label], name=s.label) for s in teacher_sets], col_stats)
             if cfg.reference else None)
    fid = {
        "rows": styles, "cols": teacher_order, "pairing": pairing,
        "M": m.tolist(), "FIDt": fid_trace(m), "diagonal": dict(zip(styles, np.diag(m).tolist())),
        "M_ref": None if m_ref is None else m_ref.tolist(),
        "FIDt_ref": None if m_ref is None else fid_trace(m_ref),
        "columns_are": "teacher reference batch (ref seeds)" if cfg.reference else "teacher batch (same seeds as rows)",
        "method": "float64 statistics; tr sqrt(S_i S_j) = nuclear norm of F_i^T F_j (S = F F^T), exact eigvalsh",
    }

    # scores
    score_sets = merged_sets + teacher_sets + extra_sets
    per_image: dict = {}
    scores = _scores(cfg, world, world_reason, score_sets, paths, cache, sampling.device, per_image)
    lines = [json.dumps({"set": s.label, "image": paths[s.label][k].name, "prompt": s.prompts[k],
                         "seed": s.seeds[k], **per_image.get((s.label, k), {})})
             for s in score_sets for k in range(len(s.prompts))]
    atomic_write_text(out / "scores_per_image.jsonl", "\n".join(lines) + "\n")

    # toy: does the classifier see the requested style?
    style_acc = _style_accuracy(world, extractor, merged_sets + teacher_sets, styles + teacher_order, paths, cache)

    # images
    files = {"report_json": "report.json", "report_md": "report.md", "heatmaps": "fid_heatmaps.png",
             "scores_per_image": "scores_per_image.jsonl", "grids": {}}
    plot_fid_heatmaps(m, m_ref, styles, teacher_order, out / "fid_heatmaps.png")
    k = max(1, min(cfg.grid_images, cfg.num_samples))
    for s, ms, ts in zip(styles, merged_sets, teacher_sets):
        name = f"grid_{safe_name(s)}.png"
        image_grid([paths[ms.label][:k], paths[ts.label][:k]], [f"merged [{s}]", f"teacher {ts.label.split('/', 1)[1]}"],
                   out / name, title=f"style {s}: merged (top) vs teacher (bottom), same prompts and seeds")
        files["grids"][s] = name
    if cfg.interpolate:
        files["interpolation"] = _interpolation(cfg, style_names, prompts, seeds, cache, out)

    first = paths[merged_sets[0].label][0]
    from PIL import Image

    with Image.open(first) as im:
        resolution = list(im.size)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merged": str(cfg.merged),
        "teachers": {t: cfg.teachers[t] for t in teacher_order},
        "baselines": dict(cfg.baselines),
        "styles": styles,
        "resolution": resolution,
        "image_encoding": "8-bit RGB PNG (features and scores are computed from the saved PNGs)",
        "settings": {
            "num_samples": cfg.num_samples,
            "seeds": {"merged_and_teacher": [cfg.seed, cfg.seed + cfg.num_samples - 1],
                      "teacher_reference": [cfg.ref_seed, cfg.ref_seed + cfg.num_samples - 1] if cfg.reference else None},
            "prompts": {"source": prompt_source, "count": len(set(prompts)),
                        "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()},
            "sampling": asdict(sampling),
            "sampling_source": sampling_source,
        },
        "features": {**extractor.describe(), "samples_per_set": cfg.num_samples},
        "fid": fid,
        "scores": scores,
        "style_accuracy": style_acc,
        "sample_counts": {label: len(p) for label, p in paths.items()},
        "generated_this_run": cache.generated,
        "cache": str(cache.root),
        "files": files,
        "versions": package_versions(),
    }
    write_json(out / "report.json", report)
    write_markdown(out / "report.md", report)
    return report


def _preflight(cfg: SuiteConfig, style_names: list[str]) -> None:
    """Check every option that would otherwise fail only after generation."""
    from eval.scores import _require_dir

    if cfg.mix is not None and (len(cfg.mix) < 2 or any(s not in style_names for s in cfg.mix)):
        raise ValueError(f"--mix needs at least two styles of {style_names}, got {cfg.mix}")
    if cfg.interpolate:
        for s in cfg.interpolate:
            if s not in style_names:
                raise ValueError(f"--interpolate: unknown style {s!r}; the merged model has {style_names}")
    if cfg.aesthetic_weights:
        load_aesthetic_mlp(cfg.aesthetic_weights)
    for spec, setting in ((cfg.clip_model, "--clip-model"), (cfg.aesthetic_clip, "--aesthetic-clip"),
                          (cfg.pick_model, "--pick-model")):
        if spec and not spec.startswith("open_clip:"):
            _require_dir(spec, "CLIP model", setting)
    for folder, setting in ((cfg.clip_processor, "--clip-processor"), (cfg.pick_processor, "--pick-processor")):
        if folder and not Path(folder).is_dir():
            raise FileNotFoundError(f"processor folder not found: {folder} (set by {setting})")


def _resolve_sampling(cfg: SuiteConfig, toy_world) -> tuple[SamplingConfig, str]:
    if cfg.sampling is not None:
        base, source = cfg.sampling, "given"
    elif toy_world is not None:
        toy = dict(getattr(toy_world, "sampling", {}) or {})
        base = SamplingConfig(steps=int(toy.get("num_inference_steps", 25)),
                              guidance_scale=float(toy.get("guidance_scale", 7.0)), negative_prompt="")
        source = "toy world defaults (world.json sampling, no negative prompt)"
    else:
        base, source = SamplingConfig(), "paper defaults (DPM-Solver++, 25 steps, CFG 7, its negative prompt)"
    if cfg.sampling_overrides:
        base = SamplingConfig(**{**asdict(base), **cfg.sampling_overrides})
        source += f"; overridden: {', '.join(sorted(cfg.sampling_overrides))}"
    return base, source


def _scores(cfg, world, world_reason, sets, paths, cache, device, per_image: dict | None = None) -> dict:
    """Score every set; ``per_image`` (if given) collects {(label, index): {score: value}}."""
    out = {}
    toy_clip = cfg.clip_model is None and world is not None
    clip_spec = cfg.clip_model or (str(world.clip_path) if world is not None else None)
    clip_processor = cfg.clip_processor or (str(world.tokenizer_path) if toy_clip else None)
    clip_preprocess = cfg.clip_preprocess or ("minus1to1" if toy_clip else "processor")
    embedders = {}

    def embedder(spec, processor, setting, preprocess="processor"):
        key = (spec, processor, preprocess)
        if key not in embedders:
            embedders[key] = build_embedder(spec, processor, device=device, setting=setting, preprocess=preprocess)
        return embedders[key]

    def run(name, fn):
        try:
            per = {}
            emb = None
            for s in sets:
                res, emb = fn(s)
                per[s.label] = {**summary(res.per_image), "mean": res.mean}
                if per_image is not None:
                    for k, v in enumerate(res.per_image):
                        per_image.setdefault((s.label, k), {})[name] = v
            out[name] = {"backbone": emb, "per_set": per}
        except BackendUnavailable as exc:  # optional backend; a missing weight file is an error
            out[name] = {"skipped": str(exc)}

    if clip_spec is None:
        out["clip_score"] = {"skipped": f"no CLIP model: pass --clip-model (toy default unavailable: {world_reason})"}
    else:
        def f(s):
            e = embedder(clip_spec, clip_processor, "--clip-model", clip_preprocess)
            return clip_score(e, cache.load_images(paths[s.label]), s.prompts), e.backbone
        run("clip_score", f)
    if not cfg.aesthetic_weights:
        out["aesthetic"] = {"skipped": f"no --aesthetic-weights ({AESTHETIC_WEIGHTS_NAME}) given"}
    elif not cfg.aesthetic_clip:
        out["aesthetic"] = {"skipped": "no --aesthetic-clip (CLIP ViT-L/14 folder) given"}
    else:
        mlp = load_aesthetic_mlp(cfg.aesthetic_weights)

        def f(s):
            e = embedder(cfg.aesthetic_clip, None, "--aesthetic-clip")
            return aesthetic_score(e, mlp, cache.load_images(paths[s.label])), e.backbone
        run("aesthetic", f)
    if not cfg.pick_model:
        out["pick_score"] = {"skipped": "no --pick-model (PickScore_v1 folder) given"}
    else:
        def f(s):
            e = embedder(cfg.pick_model, cfg.pick_processor, "--pick-model")
            return pick_score(e, cache.load_images(paths[s.label]), s.prompts), e.backbone
        run("pick_score", f)
    return out


def _style_accuracy(world, extractor, sets, styles, paths, cache) -> dict:
    if world is None or not isinstance(extractor, ToyWorldFeatures) or not hasattr(world.classifier, "predict"):
        return {}
    clf = world.classifier
    heads = getattr(getattr(clf, "config", None), "heads", None)  # the classifier's own class order
    names = list(heads["style"]) if isinstance(heads, dict) and "style" in heads else list(world.style_names)
    out = {}
    for s, style in zip(sets, styles):
        if style not in names:
            continue
        pred = world.classifier.predict(cache.load_images(paths[s.label]))
        if "style" in pred:
            out[s.label] = float((pred["style"] == names.index(style)).float().mean())
    return out


def _interpolation(cfg, style_names, prompts, seeds, cache, out: Path) -> str:
    a, b = cfg.interpolate
    k = max(1, min(cfg.interp_prompts, len(prompts)))
    columns = []
    for w in INTERP_WEIGHTS:
        s = ImageSet(f"interp/{a}-{b}/{w}", cfg.merged, "merged", {a: round(1 - w, 1), b: w}, prompts[:k], seeds[:k])
        columns.append(cache.ensure(s))
    rows = [[col[r] for col in columns] for r in range(k)]
    name = f"interpolation_{safe_name(a)}_{safe_name(b)}.png"
    image_grid(rows, [f"prompt {r}" for r in range(k)], out / name, col_labels=[f"{b}={w}" for w in INTERP_WEIGHTS],
               title=f"interpolation {a} -> {b}: weight of {b} (weight of {a} = 1 - w)")
    return name


# --------------------------------------------------------------------------- CLI
def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--inception-weights", metavar="FILE", help="local pt_inception-2015-12-05-6726825d.pth")
    g.add_argument("--resize", choices=RESIZE_MODES, default="bilinear",
                   help="resize filter to the Inception input (recorded in the report; default bilinear)")
    g = p.add_argument_group("scores (skipped with a reason when not given)")
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
    g.add_argument("--mix", nargs="+", metavar="STYLE", help="also score an equal-weight mixture of these styles")
    g.add_argument("--toyworld", help="toy world folder for the toy defaults (default: the recipe's "
                   "data.toyworld.world, else assets/toyworld)")
    g.add_argument("--no-progress", action="store_true")
    return p


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
        features=FeatureConfig(name=args.features, weights=args.inception_weights, resize=args.resize),
        clip_model=args.clip_model, clip_processor=args.clip_processor, clip_preprocess=args.clip_preprocess,
        aesthetic_weights=args.aesthetic_weights,
        aesthetic_clip=args.aesthetic_clip, pick_model=args.pick_model, pick_processor=args.pick_processor,
        toyworld=args.toyworld or (args.teachers_from_recipe and recipe_toyworld(args.teachers_from_recipe))
        or str(REPO_ROOT / "assets" / "toyworld"), grid_images=args.grid_images,
        interpolate=tuple(args.interpolate) if args.interpolate else None, interp_prompts=args.interp_prompts,
        mix=args.mix, baselines=dict(args.baseline), progress=not args.no_progress,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_suite(config_from_args(args))
    except (ValueError, FileNotFoundError, ModelFolderError, KeyError, FloatingPointError) as exc:
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
    torch.set_grad_enabled(False)
    raise SystemExit(main())
