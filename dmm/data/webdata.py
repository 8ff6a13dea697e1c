"""(image, caption) pairs from webdataset shards: deterministic, split across ranks, resumable.

Each epoch visits the shards in a seeded order. With at least as many shards as ranks, rank r
reads shards r, r + W, ...; otherwise every rank reads all shards and keeps every W-th sample.
Either way no sample is seen twice in an epoch on different ranks. The position (epoch, samples
consumed) is part of the training checkpoint, and resuming skips exactly that many samples.
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
                 world_size: int = 1, image_key: str = "png", caption_key: str = "txt", shuffle_buffer: int = 256):
        self.urls = list(urls)
        self.batch_size = batch_size
        self.resolution = resolution
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.image_key, self.caption_key = image_key, caption_key
        self.shuffle_buffer = shuffle_buffer
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
        dataset = wds.WebDataset(mine, shardshuffle=False, empty_check=False)
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

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[torch.Tensor, str]]:
        rng = random.Random(self.seed * 7919 + epoch * 104_729 + self.rank)
        buffer: list = []
        for sample in self._raw_samples(epoch):
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield self._decode(buffer.pop(rng.randrange(len(buffer))))
        while buffer:
            yield self._decode(buffer.pop(rng.randrange(len(buffer))))

    def __iter__(self) -> Iterator[dict]:
        images: list[torch.Tensor] = []
        captions: list[str] = []
        while True:
            seen = 0
            for image, caption in self._epoch_samples(self.epoch):
                seen += 1
                if seen <= self.consumed:
                    continue  # resuming: these were handed out before the checkpoint
                images.append(image)
                captions.append(caption)
                self.consumed += 1
                if len(images) == self.batch_size:
                    yield {"pixels": torch.stack(images), "captions": captions}
                    images, captions = [], []
            if seen == 0:
                raise ValueError(f"rank {self.rank} received no samples from shards {self.urls[:3]}...")
            self.epoch += 1
            self.consumed = 0
