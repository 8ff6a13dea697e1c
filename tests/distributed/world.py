"""The distributed tests' tiny world (`dmm.testing.build_tiny_world`, teachers style0..) and recipes."""

from __future__ import annotations

from pathlib import Path

import yaml

from dmm.io import atomic_write_text
from dmm.testing import TinyWorld, tiny_recipe_dict

# What the distributed tests run unless a test says otherwise: batch 2 per rank, 4 steps, 2 kept checkpoints.
DEFAULTS = {"name": "tiny-distributed", "data": {"batch_size": 2, "shuffle_buffer": 8},
            "train": {"max_steps": 4, "keep_last": 2}}


def recipe_dict(world: TinyWorld, out: Path, *, engine: str = "none", teachers: int = 2, **sections) -> dict:
    merged = {**DEFAULTS, "distributed": {"engine": engine}}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_recipe_dict(world, out, teachers=teachers, **merged)


def write_recipe(path: Path, raw: dict) -> Path:
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return path
