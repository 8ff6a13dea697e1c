"""Aspect-ratio buckets: training at several (height, width) shapes, one shape per batch.

`data.buckets` is a list of [height, width] or the name of a preset (`BUCKET_PRESETS`): `sd15`
(the paper's 512x512, 512x768, 768x512) or `sdxl` (SDXL's ~1 megapixel list). A preset is
defined at its model's native resolution and scaled to `data.resolution`, so `sd15` at the toy
world's 32 px gives 32x32, 32x48, 48x32.

Each image goes to the bucket nearest its aspect ratio (in log ratio; the first listed wins a
tie), is resized to cover it and cropped (centre, or at a random corner fixed per sample by the
seed and the sample key, so precomputed latents hold the very crop on-the-fly training makes).
SDXL's size ids are (original height, width, crop top, left, bucket height, width), the crop's
corner in the resized image's pixels, as SDXL was trained.

This module imports no other project module (the recipe checks buckets without the data layer).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from dmm.registry import Registry
from dmm.schema import ConfigError

# An entry is (native resolution, [(height, width), ...]): the buckets at that resolution.
BUCKET_PRESETS = Registry("bucket preset")

BUCKET_PRESETS.add("sd15", (512, [(512, 512), (512, 768), (768, 512)]),
                   description="the paper's SD1.5 buckets: 512x512, 512x768, 768x512 (height x width)")
BUCKET_PRESETS.add("sdxl", (1024, [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
                                   (1344, 768), (768, 1344), (1536, 640), (640, 1536)]),
                   description="SDXL's ~1 megapixel buckets, 1024x1024 to 640x1536 (height x width)")

ARCH_MULTIPLE = {"sd15": 64, "sdxl": 64}  # VAE (8) x UNet downsampling (8) of the real architectures
MIN_MULTIPLE = 8  # any VAE-latent model needs at least this
CROPS = ("center", "random")

Bucket = tuple[int, int]


def _scaled(side: int, factor: float, multiple: int) -> int:
    return max(multiple, int(round(side * factor / multiple)) * multiple)


def resolve_buckets(spec, resolution: int, multiple: int = MIN_MULTIPLE, where: str = "data.buckets") -> list[Bucket]:
    """The (height, width) list of `spec` (a preset name or a list of pairs); refuses a side that is
    not a positive multiple of `multiple` (the model's VAE x UNet downsampling)."""
    if isinstance(spec, str):
        try:
            native, buckets = BUCKET_PRESETS.get(spec).obj
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}; or give a list of [height, width]") from None
        factor = resolution / native
        scaled = [(_scaled(h, factor, multiple), _scaled(w, factor, multiple)) for h, w in buckets]
        return list(dict.fromkeys(scaled))  # a small resolution can merge neighbours
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{where}: expected a preset name ({', '.join(BUCKET_PRESETS.names())}) or a non-empty "
                          f"list of [height, width], got {spec!r}")
    out: list[Bucket] = []
    for i, pair in enumerate(spec):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ConfigError(f"{where}[{i}]: expected [height, width] in pixels, got {pair!r}")
        h, w = pair
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise ConfigError(f"{where}[{i}]: {h}x{w} is not a multiple of {multiple} on both sides (the model "
                              f"downsamples by {multiple}); round each side to a multiple of {multiple}")
        if (h, w) in out:
            raise ConfigError(f"{where}[{i}]: {h}x{w} is listed twice; list each bucket once")
        out.append((h, w))
    return out


def check_multiple(buckets: Sequence[Bucket], multiple: int, what: str) -> None:
    """Refuse buckets the loaded model cannot take (`what` names the model)."""
    bad = [f"{h}x{w}" for h, w in buckets if h % multiple or w % multiple]
    if bad:
        raise ConfigError(f"data.buckets: {', '.join(bad)} cannot pass through {what}, which downsamples by "
                          f"{multiple}; use sides that are multiples of {multiple}")


def recipe_buckets(recipe) -> list[Bucket] | None:
    """The recipe's buckets (None: square `data.resolution` images, as without buckets)."""
    data = recipe.data
    if data.buckets is None:
        return None
    multiple = ARCH_MULTIPLE.get(recipe.model.arch, MIN_MULTIPLE)
    return resolve_buckets(data.buckets, data.resolution, multiple)


def largest_side(recipe) -> int:
    """The side of the square with the largest bucket's pixel count (`data.resolution` without
    buckets): activations grow with the pixel count, so this sizes the worst micro-batch."""
    buckets = recipe_buckets(recipe)
    if not buckets:
        return recipe.data.resolution
    return math.isqrt(max(h * w for h, w in buckets) - 1) + 1


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (log ratio; the first listed wins a tie)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def cover_crop(height: int, width: int, bucket: Bucket, crop: str = "center",
               seed: int = 0, key: str = "") -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, width), (crop top, left)): the image scaled to cover the bucket and where
    the bucket is cut from it. A random crop is drawn from (seed, key): the same for a sample
    every epoch and in the precompute command."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    if crop == "random":
        rng = random.Random(f"{seed}:{key}")
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return (rh, rw), (top, left)


__all__ = ["BUCKET_PRESETS", "CROPS", "check_multiple", "cover_crop", "largest_side", "nearest_bucket",
           "recipe_buckets", "resolve_buckets"]
