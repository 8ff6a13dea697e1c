"""Where training shards come from: a registry of data sources.

`shards` reads the recipe's `data.shards` (paths, brace or glob patterns). Other sources make
shards first (the toy world renders them: `dmm.toyworld.data`); the trainer asks the source,
never a particular package, so the core does not depend on the toy world.
"""

from __future__ import annotations

from pathlib import Path

from dmm.data.webdata import expand_urls
from dmm.registry import Registry

# An entry is a callable (data_config, cache_root) -> list of shard paths. One that writes shards
# says so with a `writes_files = True` attribute: the main rank calls it first, the others wait.
DATA_SOURCES = Registry("data source", builtins=("dmm.data.sources", "dmm.toyworld.data"))


@DATA_SOURCES.register("shards", description="webdataset tar shards of (image, caption) named by data.shards")
def recipe_shards(data, cache_root: Path) -> list[str]:
    return expand_urls(data.shards)


def source_name(data) -> str:
    """The recipe's data section names its source by the sub-section it fills."""
    return "toyworld" if getattr(data, "toyworld", None) is not None else "shards"


def writes_files(name: str) -> bool:
    return bool(getattr(DATA_SOURCES.get(name).obj, "writes_files", False))


__all__ = ["DATA_SOURCES", "source_name", "writes_files"]
