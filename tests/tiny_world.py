"""Trainer tests' tiny world: `dmm.testing.build_tiny_world` with teachers "a" and "b", parsed recipes."""

from pathlib import Path

from dmm.recipes import parse_recipe
from dmm.testing import TinyWorld, build_tiny_world, tiny_recipe_dict


def build(root: Path, arch: str = "sdxl", teachers=("a", "b"), prediction_type="epsilon") -> TinyWorld:
    return build_tiny_world(root, arch, teachers=teachers, prediction_type=prediction_type)


def recipe(world: TinyWorld, out: Path, **sections):
    return parse_recipe(tiny_recipe_dict(world, out, **sections))
