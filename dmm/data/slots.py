"""Per-slot training data: a micro-batch whose every position reads the images of its own style.

The synthesized-data stage (`data.synthesized`, dmm/data/synthesize.py) trains style i on the
images teacher i generated, so each style sees its own teacher's data distribution (the paper's
fine-tuning on synthesized images). The layout (dmm/train/layout.py) decides before the first
step which positions of a rank's micro-batch each local teacher supervises; `SlotStream` keeps one
`ShardStream` per local slot over that style's shards and fills every position from its slot's
stream. Ranks that hold the same teacher split its shards as ranks split any shard list. The
position of every slot's stream is the stream's state (saved in checkpoints), so a resumed run
reads exactly the samples the uninterrupted one would.

A synthesized folder: `<style>/shard-NNNNNN.tar` (keys `<index>.png`, `<index>.txt`) per style
and `manifest.json` (what made the images, and `complete` once every style is packed).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from dmm.data.webdata import DataError, ShardStream

MANIFEST = "manifest.json"
IMAGE_KEY, CAPTION_KEY = "png", "txt"  # what the synthesized shards hold, whatever the source data's keys


class SynthesizedError(DataError):
    """A synthesized folder that is missing, unfinished or made with other settings; says what to run."""


def read_synthesized(folder: str | Path, complete: bool = True) -> dict:
    """The manifest of a synthesized folder (by default it must be complete)."""
    path = Path(folder) / MANIFEST
    make = ("generate it with `python -m dmm.data.synthesize --recipe RECIPE`, or start the synthesized stage "
            "(it generates what is missing)")
    if not path.is_file():
        raise SynthesizedError(f"data.synthesized.path: {folder} holds no {MANIFEST}; {make}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SynthesizedError(f"data.synthesized.path: {path} is not valid JSON ({err}); delete the folder and "
                               f"{make}") from None
    if complete and not manifest.get("complete"):
        raise SynthesizedError(f"data.synthesized.path: {folder} is not finished (its generation stopped early); "
                               f"{make}: it continues where it stopped")
    return manifest


class SlotStream(ShardStream):
    """Micro-batches in micro-step order (0, 1, ..., A-1, 0, ...): position j of micro-step m is the
    next sample of the stream of the slot whose `micro_groups[m]` lists j.

    `slots` maps a slot to (its shards, this rank's index among the ranks holding it, their count).
    Built without `slots` (as a caption reader is: dmm.train.tblog) it is the ShardStream over `urls`."""

    def __init__(self, urls: list[str], *, slots: dict[int, tuple[list[str], int, int]] | None = None,
                 micro_groups: list[dict[int, list[int]]] | None = None, **kwargs):
        super().__init__(urls, **kwargs)
        self.micro_groups = list(micro_groups or [])
        self.slots: dict[int, ShardStream] = {}
        for i, (slot_urls, rank, world_size) in sorted((slots or {}).items()):
            sizes = {len(g[i]) for g in self.micro_groups if g.get(i)}
            if len(sizes) != 1:  # the layout gives a slot all of a micro-batch, or the same share of each
                raise ValueError(f"slot {i} supervises {sorted(sizes)} samples in different micro-steps; "
                                 "per-slot data needs the same count in every micro-step that uses it")
            self.slots[i] = ShardStream(slot_urls, batch_size=sizes.pop(), resolution=self.resolution, seed=self.seed,
                                        rank=rank, world_size=world_size, image_key=self.image_key,
                                        caption_key=self.caption_key, shuffle_buffer=self.shuffle_buffer,
                                        num_workers=self.num_workers)
        if self.slots:
            unfed = sorted({j for g in self.micro_groups for i, js in g.items() if i not in self.slots for j in js})
            if unfed:
                raise ValueError(f"positions {unfed} belong to slots without data; every supervising slot needs "
                                 "its own shards")

    def state_dict(self) -> dict:
        if not self.slots:
            return super().state_dict()
        return {"slots": {str(i): s.state_dict() for i, s in self.slots.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self.slots:
            return super().load_state_dict(state)
        saved = sorted(state.get("slots", {}))
        if saved != sorted(str(i) for i in self.slots):
            raise ValueError(f"data position was saved for slots {saved}, this rank reads slots "
                             f"{sorted(self.slots)}: the sample order would differ")
        for i, s in self.slots.items():
            s.load_state_dict(state["slots"][str(i)])

    def __iter__(self) -> Iterator[dict]:
        if not self.slots:
            yield from super().__iter__()
            return
        readers = {i: iter(s) for i, s in self.slots.items()}
        for groups in itertools.cycle(self.micro_groups):
            yield self._assemble(groups, readers)

    def _assemble(self, groups: dict[int, list[int]], readers: dict[int, Iterator[dict]]) -> dict:
        rows: list = [None] * self.batch_size
        for i, positions in groups.items():
            if not positions:
                continue
            part = next(readers[i])
            for q, j in enumerate(positions):
                rows[j] = (part["pixels"][q], part["captions"][q], part["size_ids"][q])
        if any(r is None for r in rows):
            raise ValueError(f"micro-batch positions {[j for j, r in enumerate(rows) if r is None]} have no slot")
        return {"pixels": torch.stack([r[0] for r in rows]), "captions": [r[1] for r in rows],
                "size_ids": torch.stack([r[2] for r in rows])}


__all__ = ["CAPTION_KEY", "IMAGE_KEY", "MANIFEST", "SlotStream", "SynthesizedError", "read_synthesized"]
