"""(image, caption) pairs from webdataset shards: deterministic, split across ranks, resumable.

Each epoch visits the shards in a seeded order. With at least as many shards as ranks, rank r
reads shards r, r + W, ...; otherwise every rank reads all shards and keeps every W-th sample.
Either way no sample is seen twice in an epoch on different ranks. Every epoch draws a new
shard order and shuffle (resampling), so the stream never ends. The position (epoch, samples
consumed) is part of the training checkpoint, and resuming skips exactly that many samples.

With `num_workers` > 0 a DataLoader's workers share a rank's stream: worker w decodes batches
w, w + K, ... of the same deterministic sequence and the loader hands them back in order, so the
batches (and the saved position) are exactly those of `num_workers=0`.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image


def expand_urls(patterns: list[str]) -> list[str]:
    urls: list[str] = []
    for pattern in patterns:
        expanded = list(wds.shardlists.expand_urls(pattern)) if "{" in pattern else [pattern]
        for url in expanded:
            if "://" not in url and not Path(url).is_file():
                raise FileNotFoundError(f"data shard not found: {url}")
            urls.append(url)
    if not urls:
        raise ValueError("no data shards given: set data.shards to webdataset tar files")
    return urls


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize, scale to [-1, 1], CHW."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class ShardStream:
    def __init__(self, urls: list[str], *, batch_size: int, resolution: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, image_key: str = "png", caption_key: str = "txt", shuffle_buffer: int = 256,
                 num_workers: int = 0):
        self.urls = list(urls)
        self.batch_size = batch_size
        self.resolution = resolution
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.image_key, self.caption_key = image_key, caption_key
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already handed out on this rank

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["world_size"], state["seed"]) != (self.world_size, self.seed):
            raise ValueError(
                f"data position was saved with world size {state['world_size']} and seed {state['seed']}, "
                f"this run has {self.world_size} and {self.seed}: the sample order would differ"
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def _raw_samples(self, epoch: int) -> Iterator[dict]:
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_shard = len(order) >= self.world_size
        mine = order[self.rank :: self.world_size] if by_shard else order
        # No node/worker splitting inside webdataset: ranks are split above, workers in __iter__.
        dataset = wds.WebDataset(mine, shardshuffle=False, empty_check=False, nodesplitter=None,
                                 workersplitter=None)
        for i, sample in enumerate(dataset):
            if by_shard or i % self.world_size == self.rank:
                yield sample

    def _decode(self, sample: dict) -> tuple[torch.Tensor, str]:
        if self.image_key not in sample or self.caption_key not in sample:
            raise KeyError(
                f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks {self.image_key!r} or "
                f"{self.caption_key!r}; it has {sorted(k for k in sample if not k.startswith('__'))}: "
                "set data.image_key / data.caption_key"
            )
        image = Image.open(io.BytesIO(sample[self.image_key]))
        caption = sample[self.caption_key]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if self.caption_key == "json":
            caption = json.loads(caption)["caption"]
        return to_tensor(image, self.resolution), caption

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        """This rank's raw (undecoded) samples of one epoch, shuffled through a seeded buffer."""
        rng = random.Random(self.seed * 7919 + epoch * 104_729 + self.rank)
        buffer: list = []
        for sample in self._raw_samples(epoch):
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _positioned_batches(self, keep=None) -> Iterator[tuple[dict | None, int, int]]:
        """(batch, epoch, consumed) from the current position on; batches whose running index
        `keep` rejects are not decoded (None), but the position still advances past them."""
        epoch, consumed = self.epoch, self.consumed
        index = 0
        pending: list = []
        while True:
            seen = 0
            for sample in self._epoch_samples(epoch):
                seen += 1
                if seen <= consumed:
                    continue  # resuming: these were handed out before the checkpoint
                pending.append(sample)
                consumed += 1
                if len(pending) == self.batch_size:
                    batch = None
                    if keep is None or keep(index):
                        decoded = [self._decode(x) for x in pending]
                        batch = {"pixels": torch.stack([d[0] for d in decoded]),
                                 "captions": [d[1] for d in decoded]}
                    yield batch, epoch, consumed
                    index += 1
                    pending = []
            if seen == 0:
                raise ValueError(f"rank {self.rank} received no samples from shards {self.urls[:3]}...")
            epoch += 1
            consumed = 0

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers <= 0:
            for batch, epoch, consumed in self._positioned_batches():
                self.epoch, self.consumed = epoch, consumed
                yield batch
            return
        loader = torch.utils.data.DataLoader(_WorkerShare(self), batch_size=None, num_workers=self.num_workers)
        for item in loader:
            self.epoch, self.consumed = int(item.pop("_epoch")), int(item.pop("_consumed"))
            yield item


class _WorkerShare(torch.utils.data.IterableDataset):
    """One rank's stream as seen by DataLoader worker w of K: it decodes batches w, w + K, ..."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch, epoch, consumed in self.stream._positioned_batches(keep=lambda i: i % k == w):
            if batch is not None:
                yield {**batch, "_epoch": epoch, "_consumed": consumed}
