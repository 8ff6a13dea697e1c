"""The one sampling loop: one seed per image, so an image never depends on batch size or chunking.

Every image gets its own `torch.Generator` seeded from that image's seed, so sampling prompt p
with seed s gives the same image alone, in a batch of 3 or in the last chunk of 5,000 (up to
float rounding in batched kernels). The training demo, the evaluation suite, the toy world's
builder and `dmm.pipeline.generate` all sample through `sample_images`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["SamplingError", "check_sampling", "consecutive_seeds", "sample_images"]


class SamplingError(ValueError):
    """Sampling settings that cannot produce images; the message names the setting and the fix."""


def check_sampling(steps: int, guidance_scale: float, batch_size: int = 1, flags: dict[str, str] | None = None) -> None:
    """Refuse settings that would fail (or silently produce noise) only after a model was loaded.

    `flags` names the settings as the caller's user wrote them (e.g. {"steps": "--steps"})."""
    name = {"steps": "steps", "guidance_scale": "guidance scale", "batch_size": "batch size", **(flags or {})}
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"{name['steps']} must be a whole number of at least 1 (denoising steps), got {steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise SamplingError(f"{name['guidance_scale']} must be a finite number >= 0 (1 = no guidance, paper: 7), "
                            f"got {guidance_scale!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SamplingError(f"{name['batch_size']} must be a whole number of at least 1 (images per pipeline "
                            f"call), got {batch_size!r}")


def consecutive_seeds(seed: int, n: int) -> list[int]:
    """The seeds of an n-image set started at `seed`: seed, seed+1, ..., seed+n-1."""
    return [int(seed) + k for k in range(n)]


def _join(chunks: list, output_type: str):
    if output_type == "pil":
        return [image for chunk in chunks for image in chunk]
    if output_type == "pt":
        return torch.cat(chunks) if chunks else torch.zeros(0)
    return np.concatenate(chunks) if chunks else np.zeros((0,))


def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
                  negative_prompt: str | None = None, batch_size: int = 8, output_type: str = "pil",
                  generator_device: str = "cpu", on_batch: Callable[[int, int], None] | None = None,
                  **pipe_kwargs):
    """Images of `pipe` for `prompts`, image k drawn from a generator seeded with `seeds[k]`.

    `output_type` is the pipeline's: "pil" (a list), "np" ([N,H,W,3] floats) or "pt" ([N,3,H,W]).
    `on_batch(done, total)` is called after each pipeline call. A merged model's style is set on
    the pipeline beforehand (`pipe.unet.set_style`).
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise SamplingError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    check_sampling(steps, guidance_scale, batch_size)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device=generator_device).manual_seed(s) for s in seeds[start : start + batch_size]]
        kwargs = dict(pipe_kwargs)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(chunk)
        with torch.no_grad():
            out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generators, output_type=output_type, **kwargs)
        chunks.append(out.images)
        if on_batch is not None:
            on_batch(start + len(chunk), len(prompts))
    return _join(chunks, output_type)
