"""Rendering toy-world images: 32x32 RGB, drawn at 4x supersampling and shrunk (cheap antialiasing).

Styles (see `styles.py`) are built from the primitives here: an antialiased coverage mask of the
content's shape (filled or outlined), a jittered geometry and compositing helpers. Everything is
deterministic given a numpy Generator, so a dataset index plus a seed names one image exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .content import POSITIONS, SIZES, Content

RESOLUTION = 32
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Geometry:
    """Where the shape lands, in output pixels (centre and radius), after a small random jitter."""

    cx: float
    cy: float
    r: float


def geometry(content: Content, rng: np.random.Generator, res: int = RESOLUTION) -> Geometry:
    fx, fy = POSITIONS[content.position]
    jx, jy = rng.uniform(-0.04, 0.04, size=2)
    r = SIZES[content.size] * res * rng.uniform(0.92, 1.08)
    return Geometry(cx=(fx + jx) * res, cy=(fy + jy) * res, r=r)


def _polygon(shape: str, g: Geometry, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, r = g.cx * scale, g.cy * scale, g.r * scale
    if shape == "square":
        s = r * 0.86
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "cross":
        a, b = r, r * 0.36
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    return None  # circle


def shape_mask(shape: str, g: Geometry, width: float | None = None, res: int = RESOLUTION,
               ss: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0,1] of shape `shape` at `g`, shape [res,res]; filled, or an outline `width` px wide."""
    img = Image.new("L", (res * ss, res * ss), 0)
    draw = ImageDraw.Draw(img)
    w = 0 if width is None else max(1, int(round(width * ss)))
    poly = _polygon(shape, g, ss)
    if poly is None:
        box = [(g.cx - g.r) * ss, (g.cy - g.r) * ss, (g.cx + g.r) * ss, (g.cy + g.r) * ss]
        if width is None:
            draw.ellipse(box, fill=255)
        else:
            draw.ellipse(box, outline=255, width=w)
    elif width is None:
        draw.polygon(poly, fill=255)
    else:
        draw.line(poly + [poly[0], poly[1]], fill=255, width=w, joint="curve")
    return np.asarray(img.resize((res, res), Image.Resampling.BOX), dtype=np.float32) / 255.0


def blur(array: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float [H,W] or [H,W,3] array in [0,1] (PIL, so it stays fast)."""
    if radius <= 0:
        return array
    if array.ndim == 2:
        img = Image.fromarray(np.clip(array * 255.0, 0, 255).astype(np.uint8), "L")
        return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    return np.stack([blur(array[..., c], radius) for c in range(array.shape[-1])], axis=-1)


def solid(rgb: tuple[float, float, float], res: int = RESOLUTION) -> np.ndarray:
    """A [res,res,3] float canvas of one colour given as 0..255 values."""
    return np.broadcast_to(np.asarray(rgb, np.float32) / 255.0, (res, res, 3)).copy()


def composite(canvas: np.ndarray, mask: np.ndarray, rgb) -> np.ndarray:
    """Paint colour `rgb` (0..255, or a [H,W,3] array in [0,1]) over `canvas` with coverage `mask`."""
    colour = np.asarray(rgb, np.float32)
    if colour.ndim == 1:
        colour = colour / 255.0
    m = mask[..., None]
    return canvas * (1.0 - m) + colour * m


def to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8), "RGB")


def render(content: Content, style: str, rng: np.random.Generator | int = 0) -> Image.Image:
    """One 32x32 RGB image of `content` in the registered style `style` (deterministic from rng)."""
    from .styles import get_style

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
