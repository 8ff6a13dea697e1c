"""Precompute training inputs once: VAE latents and text conditioning instead of images and captions.

    python -m dmm.data.precompute --recipe R --out DIR [--set key=value ...]
    torchrun --nproc_per_node N -m dmm.data.precompute --recipe R --out DIR

Reads `model.base`, `teachers` and `data.*` from the recipe and encodes with the very objects
training uses (`FrozenPipeline.encode_images`, one `CaptionEncoder` for the base and one per
teacher with its own text encoders, built as the trainer builds them), so the tensors equal what
training computes from the images. Train on the folder with `data.precomputed: DIR`.

Output shard k mirrors input shard k (see `dmm.data.latents`). Each rank writes shards k with
k % world_size == rank. Every shard is written atomically, so a stopped run resumes where it was:
finished shards are kept, a half-written one is redone. The manifest is written first as
unfinished (a rerun into the same folder with another recipe is refused), and marked complete
with the sample counts once every shard exists.

On CPU a convolution over a batch of ONE image takes another path than over two or more (the
last bits differ), while any batch of two or more gives each image the same latents whatever
its partners: images are encoded in chunks of `--batch-size`, a lone last image with a copy of itself.
With `data.buckets` a chunk is encoded one bucket shape at a time (a lone image of a shape with a
copy of itself), and each sample's json records its bucket.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import save as tensors_bytes
from tqdm.auto import tqdm

from dmm.conditioning import CaptionEncoder, Conditioning, FrozenPipeline
from dmm.data.buckets import check_multiple, recipe_buckets
from dmm.data.latents import (
    BASE,
    EMPTY,
    MANIFEST,
    META,
    TENSORS,
    check_fields,
    latents_layout,
    read_manifest,
    recipe_fields,
    teacher_prefix,
)
from dmm.data.sources import DATA_SOURCES, source_name, writes_files
from dmm.data.webdata import ShardStream
from dmm.distributed import agree
from dmm.distributed.env import init_process_group
from dmm.io import atomic_file, atomic_save_safetensors, atomic_write_json, make_dir
from dmm.recipes import Recipe, load_recipe
from dmm.schema import ConfigError
from dmm.teachers import load_teacher

log = logging.getLogger("dmm.precompute")


def output_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def input_shards(recipe: Recipe, rank: int, world_size: int, barrier) -> list[str]:
    """The recipe's source shards; a source that writes them (the toy world) runs on rank 0 first,
    in the cache folder training uses, so training and precompute share one rendering."""
    name = source_name(recipe.data)
    wait = writes_files(name) and world_size > 1
    if wait and rank:
        barrier()
    urls = DATA_SOURCES.get(name).obj(recipe.data, Path(recipe.train.output_dir).parent / ".shards")
    if wait and not rank:
        barrier()
    return urls


def caption_encoders(recipe: Recipe, base: FrozenPipeline) -> dict[str, CaptionEncoder]:
    """Tensor prefix -> encoder: the base's, and each teacher's own where the teacher pool gives it
    some (loaded as the trainer loads it; the teacher UNet is dropped right away)."""
    encoders = {BASE: base.captions}
    for i, spec in enumerate(recipe.teachers):
        teacher = load_teacher(i, spec, base=recipe.model.base, student_base=base.unet,
                               dtype=recipe.model.teacher_dtype, default_prediction_type=base.prediction_type)
        te, te2 = getattr(teacher, "text_encoder", None), getattr(teacher, "text_encoder_2", None)
        if te is not None or te2 is not None:
            encoders[teacher_prefix(i)] = base.captions.with_encoders(te, te2)
        del teacher
    return encoders


def cond_tensors(prefix: str, cond: Conditioning, row: int) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.hidden": cond.encoder_hidden_states[row]}
    if cond.added_cond_kwargs is not None:
        out[f"{prefix}.pooled"] = cond.added_cond_kwargs["text_embeds"][row]
    return out


def encode_chunk(base: FrozenPipeline, encoders: dict[str, CaptionEncoder], pixels: list[torch.Tensor],
                 captions: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per sample: latents and every encoder's conditioning (see the module note on chunks of one)."""
    batch = torch.stack(pixels if len(pixels) > 1 else pixels * 2)
    latents = base.encode_images(batch)[: len(pixels)]
    conds = {prefix: enc.encode(captions) for prefix, enc in encoders.items()}
    samples = []
    for j in range(len(pixels)):
        tensors = {"latents": latents[j]}
        for prefix, cond in conds.items():
            tensors.update(cond_tensors(prefix, cond, j))
        samples.append(tensors)
    return samples


