"""Precomputed training inputs: the manifest that says what made them, and the stream that reads them.

`python -m dmm.data.precompute` turns (image, caption) shards into one output shard per input
shard, same sample keys, same order. Each sample holds `<key>.safetensors` (the VAE latents, the
SDXL size ids, the base's conditioning and that of every teacher with its own text encoders) and
`<key>.json` (the caption). `empty.safetensors` holds the conditioning of "" once per shard set:
caption dropout replaces a sample's conditioning by it, so the generator draws are the same as
when encoding on the fly. Because the output shards mirror the input shards, `LatentStream` (a
`ShardStream` that decodes tensors instead of images) visits the samples in exactly the order,
batches and resume positions of training from the images.

`manifest.json` records the fields a recipe must match (`recipe_fields`); training refuses a
folder whose manifest differs and names the field. It also records the memory layout the VAE
gives its latents (`latents_layout`; channels-last on CPU): the UNet's CPU convolutions take
another path for another layout, so batches are handed out in the VAE's own layout.

With `data.buckets` the manifest records the buckets (and the crop; the seed for random crops),
each sample's `<key>.json` its bucket, and `LatentStream` groups samples into batches by that
bucket exactly as `ShardStream` groups the images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from dmm.conditioning import Conditioning
from dmm.data.buckets import recipe_buckets
from dmm.data.sources import source_name
from dmm.data.webdata import DataError, ShardStream

FORMAT = 1
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
TENSORS, META = "safetensors", "json"  # the two files of a precomputed sample
CHANNELS_LAST = "channels_last"
BASE = "base"  # tensor name prefix of the base's (the student's) conditioning
# Files of the base whose configs fingerprint it (weights are not hashed: too slow for SDXL).
BASE_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json")


class PrecomputedError(ValueError):
    """A precomputed folder that does not fit the recipe; the message names the field and the fix."""


def teacher_prefix(index: int) -> str:
    return f"teacher{index}"


def base_configs_hash(base: str | Path) -> str:
    digest = hashlib.sha256()
    for name in BASE_CONFIGS:
        path = Path(base) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def teacher_fields(recipe, index: int) -> dict:
    """What identifies a teacher whose own text encoders made a part of the conditioning."""
    spec = recipe.teachers[index]
    return {"name": spec.name, "path": spec.path, "format": spec.format, "lora": getattr(spec, "lora", ""),
            "text_encoder": getattr(spec, "text_encoder", "auto"), "dtype": recipe.model.teacher_dtype}


def recipe_fields(recipe, own_teachers) -> dict:
    """The manifest fields that must equal the recipe's (own_teachers: indices of the teachers
    conditioned through their own text encoders)."""
    data = recipe.data
    source = source_name(data)
    inputs = dataclasses.asdict(data.toyworld) if source == "toyworld" else list(data.shards)
    return {
        "format": FORMAT,
        "base": {"path": recipe.model.base, "configs_sha256": base_configs_hash(recipe.model.base)},
        "resolution": data.resolution,
        "data": {"source": source, "inputs": inputs, "image_key": data.image_key, "caption_key": data.caption_key},
        "own_text_encoders": {str(i): teacher_fields(recipe, i) for i in sorted(own_teachers)},
        **bucket_fields(recipe),
    }


def bucket_fields(recipe) -> dict:
    """Manifest fields of bucketed inputs (null without buckets, as a folder made before buckets reads)."""
    buckets = recipe_buckets(recipe)
    if not buckets:
        return {"buckets": None}
    crop = {"crop": recipe.data.bucket_crop}
    if recipe.data.bucket_crop == "random":
        crop["seed"] = recipe.train.seed  # the crops depend on it
    return {"buckets": {"sizes": [list(b) for b in buckets], **crop}}


def first_difference(ours, theirs, key: str = "") -> tuple[str, object, object] | None:
    """(dotted key, our value, their value) of the first field that differs, or None."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs)):
            found = first_difference(ours.get(k), theirs.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    return None if ours == theirs else (key, ours, theirs)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PrecomputedError(f"data.precomputed: {folder} has no {MANIFEST}; make the folder with "
                               "`python -m dmm.data.precompute --recipe RECIPE --out FOLDER`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrecomputedError(f"data.precomputed: {path} is not valid JSON ({err}); re-run the precompute "
                               "command into this folder") from None


def check_fields(manifest: dict, fields: dict, folder: str | Path, what: str = "data.precomputed") -> None:
    """Refuse a manifest made for another recipe, naming the first differing field."""
    theirs = {k: manifest.get(k) for k in fields}
    found = first_difference(fields, theirs)
    if found is not None:
        key, ours, got = found
        raise PrecomputedError(
            f"{what}: {folder} was made for another recipe: manifest field {key} is {got!r}, the recipe gives "
            f"{ours!r}; re-run `python -m dmm.data.precompute` with this recipe into a new folder")


def check_manifest(folder: str | Path, recipe, own_teachers=None, loaded=None) -> dict:
    """The manifest of a complete folder made for `recipe`. `own_teachers`: the teachers that bring
    their own text encoders as the teacher pool loaded them; `loaded`: the teachers this process
    loaded (default all); None: not known yet (only the manifest's own entries are checked)."""
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise PrecomputedError(f"data.precomputed: {folder} is not finished (its precompute run stopped "
                               "early); run the precompute command again with the same --out to complete it")
    listed = set(own_teachers_of(manifest))
    if own_teachers is None:
        own = {i for i in listed if i < len(recipe.teachers)}
    else:
        others = listed - set(range(len(recipe.teachers)) if loaded is None else loaded)
        own = others | set(own_teachers)
    check_fields(manifest, recipe_fields(recipe, own), folder)
    return manifest


def latents_layout(latents: torch.Tensor) -> str:
    """How the VAE laid out a batch of latents in memory (recorded in the manifest)."""
    if not latents.is_contiguous() and latents.is_contiguous(memory_format=torch.channels_last):
        return CHANNELS_LAST
    return "contiguous"


def own_teachers_of(manifest: dict) -> list[int]:
    return sorted(int(i) for i in manifest.get("own_text_encoders", {}))


class LatentStream(ShardStream):
    """The training stream over precomputed shards: batches of latents, size ids, captions and
    conditioning tensors (`base.hidden`, `base.pooled`, `teacher<i>.hidden`, ...), in the order
    a `ShardStream` over the source shards would give (same seed, ranks, buffer, resume)."""

    def __init__(self, urls, **kwargs):
        kwargs.update(image_key=TENSORS, caption_key=META)
        super().__init__(urls, **kwargs)
        folder = Path(self.urls[0]).parent
        self.empty = load_file(str(folder / EMPTY))
        manifest = read_manifest(folder)
        self.channels_last = manifest.get("latents_layout") == CHANNELS_LAST
        if manifest.get("buckets"):
            self.buckets = [tuple(b) for b in manifest["buckets"]["sizes"]]

    def _bucket_of(self, sample: dict):
        try:
            return tuple(json.loads(sample[META])["bucket"])
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"data: precomputed shard {sample.get('__url__')}, sample {sample.get('__key__')}: "
                            f"no bucket in its {META} ({type(err).__name__}: {err}); re-run the precompute "
                            "command with this recipe into a new folder") from None

    def _decode(self, sample: dict):
        where = f"data: precomputed shard {sample.get('__url__')}, sample {sample.get('__key__')}"
        try:
            tensors = load_tensors(sample[TENSORS])
            caption = json.loads(sample[META])["caption"]
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{where}: unreadable ({type(err).__name__}: {err}); re-run the precompute command "
                            "after deleting this shard") from None
        return tensors, caption

    def _collate(self, decoded: list) -> dict:
        batch = {name: torch.stack([d[0][name] for d in decoded]) for name in decoded[0][0]}
        if self.channels_last:
            batch["latents"] = batch["latents"].contiguous(memory_format=torch.channels_last)
        batch["captions"] = [d[1] for d in decoded]
        return batch

    def conditioning(self, batch: dict, prefix: str, captions: list[str], device=None) -> Conditioning:
        """The conditioning of `prefix` (base or teacher<i>) for the batch after caption dropout:
        a dropped caption ("") gets the stored "" conditioning, exactly what encoding "" gives."""
        hidden = batch[f"{prefix}.hidden"].clone()
        pooled = batch.get(f"{prefix}.pooled")
        pooled = None if pooled is None else pooled.clone()
        for j, caption in enumerate(captions):
            if caption == "":
                hidden[j] = self.empty[f"{prefix}.hidden"]
                if pooled is not None:
                    pooled[j] = self.empty[f"{prefix}.pooled"]
        if pooled is None:
            return Conditioning(hidden.to(device), None)
        return Conditioning(hidden.to(device), {"text_embeds": pooled.to(device),
                                                "time_ids": batch["size_ids"].to(device, torch.float32)})


__all__ = ["BASE", "EMPTY", "MANIFEST", "LatentStream", "PrecomputedError", "check_manifest", "own_teachers_of",
           "recipe_fields", "teacher_prefix"]
