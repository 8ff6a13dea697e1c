"""Rendering toy-world images in a registered style, deterministically from a seed.

Imports flow one way: render -> styles -> draw (the drawing primitives). A dataset index plus a
seed names one image exactly.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .content import Content
from .draw import RESOLUTION, to_image
from .styles import get_style


def render(content: Content, style: str, rng: np.random.Generator | int = 0) -> Image.Image:
    """One 32x32 RGB image of `content` in the registered style `style` (deterministic from rng)."""
    fn = get_style(style)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out = fn(content, rng)
    if isinstance(out, Image.Image):
        out = out.convert("RGB")
        if out.size != (RESOLUTION, RESOLUTION):
            out = out.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
        return out
    out = np.asarray(out, dtype=np.float32)
    if out.shape != (RESOLUTION, RESOLUTION, 3):
        raise ValueError(f"style {style!r} returned shape {out.shape}, expected {(RESOLUTION, RESOLUTION, 3)}")
    return to_image(out)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of dataset item `index` under `seed`: items are independent of batch layout."""
    return np.random.default_rng([int(seed), int(index)])


def render_sample(index: int, seed: int, styles: list[str] | tuple[str, ...]) -> tuple[Content, str, Image.Image]:
    """Dataset item `index`: content, a style (round-robin over `styles`) and the image."""
    rng = sample_rng(seed, index)
    content = Content.sample(rng)
    style = styles[index % len(styles)]
    return content, style, render(content, style, rng)


def render_arrays(n: int, seed: int, styles: list[str] | tuple[str, ...], start: int = 0):
    """Items start..start+n as uint8 [n,32,32,3], their contents and style names."""
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), np.uint8)
    contents, names = [], []
    for k in range(n):
        content, style, img = render_sample(start + k, seed, styles)
        images[k] = np.asarray(img)
        contents.append(content)
        names.append(style)
    return images, contents, names
