"""Evaluate a DMM merged model against its teachers: plan -> generate -> FID and metrics -> report.

For every style i the merged model (style i) and every teacher j are sampled with the same
prompts and seeds; each teacher is sampled a second time with other seeds (the reference batch).
  M(i, j)     = FID(merged with style i,  teacher j reference batch)
  M_ref(i, j) = FID(teacher i,             teacher j reference batch)
  FIDt = trace(M), the teacher reference FIDt = trace(M_ref) (the paper's Eq. 14-15, Fig. 4).
Each step lives in its own module: `eval.plan` (settings, checks, image sets), `eval.generate`
(cached sampling), `eval.fid` and `eval.metrics` (registered metrics), `eval.report`; this
module runs them in order. The command line is `eval.cli` (`python -m eval.suite` runs it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dmm.registry import load_plugin
from eval.features import ToyWorldFeatures, build_feature_extractor
from eval.fid import FeatureStats, fid_matrix, fid_trace
from eval.generate import GenerationCache, ImageSet, ProgressBars, atomic_write_text, generate_sets, merged_sampling
from eval.metrics import MetricContext, prepare_metrics, score_sets, style_accuracy
from eval.plan import Plan, SuiteConfig, make_plan, recipe_toyworld, teachers_from_recipe
from eval.report import (
    image_grid,
    package_versions,
    plot_fid_heatmaps,
    plot_mixing_curves,
    safe_name,
    write_json,
    write_markdown,
)
from eval.scores import BackendUnavailable
from eval.smoothness import classifier_style_names, mixing_smoothness

__all__ = ["SuiteConfig", "recipe_toyworld", "run_suite", "teachers_from_recipe"]

INTERP_WEIGHTS = [round(0.1 * k, 1) for k in range(11)]


def build_extractor(plan: Plan):
    """The FID feature extractor of the plan (the already loaded toy world when it is the toy's)."""
    if plan.features.name == "toyworld" and plan.world is not None:
        return ToyWorldFeatures(plan.world, plan.cfg.toyworld, plan.features.device)
    return build_feature_extractor(plan.features)


def fid_section(plan: Plan, cache: GenerationCache, paths: dict, extractor) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """The FID matrices M (merged rows) and M_ref (teacher rows) against the same columns."""
    cfg = plan.cfg
    stats = {}
    for s in plan.merged_sets + plan.teacher_sets + plan.ref_sets:
        feats = cache.features(s, paths[s.label], extractor, plan.features.batch_size)
        stats[s.label] = FeatureStats.from_features(feats, name=s.label)
    cols = [stats[s.label] for s in (plan.ref_sets if cfg.reference else plan.teacher_sets)]
    m = fid_matrix([stats[s.label] for s in plan.merged_sets], cols)
    m_ref = fid_matrix([stats[s.label] for s in plan.teacher_sets], cols) if cfg.reference else None
    fid = {
        "rows": plan.styles, "cols": plan.teacher_order, "pairing": plan.pairing,
        "M": m.tolist(), "FIDt": fid_trace(m), "diagonal": dict(zip(plan.styles, np.diag(m).tolist())),
        "M_ref": None if m_ref is None else m_ref.tolist(),
        "FIDt_ref": None if m_ref is None else fid_trace(m_ref),
        "columns_are": "teacher reference batch (ref seeds)" if cfg.reference else "teacher batch (same seeds as rows)",
        "method": "float64 statistics; tr sqrt(S_i S_j) = nuclear norm of F_i^T F_j (S = F F^T), exact eigvalsh",
    }
    return fid, m, m_ref


def write_figures(plan: Plan, cache: GenerationCache, paths: dict, m, m_ref, out: Path) -> dict:
    """Heatmaps, one merged-vs-teacher grid per style and the optional interpolation strip."""
    cfg = plan.cfg
    files = {"report_json": "report.json", "report_md": "report.md", "heatmaps": "fid_heatmaps.png",
             "scores_per_image": "scores_per_image.jsonl", "grids": {}}
    plot_fid_heatmaps(m, m_ref, plan.styles, plan.teacher_order, out / "fid_heatmaps.png")
    k = max(1, min(cfg.grid_images, cfg.num_samples))
    for s, ms, ts in zip(plan.styles, plan.merged_sets, plan.teacher_sets):
        name = f"grid_{safe_name(s)}.png"
        image_grid([paths[ms.label][:k], paths[ts.label][:k]], [f"merged [{s}]", f"teacher {ts.label.split('/', 1)[1]}"],
                   out / name, title=f"style {s}: merged (top) vs teacher (bottom), same prompts and seeds")
        files["grids"][s] = name
    if cfg.interpolate:
        files["interpolation"] = _interpolation(plan, cache, out)
    return files


def interp_sets(plan: Plan) -> list[ImageSet]:
    """One set per weight of the strip: the same prompts and seeds at every weight; the strip shows the
    first --interp-prompts of them, the smoothness curves use the first --interp-samples."""
    cfg = plan.cfg
    a, b = cfg.interpolate
    n = max(1, min(max(cfg.interp_prompts, cfg.interp_samples), len(plan.prompts)))
    return [ImageSet(f"interp/{a}-{b}/{w}", cfg.merged, "merged", {a: round(1 - w, 1), b: w}, plan.prompts[:n],
                     plan.seeds[:n]) for w in INTERP_WEIGHTS]


def _interpolation(plan: Plan, cache: GenerationCache, out: Path) -> str:
    cfg = plan.cfg
    a, b = cfg.interpolate
    k = max(1, min(cfg.interp_prompts, len(plan.prompts)))
    columns = [cache.ensure(s) for s in interp_sets(plan)]
    rows = [[col[r] for col in columns] for r in range(k)]
    name = f"interpolation_{safe_name(a)}_{safe_name(b)}.png"
    image_grid(rows, [f"prompt {r}" for r in range(k)], out / name, col_labels=[f"{b}={w}" for w in INTERP_WEIGHTS],
               title=f"interpolation {a} -> {b}: weight of {b} (weight of {a} = 1 - w)")
    return name


def _clip_for_smoothness(plan: Plan, ctx: MetricContext):
    """(the CLIP score metric's backbone, None), or (None, why not): its options, else the toy world's CLIP."""
    opts = plan.cfg.metric_options.get("clip_score") or {}
    toy = opts.get("model") is None
    if toy and plan.world is None:
        return None, f"no CLIP: pass --clip-model (toy default unavailable: {plan.world_reason})"
    spec = opts.get("model") or str(plan.world.clip_path)
    processor = opts.get("processor") or (str(plan.world.tokenizer_path) if toy else None)
    try:
        return ctx.embedder(spec, processor, "--clip-model", opts.get("preprocess") or
                            ("minus1to1" if toy else "processor")), None
    except BackendUnavailable as exc:
        return None, str(exc)


def smoothness_section(plan: Plan, cache: GenerationCache, ctx: MetricContext, out: Path, strip: str) -> dict:
    """Mixing-smoothness curves of the strip's path (eval.smoothness) and their plot under the strip."""
    cfg = plan.cfg
    a, b = cfg.interpolate
    n = max(1, min(cfg.interp_samples, len(plan.prompts)))
    images = [cache.load_images(cache.ensure(s)[:n]) for s in interp_sets(plan)]
    skipped, classifier, names = {}, None, None
    if plan.world is not None and hasattr(plan.world.classifier, "predict"):
        classifier = plan.world.classifier
        names = classifier_style_names(plan.world)
    else:
        skipped["classifier"] = f"no toy classifier ({plan.world_reason or 'the toy world has none'})"
    embedder, why = _clip_for_smoothness(plan, ctx)
    if why:
        skipped["clip"] = why
    result = mixing_smoothness(INTERP_WEIGHTS, images, b, classifier, names, embedder, skipped)
    name = f"interpolation_{safe_name(a)}_{safe_name(b)}_smoothness.png"
    plot_mixing_curves(out / strip, result, out / name, title=f"{a} -> {b}: position along the path (0 = {a}, "
                       f"1 = {b}), {n} images per weight")
    return {"styles": [a, b], "images_per_weight": n, "plot": name, **result}


def run_suite(cfg: SuiteConfig) -> dict:
    """Plan, generate, score and write the report folder; returns the report dict (also report.json)."""
    for spec in cfg.plugins:
        load_plugin(spec)
    plan = make_plan(cfg)
    extractor = build_extractor(plan)
    ctx = MetricContext(plan.sampling.device, plan.world, plan.world_reason)
    metrics = prepare_metrics(cfg.metrics, cfg.metric_options, ctx)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = GenerationCache(cfg.cache or out / "cache", plan.sampling, progress=ProgressBars(cfg.progress))
    paths = generate_sets(cache, plan.all_sets, cfg.progress)

    fid, m, m_ref = fid_section(plan, cache, paths, extractor)
    per_image: dict = {}
    scores = score_sets(metrics, plan.scored_sets, paths, cache.load_images, per_image)
    lines = [json.dumps({"set": s.label, "image": paths[s.label][k].name, "prompt": s.prompts[k],
                         "seed": s.seeds[k], **per_image.get((s.label, k), {})})
             for s in plan.scored_sets for k in range(len(s.prompts))]
    atomic_write_text(out / "scores_per_image.jsonl", "\n".join(lines) + "\n")
    style_acc = (style_accuracy(plan.world, plan.merged_sets + plan.teacher_sets, plan.styles + plan.teacher_order,
                                paths, cache.load_images) if isinstance(extractor, ToyWorldFeatures) else {})
    files = write_figures(plan, cache, paths, m, m_ref, out)
    smoothness = smoothness_section(plan, cache, ctx, out, files["interpolation"]) if cfg.interpolate else None

    from PIL import Image

    with Image.open(paths[plan.merged_sets[0].label][0]) as im:
        resolution = list(im.size)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merged": str(cfg.merged),
        "teachers": {t: cfg.teachers[t] for t in plan.teacher_order},
        "baselines": dict(cfg.baselines),
        "styles": plan.styles,
        "resolution": resolution,
        "image_encoding": "8-bit RGB PNG (features and scores are computed from the saved PNGs)",
        "settings": {
            "num_samples": cfg.num_samples,
            "seeds": {"merged_and_teacher": [cfg.seed, cfg.seed + cfg.num_samples - 1],
                      "teacher_reference": [cfg.ref_seed, cfg.ref_seed + cfg.num_samples - 1] if cfg.reference else None},
            "prompts": {"source": plan.prompt_source, "count": len(set(plan.prompts)),
                        "sha256": hashlib.sha256("\n".join(plan.prompts).encode()).hexdigest()},
            "sampling": asdict(plan.sampling),
            "sampling_source": plan.sampling_source,
            "merged_sampling": merged_sampling(cfg.merged),  # a few-step export's own (None: the suite's)
            "metrics": [mt.name for mt in metrics],
            "plugins": list(cfg.plugins),
        },
        "features": {**extractor.describe(), "samples_per_set": cfg.num_samples},
        "fid": fid,
        "scores": scores,
        "style_accuracy": style_acc,
        "mixing_smoothness": smoothness,
        "sample_counts": {label: len(p) for label, p in paths.items()},
        "generated_this_run": cache.generated,
        "cache": str(cache.root),
        "files": files,
        "versions": package_versions(),
    }
    write_json(out / "report.json", report)
    write_markdown(out / "report.md", report)
    return report
