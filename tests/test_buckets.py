"""Aspect-ratio buckets: presets and checks, nearest-ratio assignment, cover-and-crop with SDXL
size ids, one shape per batch, exact resume, and precomputed bucketed inputs equal to encoding
the images on the fly."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dmm.data import DataError, ShardStream
from dmm.data.buckets import cover_crop, largest_side, nearest_bucket, resolve_buckets
from dmm.data.latents import LatentStream, PrecomputedError, check_manifest
from dmm.data.webdata import prepare_in_bucket
from dmm.recipes import RecipeError, parse_recipe
from dmm.schema import ConfigError
from dmm.testing import build_tiny_world, tiny_recipe_dict

B = [(16, 16), (16, 32), (32, 16)]  # (height, width) buckets of the 16 px tiny world
SIZES = [(16, 16), (20, 40), (40, 20), (50, 100), (60, 100), (30, 31), (64, 30), (17, 35)]  # (h, w)


def write_shards(folder, n: int, per_shard: int, seed: int = 0) -> list[str]:
    """Webdataset shards of random images of the (h, w) in SIZES, captions naming the sample."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(s, min(n, s + per_shard)):
                h, w = SIZES[k % len(SIZES)]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"sample {k:03d} red cat".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- presets and checks
def test_presets_scale_to_the_resolution_and_lists_are_checked():
    assert resolve_buckets("sd15", 512, 64) == [(512, 512), (512, 768), (768, 512)]
    sdxl = resolve_buckets("sdxl", 1024, 64)
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1536, 640) in sdxl and len(sdxl) == 9
    assert all(0.9 < h * w / 1024**2 < 1.06 for h, w in sdxl)  # ~1 megapixel each
    assert resolve_buckets("sd15", 32) == [(32, 32), (32, 48), (48, 32)]  # the toy world's scale
    assert resolve_buckets([[16, 32], [32, 16]], 16) == [(16, 32), (32, 16)]
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]: 500x512 is not a multiple of 64"):
        resolve_buckets([[512, 512], [500, 512]], 512, 64)
    with pytest.raises(ConfigError, match=r"expected \[height, width\]"):
        resolve_buckets([[512]], 512)
    with pytest.raises(ConfigError, match=r"unknown bucket preset 'sd16'.*did you mean 'sd15'"):
        resolve_buckets("sd16", 512)
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_buckets([[16, 16], [16, 16]], 16)


def test_the_recipe_checks_buckets_against_the_architecture(tmp_path):
    raw = {"name": "r", "model": {"base": str(tmp_path), "arch": "sd15"}, "teachers": [{"name": "a", "path": "x"}],
           "data": {"shards": ["s.tar"], "resolution": 512, "buckets": [[512, 512], [512, 776]]},
           "train": {"output_dir": str(tmp_path / "run")}}
    with pytest.raises(RecipeError, match=r"512x776 is not a multiple of 64.*round each side"):
        parse_recipe(raw)
    raw["data"]["buckets"] = "sd15"
    recipe = parse_recipe(raw)
    assert recipe.data.buckets == "sd15" and largest_side(recipe) == 628  # sqrt(512 * 768) rounded up
    raw["data"]["buckets"] = None
    assert largest_side(parse_recipe(raw)) == 512


# ----------------------------------------------------------------------------- assignment and crop
def test_nearest_bucket_and_cover_crop_by_hand():
    assert nearest_bucket(50, 100, B) == (16, 32)  # 2:1 landscape
    assert nearest_bucket(100, 50, B) == (32, 16)
    assert nearest_bucket(30, 31, B) == (16, 16)
    assert nearest_bucket(64, 30, B) == (32, 16)
    assert nearest_bucket(16, 16, [(16, 32), (32, 16)]) == (16, 32)  # a tie: the first listed
    # 60x100 into 16x32: scale max(16/60, 32/100) = 0.32 -> 19.2 x 32 -> 19 x 32, centre crop 1 row down
    assert cover_crop(60, 100, (16, 32)) == ((19, 32), (1, 0))
    assert cover_crop(100, 50, (32, 16)) == ((32, 16), (0, 0))
    drawn = {cover_crop(60, 100, (16, 32), "random", seed=3, key=f"k{i}")[1] for i in range(40)}
    assert drawn <= {(0, 0), (1, 0), (2, 0), (3, 0)} and len(drawn) > 1
    assert cover_crop(60, 100, (16, 32), "random", 3, "k1") == cover_crop(60, 100, (16, 32), "random", 3, "k1")


