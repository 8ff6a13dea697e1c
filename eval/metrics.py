"""Per-image metrics behind the generic registry ``METRICS`` (`dmm.registry`): one entry per metric.

An entry is a factory ``(options, ctx: MetricContext) -> scorer``; the scorer maps an image set
(``[B, 3, H, W]`` floats in [0, 1], their prompts) to a :class:`~eval.scores.ScoreResult` or a
plain list of per-image values. Factories run before any sampling, so a wrong path fails in
seconds, not after hours of generation; a metric that is not configured raises
:class:`MetricSkipped` and the report says why. Built-in: ``clip_score``, ``aesthetic``,
``pick_score`` (Table 3). Add one in any module and load it with ``--plugin``::

    @METRICS.register("mine", description="one line", options=MyOptions)
    def mine(options: MyOptions, ctx: MetricContext):
        return lambda images, prompts: [float(v) for v in images.mean((1, 2, 3))]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dmm.registry import Registry
from dmm.schema import setting
from eval.scores import (
    AESTHETIC_WEIGHTS_NAME,
    BackendUnavailable,
    ScoreResult,
    _require_dir,
    aesthetic_score,
    build_embedder,
    clip_score,
    load_aesthetic_mlp,
    pick_score,
    summary,
)

__all__ = ["DEFAULT_METRICS", "METRICS", "MetricContext", "MetricSkipped", "PreparedMetric", "prepare_metrics",
           "score_sets", "style_accuracy"]

METRICS: Registry = Registry("metric")
DEFAULT_METRICS = ("clip_score", "aesthetic", "pick_score")  # each is skipped with a reason when not configured

Scorer = Callable[[torch.Tensor, list], "ScoreResult | Sequence[float]"]


class MetricSkipped(Exception):
    """A metric that is not configured in this run; the message is the reason written in the report."""


@dataclass
class MetricContext:
    """What metrics may use: the device, the toy world (toy defaults) and a shared CLIP cache."""

    device: str = "cpu"
    world: object | None = None
    world_reason: str | None = None
    embedders: dict = field(default_factory=dict)

    def embedder(self, spec: str, processor: str | None = None, setting: str = "--clip-model",
                 preprocess: str = "processor"):
        """One CLIP embedder per (backbone, processor, preprocess), loaded on first use."""
        key = (spec, processor, preprocess)
        if key not in self.embedders:
            self.embedders[key] = build_embedder(spec, processor, device=self.device, setting=setting,
                                                 preprocess=preprocess)
        return self.embedders[key]


def _check_model(spec: str | None, what: str, flag: str) -> None:
    if spec and not spec.startswith("open_clip:"):
        _require_dir(spec, what, flag)


def _check_processor(folder: str | None, flag: str) -> None:
    if folder and not Path(folder).is_dir():
        raise FileNotFoundError(f"processor folder not found: {folder} (set by {flag})")


# --------------------------------------------------------------------------- built-in metrics
@dataclass(frozen=True)
class ClipScoreOptions:
    model: str | None = setting(None, help="HF CLIPModel folder or open_clip:NAME:WEIGHTS_FILE (--clip-model); "
                                "default: the toy world's CLIP")
    processor: str | None = setting(None, help="tokenizer/image-processor folder (--clip-processor); default: the "
                                    "model folder, toy: the world's tokenizer")
    preprocess: Literal["processor", "minus1to1"] | None = setting(
        None, help="image input: the CLIP image processor, or 2x-1 at native size (--clip-preprocess; toy default)")


@METRICS.register("clip_score", description="CLIP score: 100 x cos(image, its prompt), mean clamped at 0",
                  options=ClipScoreOptions)
def _clip_score(opts: ClipScoreOptions, ctx: MetricContext) -> Scorer:
    toy = opts.model is None and ctx.world is not None
    spec = opts.model or (str(ctx.world.clip_path) if ctx.world is not None else None)
    if spec is None:
        raise MetricSkipped(f"no CLIP model: pass --clip-model (toy default unavailable: {ctx.world_reason})")
    _check_model(opts.model, "CLIP model", "--clip-model")
    _check_processor(opts.processor, "--clip-processor")
    processor = opts.processor or (str(ctx.world.tokenizer_path) if toy else None)
    preprocess = opts.preprocess or ("minus1to1" if toy else "processor")
    return lambda images, prompts: clip_score(ctx.embedder(spec, processor, "--clip-model", preprocess),
                                              images, prompts)


@dataclass(frozen=True)
class AestheticOptions:
    weights: str | None = setting(None, help=f"LAION aesthetic v2 MLP file ({AESTHETIC_WEIGHTS_NAME}; "
                                  "--aesthetic-weights)")
    clip: str | None = setting(None, help="CLIP ViT-L/14, HF folder or open_clip:ViT-L-14:FILE (--aesthetic-clip)")


@METRICS.register("aesthetic", description="LAION aesthetic v2: an MLP on the CLIP ViT-L/14 image embedding",
                  options=AestheticOptions)
def _aesthetic(opts: AestheticOptions, ctx: MetricContext) -> Scorer:
    if opts.weights:
        mlp = load_aesthetic_mlp(opts.weights)  # a wrong file fails now, before sampling
    _check_model(opts.clip, "CLIP model", "--aesthetic-clip")
    if not opts.weights:
        raise MetricSkipped(f"no --aesthetic-weights ({AESTHETIC_WEIGHTS_NAME}) given")
    if not opts.clip:
        raise MetricSkipped("no --aesthetic-clip (CLIP ViT-L/14 folder) given")
    return lambda images, prompts: aesthetic_score(ctx.embedder(opts.clip, None, "--aesthetic-clip"), mlp, images)


@dataclass(frozen=True)
class PickScoreOptions:
    model: str | None = setting(None, help="PickScore_v1 CLIPModel folder (--pick-model)")
    processor: str | None = setting(None, help="its processor folder, CLIP-ViT-H-14-laion2B-s32B-b79K "
                                    "(--pick-processor)")


@METRICS.register("pick_score", description="PickScore_v1: logit scale x cos(prompt, image)",
                  options=PickScoreOptions)
def _pick_score(opts: PickScoreOptions, ctx: MetricContext) -> Scorer:
    _check_model(opts.model, "CLIP model", "--pick-model")
    _check_processor(opts.processor, "--pick-processor")
    if not opts.model:
        raise MetricSkipped("no --pick-model (PickScore_v1 folder) given")
    return lambda images, prompts: pick_score(ctx.embedder(opts.model, opts.processor, "--pick-model"),
                                              images, prompts)


# --------------------------------------------------------------------------- running them
@dataclass
class PreparedMetric:
    name: str
    scorer: Scorer | None = None
    skipped: str | None = None


def prepare_metrics(names: Sequence[str] | None, options: dict[str, dict], ctx: MetricContext) -> list[PreparedMetric]:
    """Build the selected metrics (default: `DEFAULT_METRICS`) with their typed options, before sampling."""
    names = list(DEFAULT_METRICS if names is None else names)
    for extra in options:
        if extra not in names:
            raise ValueError(f"options given for metric {extra!r}, which is not selected (selected: "
                             f"{', '.join(names)}); add --metric {extra}")
    out = []
    for name in names:
        entry = METRICS.get(name)
        opts = entry.parse_options(options.get(name), f"metric {name!r} options")
        try:
            out.append(PreparedMetric(name, scorer=entry.obj(opts, ctx)))
        except MetricSkipped as exc:
            out.append(PreparedMetric(name, skipped=str(exc)))
    return out


def _as_result(name: str, value, n: int) -> ScoreResult:
    if isinstance(value, ScoreResult):
        result = value
    else:
        per = [float(v) for v in np.asarray(torch.as_tensor(value).detach().cpu(), dtype=np.float64).reshape(-1)]
        result = ScoreResult(name, float(np.mean(per)) if per else float("nan"), per, name)
    if len(result.per_image) != n:
        raise ValueError(f"metric {name!r} returned {len(result.per_image)} values for {n} images (one per image)")
    return result


def score_sets(metrics: Sequence[PreparedMetric], sets, paths: dict, load_images,
               per_image: dict | None = None) -> dict:
    """Every metric on every set: ``{metric: {"backbone", "per_set": {label: summary}}}`` or ``{"skipped"}``;
    ``per_image`` (if given) collects ``{(label, index): {metric: value}}``."""
    out = {}
    for metric in metrics:
        if metric.scorer is None:
            out[metric.name] = {"skipped": metric.skipped}
            continue
        try:
            per, backbone = {}, None
            for s in sets:
                res = _as_result(metric.name, metric.scorer(load_images(paths[s.label]), list(s.prompts)),
                                 len(s.prompts))
                backbone = res.backbone
                per[s.label] = {**summary(res.per_image), "mean": res.mean}
                if per_image is not None:
                    for k, v in enumerate(res.per_image):
                        per_image.setdefault((s.label, k), {})[metric.name] = v
            out[metric.name] = {"backbone": backbone, "per_set": per}
        except BackendUnavailable as exc:  # optional backend; a missing weight file is an error
            out[metric.name] = {"skipped": str(exc)}
    return out


def style_accuracy(world, sets, styles: Sequence[str], paths: dict, load_images) -> dict:
    """Toy world: the share of each set's images the toy classifier puts in the set's style."""
    if world is None or not hasattr(world.classifier, "predict"):
        return {}
    clf = world.classifier
    heads = getattr(getattr(clf, "config", None), "heads", None)  # the classifier's own class order
    names = list(heads["style"]) if isinstance(heads, dict) and "style" in heads else list(world.style_names)
    out = {}
    for s, style in zip(sets, styles):
        if style not in names:
            continue
        with torch.no_grad():
            pred = clf.predict(load_images(paths[s.label]))
        if "style" in pred:
            out[s.label] = float((pred["style"] == names.index(style)).float().mean())
    return out
