"""Sampling image sets with an on-disk cache that survives interruption.

An image set is (model folder, style, sampling settings) plus a list of (prompt, seed) samples.
Its folder under the cache root is named by a hash of the model's identity (resolved path and the
size and mtime of every file in it, so a retrained model never reuses old images), the style and
the settings; each image is ``s<seed>-<prompt hash>.png``, written atomically. A rerun only
generates the images that are missing; a file that does not decode as a PNG of the set's size is
regenerated, never trusted.

Features are cached next to the images (``features-<extractor hash>.npz``, keyed by image name),
so a second extractor or a larger sample count only computes what is new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dmm.io import atomic_write_bytes, atomic_write_text  # re-exported
from dmm.sampling import check_sampling, sample_images

__all__ = [
    "NEGATIVE_PROMPT",
    "GenerationCache",
    "ImageSet",
    "ModelFolderError",
    "PromptFileError",
    "SamplingConfig",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_merged_folder",
    "check_pipeline_folder",
    "generate_sets",
    "load_merged_pipeline",
    "load_prompts",
    "load_teacher_pipeline",
]

NEGATIVE_PROMPT = "worst quality,low quality,normal quality,lowres,watermark,nsfw"  # the paper's
MERGED_UNET_CLASS = "StyleUNet2DConditionModel"


class ModelFolderError(ValueError):
    """A model folder that is missing or is not what was expected (the message says what was)."""


class PromptFileError(ValueError):
    """A prompt file that is missing, unreadable or empty."""


# --------------------------------------------------------------------------- inputs
def load_prompts(path) -> list[str]:
    """One caption per line; blank lines are skipped. Raises :class:`PromptFileError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {p}: {type(exc).__name__}: {exc}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {p} has no prompts (expected one caption per line)")
    return prompts


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{what}: cannot read {path} ({type(exc).__name__}: {exc})") from exc


def check_pipeline_folder(folder, what: str = "model") -> Path:
    """A diffusers pipeline folder: it has ``model_index.json``."""
    p = Path(folder)
    if not p.is_dir():
        raise ModelFolderError(f"{what} folder not found: {p}")
    if not (p / "model_index.json").is_file():
        raise ModelFolderError(f"{what} folder {p} is not a diffusers pipeline folder (no model_index.json)")
    return p


def check_merged_folder(folder) -> list[str]:
    """Validate a dmm merged model folder and return its ``style_names``."""
    p = check_pipeline_folder(folder, "merged model")
    cfg_path = p / "unet" / "config.json"
    expected = (f"expected a dmm merged model: a diffusers pipeline folder whose unet/config.json has "
                f"_class_name '{MERGED_UNET_CLASS}' and a non-empty 'style_names' list (written by dmm.pipeline)")
    if not cfg_path.is_file():
        raise ModelFolderError(f"{p} is not a dmm merged model: no unet/config.json; {expected}")
    cfg = _read_json(cfg_path, "merged model")
    cls = cfg.get("_class_name")
    if cls != MERGED_UNET_CLASS:
        raise ModelFolderError(f"{p} is not a dmm merged model: unet/config.json has _class_name {cls!r}; {expected}")
    names = cfg.get("style_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelFolderError(f"{p}: unet/config.json has no usable 'style_names' ({names!r}); {expected}")
    return names


def load_merged_pipeline(folder, device: str = "cpu"):
    check_merged_folder(folder)
    try:
        from dmm.pipeline import load_merged
    except ImportError as exc:
        raise ModelFolderError(f"cannot load merged model {folder}: dmm.pipeline.load_merged unavailable ({exc})") from exc
    return load_merged(folder).to(device)


def load_teacher_pipeline(folder, device: str = "cpu"):
    from diffusers import DiffusionPipeline

    p = check_pipeline_folder(folder, "teacher")
    return DiffusionPipeline.from_pretrained(p, local_files_only=True).to(device)


def model_fingerprint(folder) -> str:
    """Hash of a model folder's identity: resolved path plus (name, size, mtime) of its files."""
    root = Path(folder).resolve()
    h = hashlib.sha256(str(root).encode())
    if root.is_dir():
        for f in sorted(root.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def merged_sampling(folder: str | Path) -> dict | None:
    """The sampling a merged model's export records (a few-step stage's), or None."""
    from dmm.pipeline import MERGE_INFO

    path = Path(folder) / MERGE_INFO
    try:
        return json.loads(path.read_text()).get("sampling")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- configs
@dataclass
class SamplingConfig:
    """The paper's sampling settings by default (DPM-Solver++, 25 steps, CFG 7, its negative prompt)."""

    steps: int = 25
    guidance_scale: float = 7.0
    negative_prompt: str = NEGATIVE_PROMPT
    scheduler: str = "dpmsolver++"  # "dpmsolver++" or "pipeline" (keep the folder's scheduler)
    height: int | None = None  # None: the pipeline's default resolution
    width: int | None = None
    batch_size: int = 8
    device: str = "cpu"

    def key(self) -> dict:
        """What changes the images (batch size and device are left out on purpose)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("device")
        return d


@dataclass
class ImageSet:
    """One set of samples: a model with a style, the prompts and one seed per prompt."""

    label: str  # e.g. "merged/anime", "teacher/anime", "teacher-ref/anime"
    model: str  # pipeline folder
    kind: str  # "merged" or "teacher"
    style: object = None  # merged only: a name, index, {name: weight} or weight list
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"{self.label}: {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if self.kind not in ("merged", "teacher"):
            raise ValueError(f"{self.label}: kind must be 'merged' or 'teacher', got {self.kind!r}")

    def file_names(self) -> list[str]:
        return [f"s{seed:010d}-{hashlib.sha1(p.encode()).hexdigest()[:10]}.png"
                for p, seed in zip(self.prompts, self.seeds)]


def _style_key(style) -> object:
    if isinstance(style, dict):
        return {str(k): float(v) for k, v in sorted(style.items())}
    if isinstance(style, (list, tuple)):
        return [float(v) for v in style]
    return style


def _png_ok(path: Path, size: tuple[int, int] | None) -> bool:
    """True when ``path`` fully decodes as an RGB PNG (of ``size`` when given)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.load()
            return size is None or im.size == size
    except Exception:
        return False


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _save_png(path: Path, image: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class GenerationCache:
    """Generates (or reads back) image sets under ``root``; pipelines are loaded only if needed.

    ``loader(model_folder, kind) -> pipeline`` defaults to :func:`load_merged_pipeline` /
    :func:`load_teacher_pipeline`; tests and callers may pass their own.
    """

    def __init__(self, root, sampling: SamplingConfig | None = None,
                 loader: Callable[[str, str], object] | None = None,
                 progress: Callable[[str, int, int], None] | None = None):
        self.root = Path(root)
        self.sampling = sampling or SamplingConfig()
        check_sampling(self.sampling.steps, self.sampling.guidance_scale, self.sampling.batch_size)
        self._loader = loader or self._default_loader
        self._pipes: dict[tuple[str, str], object] = {}
        self._fingerprints: dict[str, str] = {}
        self._merged_sampling: dict[str, dict | None] = {}  # a few-step export's own settings, read once
        self.progress = progress
        self.generated = 0  # images generated by this object (not read from cache)

    # ---------------------------------------------------------------- paths
    def _default_loader(self, model: str, kind: str):
        if kind == "merged":
            return load_merged_pipeline(model, self.sampling.device)
        return load_teacher_pipeline(model, self.sampling.device)

    def fingerprint(self, model: str) -> str:
        if model not in self._fingerprints:
            self._fingerprints[model] = model_fingerprint(model)
        return self._fingerprints[model]

    def sampling_for(self, s: ImageSet) -> SamplingConfig:
        """The suite's settings, except for a few-step merged model (SPLAM): it samples the way its
        export records (its own LCM scheduler, its steps, guidance 1), while its teachers keep the suite's."""
        if s.kind != "merged":
            return self.sampling
        if s.model not in self._merged_sampling:
            self._merged_sampling[s.model] = merged_sampling(s.model)
        own = self._merged_sampling[s.model]
        if own is None:
            return self.sampling
        return replace(self.sampling, steps=int(own["num_inference_steps"]),
                       guidance_scale=float(own["guidance_scale"]), scheduler="pipeline", negative_prompt="")

    def set_key(self, s: ImageSet) -> dict:
        return {"model": str(Path(s.model).resolve()), "model_fingerprint": self.fingerprint(s.model),
                "kind": s.kind, "style": _style_key(s.style) if s.kind == "merged" else None,
                "sampling": self.sampling_for(s).key()}

    def set_dir(self, s: ImageSet) -> Path:
        digest = hashlib.sha256(json.dumps(self.set_key(s), sort_keys=True).encode()).hexdigest()[:16]
        return self.root / digest

    def pipeline(self, s: ImageSet):
        k = (s.model, s.kind)
        if k not in self._pipes:
            pipe = self._loader(s.model, s.kind)
            scheduler = self.sampling_for(s).scheduler
            if scheduler == "dpmsolver++":
                from diffusers import DPMSolverMultistepScheduler

                pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                         algorithm_type="dpmsolver++")
            elif scheduler != "pipeline":
                raise ValueError(f"unknown scheduler {scheduler!r} (dpmsolver++ or pipeline)")
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            self._pipes[k] = pipe
        return self._pipes[k]

    # ---------------------------------------------------------------- generation
    def _read_meta(self, s: ImageSet, folder: Path) -> dict:
        """The set's ``set.json``; rewritten from the key when missing or unreadable."""
        path = folder / "set.json"
        try:
            meta = json.loads(path.read_text())
            if isinstance(meta, dict) and meta.get("model_fingerprint") == self.fingerprint(s.model):
                return meta
        except (OSError, ValueError):
            pass
        meta = {**self.set_key(s), "label": s.label}
        atomic_write_text(path, json.dumps(meta, indent=2))
        return meta

    def ensure(self, s: ImageSet, on_image: Callable[[Path], None] | None = None) -> list[Path]:
        """Make sure every image of ``s`` exists; return the image paths in sample order."""
        folder = self.set_dir(s)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self._read_meta(s, folder)
        names = s.file_names()
        paths = [folder / n for n in names]
        size = tuple(meta["image_size"]) if meta.get("image_size") else None
        todo = [i for i, p in enumerate(paths) if not (p.is_file() and _png_ok(p, size))]
        # unique (prompt, seed) pairs only; duplicates share one file
        seen, unique = set(), []
        for i in todo:
            if names[i] not in seen:
                seen.add(names[i])
                unique.append(i)
        bs = self.sampling.batch_size
        for start in range(0, len(unique), bs):
            idx = unique[start : start + bs]
            images = self._sample(s, [s.prompts[i] for i in idx], [s.seeds[i] for i in idx])
            if size is None:
                size = (images.shape[2], images.shape[1])
                meta["image_size"] = list(size)
                atomic_write_text(folder / "set.json", json.dumps(meta, indent=2))
            for i, img in zip(idx, images):
                _save_png(paths[i], img)
                self.generated += 1
                if on_image is not None:
                    on_image(paths[i])
            if self.progress is not None:
                self.progress(s.label, min(start + bs, len(unique)), len(unique))
        return paths

    def _sample(self, s: ImageSet, prompts: list[str], seeds: list[int]) -> np.ndarray:
        cfg = self.sampling_for(s)
        pipe = self.pipeline(s)
        if s.kind == "merged":
            pipe.unet.set_style(s.style)
        size = {k: v for k, v in (("height", cfg.height), ("width", cfg.width)) if v}
        out = sample_images(pipe, prompts, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                            negative_prompt=cfg.negative_prompt if cfg.negative_prompt and cfg.guidance_scale > 1
                            else None, batch_size=len(prompts), output_type="np", **size)
        arr = np.asarray(out, dtype=np.float32)
        if not np.isfinite(arr).all():  # never cache garbage as a valid image
            raise FloatingPointError(
                f"{s.label}: the pipeline {s.model} produced NaN/inf pixels for seeds {seeds}; "
                "nothing was cached for this batch (try float32, or check the model weights)")
        return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)

    # ---------------------------------------------------------------- reading back
    @staticmethod
    def load_images(paths: Sequence[Path]) -> torch.Tensor:
        """``[B, 3, H, W]`` float in [0, 1] (the PNG-encoded images, as scored)."""
        arr = np.stack([_load_png(p) for p in paths]).astype(np.float32) / 255.0
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def features(self, s: ImageSet, paths: Sequence[Path], extractor, batch_size: int = 32) -> torch.Tensor:
        """Features of the set's images, cached per (image, extractor) in the set folder."""
        desc = json.dumps(extractor.describe(), sort_keys=True, default=str)
        tag = hashlib.sha256(desc.encode()).hexdigest()[:12]
        cache = self.set_dir(s) / f"features-{tag}.npz"
        have: dict[str, np.ndarray] = {}
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if str(z["extractor"]) == desc:
                        have = dict(zip((str(n) for n in z["names"]), z["features"]))
            except Exception:
                have = {}  # unreadable cache: recompute, never trust
        # key by name, size and mtime: a regenerated image never reuses stale features
        names = [f"{p.name}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in paths]
        missing = sorted({n for n in names if n not in have})
        if missing:
            by_name = dict(zip(names, paths))
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                feats = extractor.extract(self.load_images([by_name[n] for n in chunk]), batch_size)
                for n, f in zip(chunk, feats.numpy()):
                    have[n] = f
            keys = sorted(have)
            import io

            buf = io.BytesIO()
            np.savez(buf, extractor=np.array(desc), names=np.array(keys),
                     features=np.stack([have[k] for k in keys]).astype(np.float64))
            atomic_write_bytes(cache, buf.getvalue())
        return torch.from_numpy(np.stack([have[n] for n in names]).astype(np.float64))


# --------------------------------------------------------------------------- the generate step
class ProgressBars:
    """``progress(label, done, total)`` for :class:`GenerationCache`: one tqdm bar per image set."""

    def __init__(self, enabled: bool = True):
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


def generate_sets(cache: GenerationCache, sets: Sequence[ImageSet], progress: bool = True,
                  desc: str = "image sets") -> dict[str, list[Path]]:
    """Every set's image paths by label, generating only the images the cache does not hold."""
    from tqdm.auto import tqdm

    return {s.label: cache.ensure(s) for s in tqdm(sets, desc=desc, unit="set", disable=not progress)}
