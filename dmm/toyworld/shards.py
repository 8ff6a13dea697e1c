"""Webdataset tar shards of toy-world samples (png image, txt caption, json metadata).

Deterministic from the seed: item i is always the same image, whatever the shard size. Each shard
is written under a temporary name then renamed, and a manifest is written last, so a folder either
holds a complete set (reused as a cache) or is rebuilt.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from dmm.io import atomic_file, atomic_write_text

MANIFEST = "manifest.json"


def _shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}.tar"


def _item(index: int, seed: int, styles: list[str]) -> dict:
    from .render import render_sample

    content, style, img = render_sample(index, seed, styles)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    meta = {"index": index, "seed": seed, "style": style, "style_index": styles.index(style),
            "caption": content.caption, "content": content.to_dict(), "labels": content.labels()}
    return {"__key__": f"s{seed}_{index:08d}", "png": buf.getvalue(), "txt": content.caption, "json": meta}


def write_shards(out_dir: str | os.PathLike, n_samples: int, seed: int, styles: list[str] | None = None,
                 samples_per_shard: int = 1000, prefix: str = "toyworld") -> list[str]:
    """Write `n_samples` items as webdataset shards in `out_dir`; returns the shard paths in order.

    Styles go round-robin (item i has style styles[i % len(styles)]); a complete set with the same
    parameters already in `out_dir` is returned without rebuilding."""
    import webdataset as wds

    from .styles import parse_styles

    styles = parse_styles(styles)
    if n_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("n_samples and samples_per_shard must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (n_samples + samples_per_shard - 1) // samples_per_shard
    names = [_shard_name(prefix, i) for i in range(n_shards)]
    params = {"n_samples": n_samples, "seed": seed, "styles": styles, "samples_per_shard": samples_per_shard,
              "prefix": prefix, "shards": names}
    manifest = out / f"{prefix}-{MANIFEST}"
    if manifest.exists():
        try:
            if json.loads(manifest.read_text()) == params and all((out / n).exists() for n in names):
                return [str(out / n) for n in names]
        except (json.JSONDecodeError, OSError):
            pass
        manifest.unlink()
    for s, name in enumerate(names):
        with atomic_file(out / name) as tmp, wds.TarWriter(tmp) as sink:
            for index in range(s * samples_per_shard, min(n_samples, (s + 1) * samples_per_shard)):
                sink.write(_item(index, seed, styles))
    atomic_write_text(manifest, json.dumps(params, indent=1))
    return [str(out / n) for n in names]
