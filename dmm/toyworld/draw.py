"""Drawing primitives for toy-world styles: 32x32 RGB, drawn at 4x supersampling and shrunk.

Styles (see `styles.py`) are built from these: an antialiased coverage mask of the content's
shape (filled or outlined), a jittered geometry and compositing helpers. Everything is
deterministic given a numpy Generator. This module sits below both `styles` and `render`
(render -> styles -> draw), so a style never imports the renderer that calls it.
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


