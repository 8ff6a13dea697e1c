"""Mixing smoothness: how gradually images move from style A to style B along the 0..1 weight path.

The paper's Figure 10 shows a mixture changing gradually with its weight. Here the same prompts and
seeds are sampled at every weight w of the path, and each image is placed on a 0 (style A) .. 1
(style B) scale, giving one curve per image and their mean curve p(w):

* ``classifier``: the toy classifier's softmax probability of style B (toy world only).
* ``clip``: ``d_A / (d_A + d_B)``, with d_A (d_B) the cosine distance of the image's CLIP embedding
  to the mean embedding of the w = 0 (w = 1) images: works for any model with a CLIP. Its ends are
  never exactly 0 and 1 (an image is not at its set's mean), hence the scale-free figures below.
* ``clip_paired``: the same with d_A (d_B) measured to the same prompt and seed at w = 0 (w = 1).
  Ends exactly 0 and 1, and the content (which dominates a CLIP embedding, and squeezes the
  centroid curve towards 0.5: on the toy demo its span is 0.02) cancels; it assumes the two ends
  keep the composition, as a seed mostly does.

Figures of a curve, and why these:

* ``max_jump`` = max_k |p(w_k+1) - p(w_k)|: the failure the eye sees in a strip is one column where
  the style flips; this is that column's size. 1/steps on a straight line 0 -> 1, 1 on a step.
* ``max_jump_share`` = max_jump / |p(1) - p(0)|: the same, independent of where the ends lie, so
  the classifier and CLIP curves (and models) compare: 1/steps for any straight line, 1 for a step.
* ``line_l1`` = mean over the weights of |p(w) - line(w)|, the line joining the curve's own ends,
  and ``line_l1_share`` (divided by the span): whether the style moves in proportion to the
  weight. An S-curve can have modest jumps yet lie far from the line; a step is far on both.
  (0.41 for a step after the first of 10 intervals, 0.23 for a step in the middle.)
* ``per_image_max_jump``: the mean over images of each image's own largest step (in the same
  units). A mean curve can be smooth while every image flips abruptly at a different weight; this
  catches it. The classifier saturates (near 0 or 1 per image): read it from ``clip_paired``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eval.scores import _embed_in_batches

__all__ = ["classifier_style_names", "clip_positions", "curve_figures", "largest_step", "line_deviation",
           "mixing_smoothness", "style_probabilities"]

_EPS = 1e-12


def _as_curve(curve) -> np.ndarray:
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError(f"a mixing curve needs at least two weights, got shape {c.shape}")
    return c


def largest_step(curve) -> tuple[float, int]:
    """(max_k |c[k+1] - c[k]|, k): the largest change between neighbouring weights and where it is."""
    steps = np.abs(np.diff(_as_curve(curve)))
    k = int(np.argmax(steps))
    return float(steps[k]), k


def line_deviation(weights, curve) -> float:
    """Mean over the weights of |c(w) - line(w)|, line joining (w_0, c_0) and (w_n, c_n)."""
    w, c = np.asarray(weights, dtype=np.float64), _as_curve(curve)
    if w.shape != c.shape:
        raise ValueError(f"{w.size} weights but a curve of {c.size} values")
    if w[-1] == w[0]:
        raise ValueError("the mixing weights must span an interval (first and last weight are equal)")
    line = c[0] + (c[-1] - c[0]) * (w - w[0]) / (w[-1] - w[0])
    return float(np.abs(c - line).mean())


def _share(value: float, span: float) -> float | None:
    return None if abs(span) < 1e-6 else float(value / abs(span))


def curve_figures(weights: Sequence[float], per_image) -> dict:
    """The mean curve of ``per_image`` ([images, weights]) and its smoothness figures (module doc)."""
    w = [float(x) for x in weights]
    per = np.asarray(per_image, dtype=np.float64)
    if per.ndim != 2 or per.shape[1] != len(w) or per.shape[0] < 1:
        raise ValueError(f"per-image curves must be [images, {len(w)} weights], got shape {per.shape}")
    curve = per.mean(0)
    jump, k = largest_step(curve)
    line = line_deviation(w, curve)
    span = float(curve[-1] - curve[0])
    per_jump = float(np.mean([largest_step(c)[0] for c in per]))
    return {"weights": w, "curve": curve.tolist(), "n_images": int(per.shape[0]), "span": span,
            "max_jump": jump, "max_jump_between": [w[k], w[k + 1]], "max_jump_share": _share(jump, span),
            "line_l1": line, "line_l1_share": _share(line, span), "per_image_max_jump": per_jump,
            "per_image_max_jump_share": _share(per_jump, span)}


def clip_positions(embeddings, paired: bool = False) -> np.ndarray:
    """[images, weights] positions d_A / (d_A + d_B) of ``embeddings`` [weights, images, dim].

    d_A, d_B: cosine distances to the mean (normalised) embedding of the first / last weight's images;
    ``paired``: to the same image (prompt and seed) at the first / last weight instead, which takes
    the content out (the centroid curve is squeezed towards 0.5 when content dominates the CLIP).
    """
    e = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if e.ndim != 3 or e.shape[0] < 2:
        raise ValueError(f"CLIP embeddings must be [weights >= 2, images, dim], got {tuple(e.shape)}")
    e = torch.nn.functional.normalize(e, dim=-1)
    if paired:
        a, b = e[0], e[-1]
    else:
        a = torch.nn.functional.normalize(e[0].mean(0), dim=0).expand_as(e[0])
        b = torch.nn.functional.normalize(e[-1].mean(0), dim=0).expand_as(e[0])
    d_a, d_b = (1 - (e * a).sum(-1)).clamp_min(0), (1 - (e * b).sum(-1)).clamp_min(0)
    return (d_a / (d_a + d_b).clamp_min(_EPS)).T.numpy()


def classifier_style_names(world) -> list[str]:
    """The toy classifier's style classes in its own output order (it may know more styles than a model)."""
    heads = getattr(getattr(world.classifier, "config", None), "heads", None)
    return list(heads["style"]) if isinstance(heads, dict) and "style" in heads else list(world.style_names)