def test_sdxl_size_ids_of_a_hand_made_image():
    """A 100 wide x 50 high image into the 2:1 bucket: (original h, w, crop top, left, target h, w)."""
    ramp = np.tile(np.linspace(0, 255, 100, dtype=np.float32), (50, 1))
    image = Image.fromarray(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 90)], -1).astype(np.uint8))
    pixels, ids = prepare_in_bucket(image, (16, 32))
    assert ids == (50, 100, 0, 0, 16, 32) and pixels.shape == (3, 16, 32)
    plain = np.asarray(image.resize((32, 16), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(pixels, torch.from_numpy(plain).permute(2, 0, 1))  # no crop: a plain resize
    # Taller (60 rows): cover gives 19 rows, the centre crop starts 1 row down; the one-step
    # resample matches resize-then-crop up to interpolation.
    tall = image.resize((100, 60), Image.NEAREST)
    pixels, ids = prepare_in_bucket(tall, (16, 32))
    assert ids == (60, 100, 1, 0, 16, 32)
    two_step = np.asarray(tall.resize((32, 19), Image.BICUBIC), dtype=np.float32)[1:17] / 127.5 - 1.0
    assert (pixels - torch.from_numpy(two_step).permute(2, 0, 1)).abs().mean() < 0.03


# ----------------------------------------------------------------------------- the stream
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("bucket_shards"), n=40, per_shard=10)


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return (a["captions"] == b["captions"] and torch.equal(a["size_ids"], b["size_ids"])
            and torch.equal(a["pixels"], b["pixels"]))


def test_every_batch_is_one_bucket_and_an_epoch_repeats_no_sample(shards):
    stream = ShardStream(shards, batch_size=3, resolution=16, seed=5, shuffle_buffer=8, buckets=B)
    batches, epochs = [], []
    for batch in _take(stream, 14):  # 40 samples: 12 per epoch at most, so past an epoch boundary
        batches.append(batch)
        epochs.append(stream.epoch)
    assert epochs[-1] >= 1
    for batch in batches:
        shape = tuple(batch["pixels"].shape[-2:])
        assert shape in B and batch["pixels"].shape[0] == 3
        assert batch["size_ids"][:, 4:].tolist() == [list(shape)] * 3  # target size = the bucket
        for (h, w, *_), caption in zip(batch["size_ids"].tolist(), batch["captions"]):
            k = int(caption.split()[1])
            assert (h, w) == SIZES[k % len(SIZES)] and nearest_bucket(h, w, B) == shape
    first = [c for b, e in zip(batches, epochs) if e == 0 for c in b["captions"]]
    assert len(first) == len(set(first))
    assert {tuple(b["pixels"].shape[-2:]) for b in batches} == set(B)


def test_resume_mid_epoch_is_exact_and_workers_agree(shards):
    kwargs = dict(batch_size=3, resolution=16, seed=2, shuffle_buffer=8, buckets=B, rank=1, world_size=2)
    whole = _take(ShardStream(shards, **kwargs), 9)
    first = ShardStream(shards, **kwargs)
    _take(first, 4)
    state = first.state_dict()
    assert state["epoch"] == 0 and 0 < state["consumed"] < 20
    resumed = ShardStream(shards, **kwargs)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(_take(resumed, 5), whole[4:]))
    workers = ShardStream(shards, **kwargs, num_workers=2)
    workers.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(_take(workers, 5), whole[4:]))
    assert workers.state_dict() == resumed.state_dict()


def test_random_crops_are_fixed_per_sample_and_too_few_samples_are_named(shards):
    kwargs = dict(batch_size=2, resolution=16, seed=4, shuffle_buffer=0, buckets=B, bucket_crop="random")
    a, b = _take(ShardStream(shards, **kwargs), 6), _take(ShardStream(shards, **kwargs), 6)
    assert all(_same(x, y) for x, y in zip(a, b))
    crops = {tuple(ids[2:4]) for batch in a for ids in batch["size_ids"].tolist()}
    assert len(crops) > 1
    with pytest.raises(DataError, match=r"no bucket of .* gets 40 of them"):
        next(iter(ShardStream(shards, batch_size=40, resolution=16, buckets=B)))


