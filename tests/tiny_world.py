"""Trainer tests' tiny world: `dmm.testing.build_tiny_world` with teachers "a" and "b", parsed recipes."""

from pathlib import Path

from dmm.recipes import parse_recipe
from dmm.testing import TinyWorld, build_tiny_world, tiny_recipe_dict


def build(root: Path, arch: str = "sdxl", teachers=("a", "b"), prediction_type="epsilon") -> TinyWorld:
    return build_tiny_world(root, arch, teachers=teachers, prediction_type=prediction_type)


def recipe(world: TinyWorld, out: Path, **sections):
    return parse_recipe(tiny_recipe_dict(world, out, **sections))


def students_after_4_steps(world: TinyWorld, root: Path, **sections) -> tuple[dict, dict]:
    """The student at step 4 of one run, and of a run stopped at 2 and resumed (checkpoint every 2)."""
    from safetensors.torch import load_file

    from dmm.train.run import run

    train = sections.pop("train", {})

    def make(out, steps, **extra):
        return recipe(world, root / out, train={**train, "max_steps": steps, "checkpoint_every": 2, **extra},
                      **sections)

    run(make("full", 4))
    run(make("part", 2))
    run(make("part", 4, resume="latest"))
    return tuple(load_file(str(root / n / "checkpoints" / "step-00000004" / "student.safetensors"))
                 for n in ("full", "part"))
