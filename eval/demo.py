"""The toy demo's summary: how well each merged style matches its own teacher.

Per style i: toy-FID(merged_i, teacher_j) for every teacher j (own teacher should be the
closest) and style accuracy (share of samples the toy classifier puts in style i), merged vs
teacher. Then the paper's headline in the eval suite's terms: FIDt (trace of FID(merged_i,
teacher-ref_i)) against the teachers' own reference (trace of FID(teacher_i, teacher-ref_i)),
teacher-ref being each teacher on other seeds; their ratio is what issue 13's 1.10x target is
about. Teacher samples are cached (keyed by the teacher folder's contents and the sampling
settings), so a second demo only samples the new merged model.
"""

from __future__ import annotations

import time
from pathlib import Path

from dmm.recipes import Recipe
from dmm.sampling import consecutive_seeds
from dmm.teachers.lora import teacher_folder
from eval.features import ToyWorldFeatures
from eval.fid import fid_matrix, fid_trace
from eval.generate import GenerationCache, SamplingConfig, generate_sets
from eval.metrics import style_accuracy
from eval.plan import REF_SEED, paired_sets
from eval.report import image_grid, write_json

FIDT_TARGET = 1.10  # issue 13: the paper's merged model is at 1.035x its teachers' reference
TARGET_HINT = ("not reached; the closest measured recipe is recipes/toy_sdxl_4_long.yaml (4x the steps, 1.54x), "
               "and 8x the steps did no better: BENCHMARKS.md, 'Starting from the teachers' average'")


def summarise(recipe: Recipe, merged: str | Path, cache_root: str | Path = ".cache/samples",
              out: str | Path | None = None) -> dict:
    """Sample, score and print the demo table (`format_summary`); also writes summary.json and grids."""
    from dmm.toyworld import load_world

    if recipe.data.toyworld is None:
        raise ValueError("the demo summary needs a toy-world recipe (data.toyworld); use `python -m eval.suite` "
                         "for real models")
    started = time.time()
    world = load_world(recipe.data.toyworld.world)
    names = recipe.style_names
    s = recipe.sample
    prompts = world.prompts(s.n_per_style, seed=s.seed)
    seeds = consecutive_seeds(s.seed, len(prompts))
    sampling = SamplingConfig(steps=s.steps, guidance_scale=s.guidance_scale, negative_prompt="",
                              scheduler="pipeline", batch_size=64)
    cache = GenerationCache(cache_root, sampling)
    out = Path(out or Path(recipe.train.output_dir) / "summary")
    out.mkdir(parents=True, exist_ok=True)

    # a LoRA teacher is sampled from its fused pipeline folder, written once under the cache
    teachers = {name: str(teacher_folder(recipe.teachers[i], recipe.model.base, Path(cache_root) / "teachers"))
                for i, name in enumerate(names)}
    merged_sets, teacher_sets = paired_sets(str(merged), teachers, names, list(prompts), seeds)
    ref_seeds = consecutive_seeds(REF_SEED + s.seed, len(prompts))
    ref_sets = paired_sets(str(merged), teachers, [], list(prompts), ref_seeds, "teacher-ref")[1]
    paths = generate_sets(cache, merged_sets + teacher_sets + ref_sets, desc="sampling merged + teachers")
    extractor = ToyWorldFeatures(world, str(recipe.data.toyworld.world))
    feats = {x.label: cache.features(x, paths[x.label], extractor) for x in merged_sets + teacher_sets + ref_sets}
    m = fid_matrix([feats[x.label] for x in merged_sets], [feats[x.label] for x in teacher_sets])
    refs = [feats[x.label] for x in ref_sets]
    fidt = fid_trace(fid_matrix([feats[x.label] for x in merged_sets], refs))
    fidt_ref = fid_trace(fid_matrix([feats[x.label] for x in teacher_sets], refs))
    acc = style_accuracy(world, merged_sets + teacher_sets, names + names, paths, cache.load_images)

    rows = []
    for i, name in enumerate(names):
        others = [(m[i, j], names[j]) for j in range(len(names)) if j != i]
        nearest_other = min(others) if others else (float("nan"), "-")
        acc_m, acc_t = acc[f"merged/{name}"], acc[f"teacher/{name}"]
        rows.append({
            "style": name,
            "fid_own_teacher": float(m[i, i]),
            "fid_nearest_other_teacher": float(nearest_other[0]),
            "nearest_other_teacher": nearest_other[1],
            "closest_to_own_teacher": bool(m[i, i] < nearest_other[0]),
            "style_acc_merged": acc_m,
            "style_acc_teacher": acc_t,
            "style_acc_ratio": acc_m / acc_t if acc_t > 0 else float("nan"),
        })
    n_grid = min(s.grid_prompts, len(prompts))
    images = {x.label: paths[x.label] for x in merged_sets + teacher_sets}
    grids = {}
    for name in names:
        grids[name] = str(image_grid([images[f"merged/{name}"][:n_grid], images[f"teacher/{name}"][:n_grid]],
                                     [f"merged/{name}", f"teacher/{name}"], out / f"grid_{name}.png",
                                     title=f"style {name}: merged (top) vs teacher (bottom)"))
    overview = [images[f"teacher/{n}"][:n_grid] for n in names] + [images[f"merged/{n}"][:n_grid] for n in names]
    labels = [f"teacher/{n}" for n in names] + [f"merged/{n}" for n in names]
    grids["overview"] = str(image_grid(overview, labels, out / "grid_overview.png",
                                       col_labels=[p[:14] for p in prompts[:n_grid]]))
    summary = {"merged_model": str(merged), "samples_per_style": len(prompts), "fid_matrix": m.tolist(),
               "styles": rows, "grids": grids, "seconds": time.time() - started,
               "FIDt": fidt, "FIDt_ref": fidt_ref, "FIDt_ratio": fidt / fidt_ref if fidt_ref > 0 else float("nan"),
               "sampling": sampling.key(), "feature_net": "toy world classifier (penultimate layer)"}
    write_json(out / "summary.json", summary)
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        "",
        f"DMM toy demo: merged model vs its teachers ({summary['samples_per_style']} samples per style, "
        "toy-FID on the toy classifier's features)",
        f"{'style':10s} {'FID own':>8s} {'FID other':>10s} {'(nearest)':>10s} {'acc merged':>11s} "
        f"{'acc teacher':>12s} {'ratio':>6s}  verdict",
    ]
    for r in summary["styles"]:
        ok = r["closest_to_own_teacher"] and r["style_acc_ratio"] >= 0.9
        lines.append(
            f"{r['style']:10s} {r['fid_own_teacher']:8.2f} {r['fid_nearest_other_teacher']:10.2f} "
            f"{r['nearest_other_teacher']:>10s} {r['style_acc_merged']:11.1%} {r['style_acc_teacher']:12.1%} "
            f"{r['style_acc_ratio']:6.2f}  {'ok' if ok else 'SHORT'}"
        )
    ratio = summary["FIDt_ratio"]
    lines.append(f"FIDt {summary['FIDt']:.2f} against the teachers' own reference {summary['FIDt_ref']:.2f} "
                 f"(each teacher on other seeds): ratio {ratio:.2f}; target <= {FIDT_TARGET:.2f}"
                 + ("" if ratio <= FIDT_TARGET else f" ({TARGET_HINT})"))
    lines.append(f"merged model: {summary['merged_model']}")
    for name, path in summary["grids"].items():
        lines.append(f"grid {name}: {path}")
    return "\n".join(lines)


__all__ = ["format_summary", "summarise"]
