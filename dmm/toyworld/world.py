"""Loading a built toy world: its styles, pipeline folders, CLIP, classifier and prompts.

A world folder is what `python -m dmm.toyworld.build --out <folder>` writes:

    world.json            seed, styles (teacher order), vocabulary, sizes, timings, accuracies
    tokenizer/            CLIPTokenizer of the closed vocabulary
    clip/                 CLIPModel (text + vision towers; toy CLIP-score backbone) + tokenizer
    classifier/           style/content CNN (safetensors + json): judge and FID features
    base/                 pipeline folder of the base model (style-mixed data)
    teachers/<style>/     pipeline folder of each single-style teacher
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .content import Content, sample_contents

WORLD_JSON = "world.json"
DEFAULT_PATH = "assets/toyworld"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class WorldNotFoundError(FileNotFoundError):
    """The asset folder is missing or incomplete; the message says how to build it."""


def _build_hint(path: Path) -> str:
    return f"build it with: python -m dmm.toyworld.build --out {path}"


@dataclass
class ToyWorld:
    """A built toy world. Paths are absolute; the classifier loads on first use."""

    root: Path
    meta: dict
    _classifier: object = field(default=None, repr=False)

    @property
    def style_names(self) -> list[str]:
        """Teacher styles, in teacher order (the order a merged student's style codes follow)."""
        return list(self.meta["styles"])

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def sampling(self) -> dict:
        """Default sampling settings: num_inference_steps and guidance_scale."""
        return dict(self.meta["sampling"])

    @property
    def base_path(self) -> Path:
        return self.root / self.meta["paths"]["base"]

    def teacher_path(self, style: str) -> Path:
        teachers = self.meta["paths"]["teachers"]
        if style not in teachers:
            raise KeyError(f"no teacher for style {style!r}; teachers: {', '.join(teachers)}")
        return self.root / teachers[style]

    @property
    def teacher_paths(self) -> list[Path]:
        return [self.teacher_path(s) for s in self.style_names]

    @property
    def clip_path(self) -> Path:
        return self.root / self.meta["paths"]["clip"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.meta["paths"]["tokenizer"]

    @property
    def classifier_path(self) -> Path:
        return self.root / self.meta["paths"]["classifier"]

    @property
    def classifier(self):
        """The style/content classifier (`ToyClassifier`): `features(images)`, `predict(images)`."""
        if self._classifier is None:
            from .classifier import ToyClassifier

            self._classifier = ToyClassifier.load(self.classifier_path)
        return self._classifier

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """`n` captions of the closed world, deterministic from `seed` (repeats possible)."""
        return [c.caption for c in sample_contents(n, seed)]

    def contents(self, n: int, seed: int = 0) -> list[Content]:
        """The contents behind `prompts(n, seed)` (same order)."""
        return sample_contents(n, seed)

    def write_shards(self, out_dir: str | os.PathLike, n_samples: int, seed: int = 0, styles=None,
                     samples_per_shard: int = 1000) -> list[str]:
        """Webdataset shards of rendered samples in this world's styles (see `shards.write_shards`)."""
        from .shards import write_shards

        return write_shards(out_dir, n_samples, seed, styles or self.style_names, samples_per_shard)

    def load_pipeline(self, name_or_path: str | os.PathLike = "base", **kwargs):
        """Load 'base', a style name (its teacher) or a pipeline folder, in float32 on CPU."""
        import torch

        from .models import pipeline_class

        if str(name_or_path) == "base":
            path = self.base_path
        elif str(name_or_path) in self.meta["paths"]["teachers"]:
            path = self.teacher_path(str(name_or_path))
        else:
            path = Path(name_or_path)
        kwargs.setdefault("torch_dtype", torch.float32)
        kwargs["local_files_only"] = True
        pipe = pipeline_class(self.arch).from_pretrained(str(path), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_clip(self):
        """(CLIPModel, CLIPTokenizer): the toy CLIP-score backbone."""
        from transformers import CLIPModel

        from .tokenizer import load_tokenizer

        return CLIPModel.from_pretrained(str(self.clip_path), local_files_only=True).eval(), load_tokenizer(self.tokenizer_path)


def resolve_world_path(path: str | os.PathLike = DEFAULT_PATH) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (_REPO_ROOT / p).exists():
        p = _REPO_ROOT / p
    return p.resolve()


def load_world(path: str | os.PathLike = DEFAULT_PATH) -> ToyWorld:
    """Open a built toy world; a missing or corrupt folder raises WorldNotFoundError with the fix."""
    root = resolve_world_path(path)
    meta_path = root / WORLD_JSON
    if not meta_path.is_file():
        raise WorldNotFoundError(f"no toy world at {root} ({WORLD_JSON} missing); {_build_hint(Path(path))}")
    try:
        meta = json.loads(meta_path.read_text())
        paths = meta["paths"]
        needed = [paths["base"], paths["clip"], paths["tokenizer"], paths["classifier"],
                  *paths["teachers"].values()]
        for key in ("styles", "arch", "resolution", "seed", "sampling"):
            meta[key]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WorldNotFoundError(f"corrupt toy world at {meta_path} ({e!r}); {_build_hint(Path(path))}") from e
    missing = [n for n in needed if not (root / n).is_dir()]
    if missing:
        raise WorldNotFoundError(f"incomplete toy world at {root}: missing {missing}; {_build_hint(Path(path))}")
    return ToyWorld(root=root, meta=meta)
