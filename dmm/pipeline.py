"""Load a merged model and generate any style or mixture of styles.

A merged model is a plain diffusers pipeline folder whose UNet is a
`StyleUNet2DConditionModel`; `model_index.json` names the `dmm` library for it, so
`DiffusionPipeline.from_pretrained` loads it too once dmm is importable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from dmm.models.student import StyleSpec, StyleUNet2DConditionModel

MERGE_INFO = "dmm_merge.json"


def is_merged_model(folder: str | Path) -> bool:
    cfg = Path(folder) / "unet" / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == StyleUNet2DConditionModel.__name__


def load_merged(folder: str | Path, torch_dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    if not is_merged_model(folder):
        raise ValueError(
            f"{folder} is not a dmm merged model: expected unet/config.json with "
            f"_class_name {StyleUNet2DConditionModel.__name__!r} (export one with launchers/train.py)"
        )
    return DiffusionPipeline.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True)


def generate(pipe, prompts: list[str], style: StyleSpec | None = None, *, seed: int = 0, steps: int = 20,
             guidance_scale: float = 3.0, negative_prompt: str | None = None, batch_size: int = 64,
             **kwargs) -> list:
    """PIL images, one per prompt, reproducible from `seed` (a style is required for merged models)."""
    if style is not None:
        pipe.unet.set_style(style)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        neg = None if negative_prompt is None else [negative_prompt] * len(chunk)
        out = pipe(chunk, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, **kwargs)
        images.extend(out.images)
    return images
