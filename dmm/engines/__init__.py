"""Training engines, one file each, registered in `ENGINES`: `none` (one process), `deepspeed`
(ZeRO 0-3), `fsdp2` (fully_shard per block). A user engine subclasses `Engine` and registers
itself with `@ENGINES.register(name, description=..., options=...)` in a module the recipe lists
under `plugins:`. Each engine owns its checkpoint format and its consolidation to plain weights.
"""

from dmm.engines.base import ENGINES, Engine
from dmm.engines.single import SingleProcessEngine
from dmm.engines import deepspeed as _deepspeed  # noqa: F401  (registers; imports deepspeed only when used)
from dmm.engines import fsdp2 as _fsdp2  # noqa: F401  (registers)


def make_engine(name: str, recipe) -> Engine:
    """The engine `name`, built with its typed options from `recipe.distributed.options`."""
    entry = ENGINES.get(name)
    options = entry.parse_options(recipe.distributed.options if recipe is not None else {}, "distributed.options")
    return entry.obj(recipe, options)


def engine_holding(folder, which: str = "student") -> type[Engine]:
    """The engine class whose checkpoint format `folder` holds (for export from any checkpoint)."""
    from pathlib import Path

    for entry in ENGINES.entries():
        if entry.obj.holds_checkpoint(Path(folder), which):
            return entry.obj
    raise FileNotFoundError(f"{folder} holds no {which} weights in the format of any registered engine "
                            f"({', '.join(ENGINES.names())})")


__all__ = ["ENGINES", "Engine", "SingleProcessEngine", "engine_holding", "make_engine"]
