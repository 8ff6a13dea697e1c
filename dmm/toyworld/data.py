"""The toy world as a training data source: renders webdataset shards once, reuses them after."""

from __future__ import annotations

from pathlib import Path

from dmm.data.sources import DATA_SOURCES


@DATA_SOURCES.register("toyworld", description="render (image, caption) shards from a toy world (data.toyworld)")
def toy_shards(data, cache_root: Path) -> list[str]:
    from dmm.toyworld import load_world

    toy = data.toyworld
    out = Path(cache_root) / f"toy-{toy.n_samples}-{toy.seed}"
    return [str(p) for p in load_world(toy.world).write_shards(out, toy.n_samples, seed=toy.seed,
                                                               samples_per_shard=toy.samples_per_shard)]


toy_shards.writes_files = True  # rendered once by the main rank; the other ranks wait, then read them
