"""A tiny real world for the distributed tests: an SDXL-shaped base, fine-tuned teachers, shards."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def build_world(folder: Path, n_teachers: int = 4, n_samples: int = 64) -> Path:
    """Base pipeline, `n_teachers` perturbed copies and webdataset shards under `folder` (idempotent)."""
    from dmm.testing import make_teacher, make_tiny_pipeline, write_shards

    folder = Path(folder)
    done = folder / "world.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_pipeline(folder / "base", "sdxl")
    for i in range(n_teachers):
        make_teacher(folder / "base", folder / f"teacher{i}", seed=i + 1)
    shards = write_shards(folder / "shards", n_samples, per_shard=16)
    done.write_text(json.dumps({"teachers": n_teachers, "shards": [str(s) for s in shards]}))
    return folder


def recipe_dict(world: Path, out: Path, *, engine: str = "none", teachers: int = 2, **sections) -> dict:
    world = Path(world)
    info = json.loads((world / "world.json").read_text())
    raw = {
        "name": "tiny-distributed",
        "model": {"base": str(world / "base")},
        "teachers": [{"name": f"style{i}", "path": str(world / f"teacher{i}")} for i in range(teachers)],
        "data": {"shards": info["shards"], "resolution": 16, "batch_size": 2, "shuffle_buffer": 8},
        "optim": {"lr": 1e-3, "disc_lr": 1e-3},
        "train": {"max_steps": 4, "output_dir": str(out), "checkpoint_every": 2, "log_every": 1, "keep_last": 2},
        "distributed": {"engine": engine},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
