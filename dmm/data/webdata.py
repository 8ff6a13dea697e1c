"""(image, caption) pairs from webdataset shards: deterministic, split across ranks, resumable.

Each epoch visits the shards in a seeded order. With at least as many shards as ranks, rank r
reads shards r, r + W, ...; otherwise every rank reads all shards and keeps every W-th sample.
Either way no sample is seen twice in an epoch on different ranks. Every epoch draws a new
shard order and shuffle (resampling), so the stream never ends. The position (epoch, samples
consumed) is part of the training checkpoint, and resuming skips exactly that many samples.

With `num_workers` > 0 a DataLoader's workers share a rank's stream: worker w decodes batches
w, w + K, ... of the same deterministic sequence and the loader hands them back in order, so the
batches (and the saved position) are exactly those of `num_workers=0`.

With `buckets` (see `dmm.data.buckets`) each sample goes to the bucket nearest its aspect ratio
and a batch is handed out when one bucket holds `batch_size` samples, so every batch has one
shape; what is left in the buckets at an epoch's end is dropped (the next epoch reshuffles). The
grouping is a function of the epoch's sample order, so the saved position is the same (epoch,
samples consumed): resuming replays the epoch's bucket choices from image headers, no decoding.

A shard or sample that cannot be read stops training with a `DataError` naming the shard and
the sample key (a missing image or caption, an undecodable image, a garbage or truncated tar),
also from DataLoader workers, instead of a bare KeyError or tarfile error.
"""

from __future__ import annotations

import glob
import io
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dmm.data.buckets import Bucket, cover_crop, nearest_bucket


class DataError(ValueError):
    """A shard or sample that cannot be used; the message names the shard, the sample and the fix."""


GLOB_CHARS = "*?["
TAR_BLOCK = 512


def _check_tar_size(path: str) -> None:
    """A plain .tar is a whole number of 512-byte blocks: anything else was cut short (cheap: one stat)."""
    if not path.endswith(".tar"):
        return
    size = Path(path).stat().st_size
    if size == 0:
        raise DataError(f"data: shard {path} is empty (0 bytes); re-write it or remove it from data.shards")
    if size % TAR_BLOCK:
        raise DataError(f"data: shard {path} is {size} bytes, not a whole number of {TAR_BLOCK}-byte tar blocks: "
                        "it is truncated; re-write it or remove it from data.shards")


def expand_urls(patterns: list[str]) -> list[str]:
    """Shard paths from `data.shards`: plain paths, brace patterns (`shard-{0000..0099}.tar`) and
    glob patterns (`/data/*.tar`, expanded sorted; one that matches nothing is refused)."""
    urls: list[str] = []
    for pattern in patterns:
        expanded = list(wds.shardlists.expand_urls(pattern)) if "{" in pattern else [pattern]
        for url in expanded:
            if "://" in url:
                urls.append(url)
                continue
            if not Path(url).is_file() and any(c in url for c in GLOB_CHARS):
                matches = sorted(m for m in glob.glob(url) if Path(m).is_file())
                if not matches:
                    shown = repr(pattern) + (f" ({url})" if url != pattern else "")
                    raise FileNotFoundError(f"data.shards: {shown} matches no file; check the path and pattern")
                urls.extend(matches)
                continue
            if not Path(url).is_file():
                raise FileNotFoundError(f"data shard not found: {url}")
            urls.append(url)
    if not urls:
        raise ValueError("no data shards given: set data.shards to webdataset tar files")
    for url in urls:
        if "://" not in url:
            _check_tar_size(url)
    return urls


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize, scale to [-1, 1], CHW."""
    return prepare_image(image, resolution)[0]


def prepare_image(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(pixels as `to_tensor` makes them, SDXL size ids): the ids are (original height, width, crop
    top, left, target height, width), the crop's corner in target pixels, as SDXL was trained."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    ids = (h, w, round(top * resolution / side), round(left * resolution / side), resolution, resolution)
    return torch.from_numpy(array).permute(2, 0, 1), ids


def prepare_in_bucket(image: Image.Image, bucket: Bucket, crop: str = "center", seed: int = 0,
                      key: str = "") -> tuple[torch.Tensor, tuple[int, ...]]:
    """(pixels, SDXL size ids) of an image resized to cover `bucket` and cut to it, in one
    resampling (the crop's box in the original image)."""
    image = image.convert("RGB")
    w, h = image.size
    (rh, rw), (top, left) = cover_crop(h, w, bucket, crop, seed, key)
    bh, bw = bucket
    if (h, w) != (bh, bw):
        box = (left * w / rw, top * h / rh, (left + bw) * w / rw, (top + bh) * h / rh)
        image = image.resize((bw, bh), Image.BICUBIC, box=box)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1), (h, w, top, left, bh, bw)