def write_shard(url: str, target: Path, recipe: Recipe, base: FrozenPipeline, encoders: dict[str, CaptionEncoder],
                chunk: int, bar) -> int:
    """Encode one input shard into `target` (atomically); returns its sample count."""
    d = recipe.data
    buckets = recipe_buckets(recipe)
    reader = ShardStream([url], batch_size=1, resolution=d.resolution, image_key=d.image_key,
                         caption_key=d.caption_key, shuffle_buffer=0, seed=recipe.train.seed, buckets=buckets,
                         bucket_crop=d.bucket_crop)
    count = 0
    with atomic_file(target) as tmp, tarfile.open(tmp, "w") as tar:
        pending: list = []

        def flush():
            shapes: dict[tuple, list[int]] = {}  # one VAE call per bucket shape
            for j, p in enumerate(pending):
                shapes.setdefault(tuple(p[1].shape), []).append(j)
            encoded: list = [None] * len(pending)
            for rows in shapes.values():
                out = encode_chunk(base, encoders, [pending[j][1] for j in rows], [pending[j][2] for j in rows])
                for j, tensors in zip(rows, out):
                    encoded[j] = tensors
            for (key, pixels, caption, ids), tensors in zip(pending, encoded):
                tensors["size_ids"] = torch.tensor(ids, dtype=torch.long)
                stored = {k: v.contiguous().clone() for k, v in tensors.items()}
                meta = json_bytes({"caption": caption, **({"bucket": list(pixels.shape[-2:])} if buckets else {})})
                for ext, data in ((TENSORS, tensors_bytes(stored)), (META, meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            bar.update(len(pending))
            pending.clear()

        for sample in reader._raw_samples(0):  # one pass in the shard's own order
            pixels, caption, ids = reader._decode(sample)
            pending.append((sample["__key__"], pixels, caption, ids))
            count += 1
            if len(pending) == chunk:
                flush()
        if pending:
            flush()
    return count


def downsampling(base: FrozenPipeline) -> int:
    """Pixels per UNet bottleneck cell: the VAE's factor times the UNet's down blocks that halve."""
    vae = 2 ** (len(base.pipe.vae.config.block_out_channels) - 1)
    return vae * 2 ** (len(base.unet.config.down_block_types) - 1)


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def shard_count(path: Path) -> int:
    with tarfile.open(path) as tar:
        return sum(1 for name in tar.getnames() if name.endswith("." + TENSORS))


def precompute(recipe: Recipe, out: str | Path, *, chunk: int = 16, rank: int = 0, world_size: int = 1,
               barrier=lambda: None, progress: bool = True) -> dict | None:
    """Write (or finish) the precomputed folder `out`; returns the manifest on rank 0."""
    out = Path(out)
    collective = world_size > 1
    urls = agree(input_shards, recipe, rank, world_size, barrier, what="reading data.shards", collective=collective)
    base = FrozenPipeline(recipe.model.base, resolution=recipe.data.resolution)
    if recipe.model.arch != "auto" and recipe.model.arch != base.arch.name:
        raise ConfigError(f"model.arch is {recipe.model.arch!r} but the base at {recipe.model.base} is "
                          f"{base.arch.name}")
    if recipe_buckets(recipe):
        check_multiple(recipe_buckets(recipe), downsampling(base), f"the base at {recipe.model.base}")
    encoders = agree(caption_encoders, recipe, base, what="loading teachers", collective=collective)
    own = [int(p.removeprefix("teacher")) for p in encoders if p != BASE]
    fields = recipe_fields(recipe, own)
    probe = base.encode_images(torch.zeros(2, 3, recipe.data.resolution, recipe.data.resolution))
    layout = {"latents_layout": latents_layout(probe)}  # what LatentStream hands the UNet

    def start():
        if (out / MANIFEST).is_file():  # resuming: only into a folder made for this recipe
            check_fields(read_manifest(out), fields, out, what=f"precompute --out {out}")
        if not rank and not (out / MANIFEST).is_file():
            atomic_write_json(out / MANIFEST, {**fields, **layout, "complete": False})
        if not rank and not (out / EMPTY).is_file():
            empty = {}
            for prefix, enc in encoders.items():
                empty.update(cond_tensors(prefix, enc.encode([""]), 0))
            atomic_save_safetensors({k: v.contiguous().clone() for k, v in empty.items()}, out / EMPTY)

    make_dir(out)
    agree(start, what="checking the output folder", collective=collective)
    mine = [(k, url) for k, url in enumerate(urls) if k % world_size == rank]
    todo = [(k, url) for k, url in mine if not (out / output_name(k)).is_file()]
    if len(todo) < len(mine):
        log.info("precompute: %d of this rank's %d shards are already done", len(mine) - len(todo), len(mine))

    def encode_mine():
        with tqdm(desc=f"precompute r{rank}" if collective else "precompute", unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            for k, url in todo:
                for stale in out.glob(f".{output_name(k)}.*.tmp"):  # left by a killed run
                    stale.unlink()
                write_shard(url, out / output_name(k), recipe, base, encoders, chunk, bar)

    agree(encode_mine, what="encoding shards", collective=collective)  # also the barrier before the manifest
    if rank:
        return None
    manifest = {**fields, **layout, "complete": True, "samples": 0,
                "shards": [{"name": output_name(k), "input": url, "samples": shard_count(out / output_name(k))}
                           for k, url in enumerate(urls)]}
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmm.data.precompute",
                                     description="Encode a recipe's training shards into VAE latents and text "
                                                 "conditioning (train on them with data.precomputed: OUT).")
    parser.add_argument("--recipe", required=True, help="the training recipe (model.base, teachers, data.*)")
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds a run of this recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VAE call (default 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        info = init_process_group()
        barrier = torch.distributed.barrier if info.distributed else (lambda: None)
        manifest = precompute(recipe, args.out, chunk=args.batch_size, rank=info.rank, world_size=info.world_size,
                              barrier=barrier, progress=True)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if manifest is not None:
        print(f"precompute: {manifest['samples']} samples in {len(manifest['shards'])} shards -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