# ----------------------------------------------------------------------------- precomputed inputs
@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    from dmm.data.precompute import precompute

    root = tmp_path_factory.mktemp("bucket_world")
    world = build_tiny_world(root / "w", "sdxl", teachers=("a", "b"), n_samples=8, per_shard=8)
    urls = write_shards(root / "shards", n=24, per_shard=8, seed=1)
    raw = tiny_recipe_dict(world, root / "run", data={"shards": urls, "buckets": [list(b) for b in B],
                                                        "shuffle_buffer": 8, "batch_size": 2})
    out = root / "latents"
    manifest = precompute(parse_recipe(raw), out, chunk=5, progress=False)
    return world, raw, out, manifest


def test_precomputed_buckets_equal_the_images_encoded_on_the_fly(bucketed):
    from dmm.conditioning import FrozenPipeline

    world, raw, out, manifest = bucketed
    assert manifest["buckets"] == {"sizes": [list(b) for b in B], "crop": "center"} and manifest["samples"] == 24
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    kwargs = dict(batch_size=2, resolution=16, seed=3, shuffle_buffer=8)
    images = ShardStream(raw["data"]["shards"], **kwargs, buckets=B)
    latents = LatentStream(urls, **kwargs)  # the buckets come from the manifest
    base = FrozenPipeline(world.base, resolution=16)
    shapes = set()
    for a, b in zip(_take(images, 10), _take(latents, 10)):  # 12 batches per epoch at most: past one
        assert a["captions"] == b["captions"] and torch.equal(a["size_ids"], b["size_ids"])
        assert torch.equal(base.encode_images(a["pixels"]), b["latents"])
        shapes.add(tuple(b["latents"].shape[-2:]))
    assert len(shapes) == 3
    assert images.state_dict() == latents.state_dict()
    plain = parse_recipe({**raw, "data": {**raw["data"], "buckets": None}})
    with pytest.raises(PrecomputedError, match="manifest field buckets"):
        check_manifest(out, plain)


@pytest.mark.slow
def test_training_from_bucketed_precomputed_inputs_equals_training_from_images(bucketed, tmp_path):
    """Three steps on batches of different shapes: identical losses and weights, bitwise; each run
    reads the stream its trainer built from the recipe."""
    from dmm.train.trainer import DistillationTrainer

    _, raw, out, _ = bucketed
    runs = {}
    for name, extra in (("images", {}), ("latents", {"precomputed": str(out)})):
        recipe = parse_recipe({**raw, "data": {**raw["data"], "caption_dropout": 0.5, **extra},
                               "loss": {"lambda_feat": 0.01, "lambda_adv": 0.1},
                               "train": {**raw["train"], "output_dir": str(tmp_path / name)}})
        trainer = DistillationTrainer(recipe)
        data = iter(trainer.stream)
        batches = [next(data) for _ in range(3)]
        runs[name] = (trainer, [trainer.train_step(b) for b in batches], {tuple(b["size_ids"][0, 4:].tolist())
                                                                          for b in batches})
    (a, ma, sa_shapes), (b, mb, sb_shapes) = runs["images"], runs["latents"]
    assert sa_shapes == sb_shapes and len(sa_shapes) > 1
    assert ma == mb
    sa, sb = a.student_state_dict(), b.student_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- dry run
def test_dry_run_sizes_activations_at_the_largest_bucket():
    from pathlib import Path

    from dmm.recipes import load_recipe
    from dmm.train.dryrun import parse_memory, plan, render

    path = Path(__file__).resolve().parents[1] / "recipes" / "sd15_8.yaml"
    square = plan(load_recipe(path, ["data.buckets=null"]), 8, parse_memory("80GiB"))
    bucketed = plan(load_recipe(path, ["data.buckets=sd15"]), 8, parse_memory("80GiB"))
    as_square = plan(load_recipe(path, ["data.buckets=null", "data.resolution=628"]), 8, parse_memory("80GiB"))
    assert bucketed.act == as_square.act and bucketed.act.student > square.act.student
    assert "largest one's area, 628 px square" in render(bucketed)