def style_probabilities(classifier, images: torch.Tensor, style_index: int, batch_size: int = 256) -> np.ndarray:
    """The toy classifier's softmax probability of style ``style_index`` for each image."""
    with torch.no_grad():
        logits = torch.cat([classifier(images[i:i + batch_size])[1]["style"]
                            for i in range(0, len(images), batch_size)])
    return logits.float().softmax(-1)[:, style_index].cpu().double().numpy()


def mixing_smoothness(weights: Sequence[float], images: Sequence[torch.Tensor], style_b: str,
                      classifier=None, classifier_styles: Sequence[str] | None = None, embedder=None,
                      skipped: dict | None = None) -> dict:
    """Curves and figures for one strip: ``images[k]`` are the [N, 3, H, W] images at ``weights[k]``,
    the same prompts and seeds at every weight. ``classifier`` (toy) and ``embedder`` (a
    ``eval.scores.ClipEmbedder``) are each optional; ``skipped`` names the reason a curve is absent."""
    if len(images) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(images)} image sets")
    out = {"curves": {}, "skipped": dict(skipped or {})}
    if classifier is not None:
        styles = list(classifier_styles or [])
        if style_b in styles:
            per = np.stack([style_probabilities(classifier, x, styles.index(style_b)) for x in images], axis=1)
            out["curves"]["classifier"] = {
                "what": f"toy classifier probability of style {style_b!r}", **curve_figures(weights, per)}
        else:
            out["skipped"]["classifier"] = f"the toy classifier has no style {style_b!r} (it knows {styles})"
    if embedder is not None:
        emb = np.stack([_embed_in_batches(embedder.embed_images, x, 32).double().numpy() for x in images])
        out["curves"]["clip"] = {
            "what": "CLIP position d_A/(d_A+d_B), cosine distances to the mean w=0 and w=1 embeddings",
            "backbone": embedder.backbone, **curve_figures(weights, clip_positions(emb))}
        out["curves"]["clip_paired"] = {
            "what": "CLIP position d_A/(d_A+d_B), cosine distances to the same prompt and seed at w=0 and w=1",
            "backbone": embedder.backbone, **curve_figures(weights, clip_positions(emb, paired=True))}
    return out