class ShardStream:
    def __init__(self, urls: list[str], *, batch_size: int, resolution: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, image_key: str = "png", caption_key: str = "txt", shuffle_buffer: int = 256,
                 num_workers: int = 0, buckets: list[Bucket] | None = None, bucket_crop: str = "center"):
        self.urls = list(urls)
        self.batch_size = batch_size
        self.resolution = resolution
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.image_key, self.caption_key = image_key, caption_key
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self.bucket_crop = bucket_crop
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
        i = 0
        for url in mine:  # one shard at a time, so that a broken one is named
            # No node/worker splitting inside webdataset: ranks are split above, workers in __iter__.
            dataset = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None,
                                     workersplitter=None)
            try:
                for sample in dataset:
                    if by_shard or i % self.world_size == self.rank:
                        yield sample
                    i += 1
            except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as err:
                reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
                raise DataError(f"data: shard {url}: not a readable tar file ({reason}); re-write it or remove "
                                "it from data.shards") from None

    def _image(self, sample: dict, prepare):
        """`prepare(PIL image)` of the sample's image (opening reads the header only), or a DataError."""
        where = f"data: shard {sample.get('__url__')}, sample {sample.get('__key__')}"
        if self.image_key not in sample:
            keys = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            raise DataError(f"{where}: no {self.image_key!r} image (keys: {keys}); set data.image_key")
        try:
            return prepare(Image.open(io.BytesIO(sample[self.image_key])))
        except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data
            raise DataError(f"{where}: {self.image_key!r} is not a readable image ({' '.join(str(err).split())}); "
                            "re-write this sample or drop the shard") from None

    def _bucket_of(self, sample: dict) -> Bucket:
        return self._image(sample, lambda im: nearest_bucket(im.size[1], im.size[0], self.buckets))

    def _prepare(self, image: Image.Image, key: str) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.buckets is None:
            return prepare_image(image, self.resolution)
        bucket = nearest_bucket(image.size[1], image.size[0], self.buckets)
        return prepare_in_bucket(image, bucket, self.bucket_crop, self.seed, key)

    def _decode(self, sample: dict) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        where = f"data: shard {sample.get('__url__')}, sample {sample.get('__key__')}"
        image, ids = self._image(sample, lambda im: self._prepare(im, str(sample.get("__key__"))))
        if self.caption_key not in sample:
            keys = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            raise DataError(f"{where}: no {self.caption_key!r} caption (keys: {keys}); set data.caption_key")
        caption = sample[self.caption_key]
        try:
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
            if self.caption_key == "json":
                caption = json.loads(caption)["caption"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{where}: cannot read a caption from {self.caption_key!r} ({type(err).__name__}: "
                            f"{err}); a json caption is {{\"caption\": ...}}, text is UTF-8") from None
        return image, caption, ids

    def _collate(self, decoded: list) -> dict:
        """One batch: pixels, captions and each sample's SDXL size ids (original, crop, target)."""
        return {"pixels": torch.stack([d[0] for d in decoded]), "captions": [d[1] for d in decoded],
                "size_ids": torch.tensor([d[2] for d in decoded], dtype=torch.long)}

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
        if self.buckets:
            yield from self._bucketed_batches(keep)
            return
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
                        batch = self._collate([self._decode(x) for x in pending])
                    yield batch, epoch, consumed
                    index += 1
                    pending = []
            if seen == 0:
                raise DataError(f"data: rank {self.rank} received no samples from shards {self.urls[:3]}...")
            epoch += 1
            consumed = 0

    def _bucketed_batches(self, keep=None) -> Iterator[tuple[dict | None, int, int]]:
        """As `_positioned_batches`, a batch being the first `batch_size` samples of one bucket;
        `consumed` is the stream position at the sample that filled it. Resuming replays the
        epoch up to the saved position (bucket choices only), which refills the partial buckets."""
        epoch, consumed = self.epoch, self.consumed
        index = 0
        while True:
            pending: dict[Bucket, list] = {}
            seen = made = 0
            for sample in self._epoch_samples(epoch):
                seen += 1
                bucket = self._bucket_of(sample)
                group = pending.setdefault(bucket, [])
                group.append(sample)
                if len(group) < self.batch_size:
                    continue
                del pending[bucket]
                made += 1
                if seen <= consumed:
                    continue  # resuming: handed out before the checkpoint
                batch = None
                if keep is None or keep(index):
                    batch = self._collate([self._decode(x) for x in group])
                yield batch, epoch, seen
                index += 1
            if seen == 0:
                raise DataError(f"data: rank {self.rank} received no samples from shards {self.urls[:3]}...")
            if made == 0:
                raise DataError(f"data: rank {self.rank} has {seen} samples per epoch but no bucket of "
                                f"{self.buckets} gets {self.batch_size} of them; use fewer buckets, a smaller "
                                "data.batch_size or more data")
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
            if "_error" in item:  # a worker's DataError, without the worker's traceback
                raise DataError(item["_error"])
            self.epoch, self.consumed = int(item.pop("_epoch")), int(item.pop("_consumed"))
            yield item


class _WorkerShare(torch.utils.data.IterableDataset):
    """One rank's stream as seen by DataLoader worker w of K: it decodes batches w, w + K, ..."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for batch, epoch, consumed in self.stream._positioned_batches(keep=lambda i: i % k == w):
                if batch is not None:
                    yield {**batch, "_epoch": epoch, "_consumed": consumed}
        except DataError as err:
            yield {"_error": str(err)}
