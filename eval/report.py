"""The report folder: report.json, report.md, FID heatmaps and image grids (PNG).

* ``fid_heatmaps.png``: M and M_ref side by side on one colour scale (the paper's Figure 4).
* ``grid_<style>.png``: merged row above teacher row, same prompts and seeds (Figure 5).
* ``interpolation.png``: rows of prompts, columns of weights 0.0..1.0 between two styles (Figure 10).
* ``interpolation_<a>_<b>_smoothness.png``: that strip over its mixing-smoothness curves (eval.smoothness).
"""

from __future__ import annotations

import io
import json
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.generate import atomic_write_bytes, atomic_write_text

__all__ = ["image_grid", "package_versions", "plot_fid_heatmaps", "plot_mixing_curves", "safe_name", "write_json",
           "write_markdown"]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "set"


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("dmm", "torch", "diffusers", "transformers", "torchmetrics", "numpy", "scipy", "pillow",
                "matplotlib", "open_clip_torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json(path, data: dict) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plot_fid_heatmaps(m: np.ndarray, m_ref: np.ndarray | None, row_labels: Sequence[str],
                      col_labels: Sequence[str], path, titles=("M: merged (style i) vs teacher j",
                                                               "M_ref: teacher i vs teacher j (other seeds)")):
    """Heatmaps of M and M_ref side by side on one colour scale, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [np.asarray(m, dtype=float)] + ([np.asarray(m_ref, dtype=float)] if m_ref is not None else [])
    vmin = min(float(x.min()) for x in mats)
    vmax = max(float(x.max()) for x in mats)
    n = len(row_labels)
    size = max(4.0, 0.55 * n + 2.5)
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats) + 1.2, size), squeeze=False,
                             layout="constrained")
    im = None
    for k, (ax, mat, title) in enumerate(zip(axes[0], mats, titles)):
        im = ax.imshow(mat, cmap="viridis_r", vmin=vmin, vmax=vmax)
        ax.set_title(f"{title}\ntrace (FIDt) = {np.trace(mat):.2f}", fontsize=9)
        ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=8)
        ax.set_xlabel("teacher j")
        if k == 0:
            ax.set_ylabel("style i")
        mid = (vmin + vmax) / 2
        if mat.size <= 256:
            for (i, j), v in np.ndenumerate(mat):
                ax.text(j, i, f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if v > mid else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="FID")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_mixing_curves(strip, smoothness: dict, path, title: str = ""):
    """The interpolation strip with its mixing-smoothness curves (eval.smoothness) plotted beneath it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    with Image.open(strip) as im:
        img = np.asarray(im.convert("RGB"))
    width = max(6.0, img.shape[1] / 110)
    strip_h = width * img.shape[0] / img.shape[1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, strip_h + 3.2), layout="constrained",
                                      gridspec_kw={"height_ratios": [strip_h, 3.0]})
    top.imshow(img)
    top.axis("off")
    for (name, c), marker in zip(smoothness["curves"].items(), "os^v"):
        share = c.get("max_jump_share")
        label = (f"{name}: largest step {c['max_jump']:.2f} at {c['max_jump_between'][0]}->"
                 f"{c['max_jump_between'][1]}" + (f" ({share:.2f} of its span)" if share is not None else "")
                 + f", |p - line| {c['line_l1']:.3f}, per image {c['per_image_max_jump']:.2f}")
        bottom.plot(c["weights"], c["curve"], marker=marker, label=label)
    if smoothness["curves"]:
        w = next(iter(smoothness["curves"].values()))["weights"]
        bottom.plot([w[0], w[-1]], [0, 1], color="grey", linestyle=":", label="straight line 0 -> 1")
        bottom.legend(fontsize=7, loc="upper left")
    else:
        bottom.text(0.5, 0.5, "no curve: " + "; ".join(smoothness.get("skipped", {}).values()), ha="center",
                    va="center", fontsize=8, wrap=True, transform=bottom.transAxes)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("mixing weight of the second style")
    bottom.set_ylabel("position (0: first style, 1: second)")
    bottom.set_title(title, fontsize=9)
    bottom.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def image_grid(rows: Sequence[Sequence], row_labels: Sequence[str], path, col_labels: Sequence[str] | None = None,
               cell: int | None = None, title: str | None = None):
    """A PNG grid: ``rows`` of image paths / PIL images / uint8 arrays, a label left of each row.

    Small images are enlarged (nearest neighbour, for display only) to at least 96 px cells.
    """
    from PIL import Image, ImageDraw, ImageFont

    def _open(x):
        if isinstance(x, Image.Image):
            return x.convert("RGB")
        if isinstance(x, np.ndarray):
            return Image.fromarray(x).convert("RGB")
        with Image.open(x) as im:
            return im.convert("RGB")

    imgs = [[_open(x) for x in row] for row in rows]
    if not imgs or not any(imgs):
        raise ValueError("image_grid: no images")
    w0, h0 = imgs[0][0].size
    if cell is None:
        cell = max(96, min(256, w0))
    scale = cell / max(w0, h0)
    cw, ch = int(round(w0 * scale)), int(round(h0 * scale))
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(t), font=font))
                      for t in row_labels)
    head_h = 18 if col_labels else 0
    title_h = 20 if title else 0
    ncols = max(len(r) for r in imgs)
    pad = 2
    canvas = Image.new("RGB", (label_w + ncols * (cw + pad) + pad, title_h + head_h + len(imgs) * (ch + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    if col_labels:
        for j, t in enumerate(col_labels):
            draw.text((label_w + j * (cw + pad) + pad + 2, title_h + 3), str(t), fill="black", font=font)
    resample = Image.NEAREST if scale >= 2 else Image.BICUBIC
    for i, (row, lab) in enumerate(zip(imgs, row_labels)):
        y = title_h + head_h + i * (ch + pad) + pad
        draw.text((4, y + ch // 2 - 6), str(lab), fill="black", font=font)
        for j, im in enumerate(row):
            canvas.paste(im.resize((cw, ch), resample), (label_w + j * (cw + pad) + pad, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v))


def _matrix_md(mat, rows, cols) -> list[str]:
    lines = ["| style \\ teacher | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in zip(rows, mat):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return lines


def _smoothness_md(sm: dict) -> list[str]:
    a, b = sm["styles"]
    lines = ["", f"## Mixing smoothness {a} -> {b}", "",
             (f"{sm['images_per_weight']} images per weight (same prompts and seeds at every weight), placed from "
              f"0 ({a}) to 1 ({b}). Largest step: 1/steps on a straight path, 1 (of the span) on a step function; "
              "|p - line|: mean distance from the straight line between the curve's ends (eval/smoothness.py)."), "",
             f"![mixing smoothness]({sm['plot']})", "",
             ("| curve | largest step | between | share of span | mean \\|p - line\\| | per-image largest step | "
              "p(w) at " + ", ".join(str(w) for w in next(iter(sm["curves"].values()), {}).get("weights", [])) + " |"),
             "|---|---|---|---|---|---|---|"]
    for name, c in sm["curves"].items():
        lines.append(f"| {name} | {c['max_jump']:.3f} | {c['max_jump_between'][0]}->{c['max_jump_between'][1]} | "
                     f"{_fmt(c['max_jump_share'], 3)} | {c['line_l1']:.3f} | {c['per_image_max_jump']:.3f} | "
                     + " ".join(f"{v:.2f}" for v in c["curve"]) + " |")
    lines += [f"- {name}: skipped ({why})" for name, why in sm.get("skipped", {}).items()]
    return lines


def write_markdown(path, report: dict) -> Path:
    """A human-readable summary of ``report`` (the dict written to report.json)."""
    fid = report["fid"]
    st = report["settings"]
    lines = [
        "# DMM evaluation report",
        "",
        f"- merged model: `{report['merged']}`",
        "- teachers: " + ", ".join(f"{k} (`{v}`)" for k, v in report["teachers"].items()),
        f"- samples per set: {st['num_samples']}, resolution {report.get('resolution')}, "
        f"sampler {st['sampling']['scheduler']} {st['sampling']['steps']} steps, CFG {st['sampling']['guidance_scale']}",
        f"- negative prompt: `{st['sampling']['negative_prompt']}` (settings: {st.get('sampling_source', 'given')})",
        *([f"- the merged model samples as its export records (teachers as above): {ms.get('scheduler')} "
           f"{ms.get('num_inference_steps')} steps, guidance {ms.get('guidance_scale')}"] if (ms := st.get("merged_sampling")) else []),
        f"- seeds: {st['seeds']}",
        f"- prompts: {st['prompts']['source']} ({st['prompts']['count']} distinct)",
        f"- FID features: {json.dumps(report['features'])}",
        "",
        "## FID",
        "",
        f"**FIDt (trace of M) = {fid['FIDt']:.2f}**; teacher reference FIDt (trace of M_ref) = "
        f"{_fmt(fid.get('FIDt_ref'))}. Lower is better; compare only at equal sample counts.",
        "",
        "M(i, j) = FID(merged model with style i, teacher j):",
        "",
        *_matrix_md(fid["M"], fid["rows"], fid["cols"]),
        "",
    ]
    if fid.get("M_ref") is not None:
        lines += ["M_ref(i, j) = FID(teacher i, teacher j with other seeds):", "",
                  *_matrix_md(fid["M_ref"], fid["rows"], fid["cols"]), ""]
    lines += ["![FID heatmaps](fid_heatmaps.png)", "", "## Scores", ""]
    for key, sc in report["scores"].items():
        if "skipped" in sc:
            lines.append(f"- **{key}**: skipped ({sc['skipped']})")
            continue
        lines += [f"**{key}** (backbone: `{sc['backbone']}`)", "", "| set | mean | std | n |", "|---|---|---|---|"]
        lines += [f"| {label} | {v['mean']:.4f} | {v.get('std', float('nan')):.4f} | {v['n']} |"
                  for label, v in sc["per_set"].items()]
        lines.append("")
    if report.get("style_accuracy"):
        lines += ["", "## Toy style accuracy (classifier agrees with the requested style)", "",
                  "| set | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in report["style_accuracy"].items()]
    lines += ["", "## Images", ""]
    for name, f in report["files"].get("grids", {}).items():
        lines.append(f"- {name}: ![{name}]({f}) (top: merged, bottom: teacher)")
    if report["files"].get("interpolation"):
        lines.append(f"- interpolation: ![interpolation]({report['files']['interpolation']})")
    if report.get("mixing_smoothness"):
        lines += _smoothness_md(report["mixing_smoothness"])
    lines += ["", "## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    atomic_write_text(Path(path), "\n".join(lines))
    return Path(path)
