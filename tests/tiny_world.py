"""Session-scoped tiny pipelines + shards (random weights) shared by trainer tests."""

from pathlib import Path

from dmm.recipes import parse_recipe
from dmm.testing import make_teacher, make_tiny_pipeline, write_shards


def build(root: Path, arch: str = "sdxl", teachers=("a", "b"), prediction_type="epsilon") -> dict:
    make_tiny_pipeline(root / "base", arch, prediction_type=prediction_type)
    paths = {n: make_teacher(root / "base", root / f"teacher_{n}", seed=i + 1) for i, n in enumerate(teachers)}
    shards = write_shards(root / "shards", 64)
    return {"base": root / "base", "teachers": paths, "shards": shards}


def recipe(world: dict, out: Path, **sections):
    raw = {
        "name": "tiny",
        "model": {"base": str(world["base"])},
        "teachers": [{"name": n, "path": str(p)} for n, p in world["teachers"].items()],
        "data": {"shards": [str(s) for s in world["shards"]], "resolution": 16, "batch_size": 4},
        "train": {"max_steps": 3, "output_dir": str(out), "checkpoint_every": 2, "log_every": 1},
        "optim": {"lr": 1e-3, "disc_lr": 1e-3},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return parse_recipe(raw)
