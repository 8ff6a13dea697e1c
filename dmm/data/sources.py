"""Where training shards come from: a registry of data sources.

`shards` reads the recipe's `data.shards` (paths, brace or glob patterns). Other sources make
shards first (the toy world renders them: `dmm.toyworld.data`); the trainer asks the source,
never a particular package, so the core does not depend on the toy world.
"""

from __future__ import annotations

from pathlib import Path

from dmm.data.slots import read_synthesized
from dmm.data.webdata import expand_urls
from dmm.registry import Registry

# An entry is a callable (data_config, cache_root) -> list of shard paths. One that writes shards
# says so with a `writes_files = True` attribute: the main rank calls it first, the others wait.
DATA_SOURCES = Registry("data source", builtins=("dmm.data.sources", "dmm.toyworld.data"))


@DATA_SOURCES.register("shards", description="webdataset tar shards of (image, caption) named by data.shards")
def recipe_shards(data, cache_root: Path) -> list[str]:
    return expand_urls(data.shards)


@DATA_SOURCES.register("synthesized", description="images the teachers generated (data.synthesized.path, "
                                                    "python -m dmm.data.synthesize): teacher i's for slot i")
def synthesized_shards(data, cache_root: Path) -> list[str]:
    """Every style's shards of a complete folder (the trainer reads them per slot: dmm.data.slots)."""
    manifest = read_synthesized(data.synthesized.path)
    return [str(Path(data.synthesized.path) / s) for style in manifest["styles"].values() for s in style["shards"]]


def source_name(data) -> str:
    """The recipe's data section names its source by the sub-section it fills (`synthesized` first:
    a synthesized stage keeps the shards or toy world that gave its prompts)."""
    if getattr(data, "synthesized", None) is not None:
        return "synthesized"
    return "toyworld" if getattr(data, "toyworld", None) is not None else "shards"


def writes_files(name: str) -> bool:
    return bool(getattr(DATA_SOURCES.get(name).obj, "writes_files", False))


__all__ = ["DATA_SOURCES", "source_name", "writes_files"]
