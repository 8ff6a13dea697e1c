"""Training checkpoints: complete or absent, never half-written, the last k kept.

A checkpoint is written into a hidden temporary folder, moved into place once every rank has
finished writing, and only then named in `latest`. A crash mid-write leaves `latest` pointing
at the previous, complete checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dmm.engines.base import Engine
from dmm.io import atomic_torch_save, atomic_write_json, atomic_write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_DIFFERENCES = ("train.max_steps", "train.resume", "train.output_dir", "train.log_every",
                         "train.checkpoint_every", "train.keep_last", "sample.", "distributed.",
                         "data.num_workers")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_DIFFERENCES)]


def rng_state() -> dict:
    """Every RNG, as tensors and ints only, so it reloads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        if not (folder / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{pointer} names {folder}, which is not a complete checkpoint")
        return folder

    def resolve(self, resume: str | None) -> Path | None:
        if resume in (None, "", "none"):
            return None
        if resume == "latest":
            return self.latest()
        folder = Path(resume)
        if not (folder / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume: {folder} is not a complete checkpoint (no trainer_state.json)")
        return folder

    def save(self, engine: Engine, step: int, state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. `state` is the trainer's (rank 0's), `rank_state` each rank's own."""
        name = f"step-{step:08d}"
        tmp = self.root / f".tmp-{name}"
        if engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        engine.barrier()
        engine.save(tmp)
        atomic_torch_save({**rank_state, "rng": rng_state()}, tmp / f"rank{engine.rank:05d}.pt")
        engine.barrier()
        final = self.root / name
        if engine.is_main:
            atomic_write_json(tmp / "trainer_state.json", {**state, "step": step, "world_size": engine.world_size})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.root / "latest", name)
            for old in self.folders()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        engine.barrier()
        return final

    @staticmethod
    def load_state(folder: Path, rank: int) -> tuple[dict, dict]:
        state = json.loads((folder / "trainer_state.json").read_text())
        rank_file = folder / f"rank{rank:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no state for rank {rank}: it was written by {state.get('world_size')} ranks"
            )
        return state, torch.load(rank_file, map_location="cpu", weights_only=True)
