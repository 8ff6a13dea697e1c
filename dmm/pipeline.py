"""Load a merged model and generate any style or mixture of styles.

A merged model is a plain diffusers pipeline folder whose UNet is a
`StyleUNet2DConditionModel`; `model_index.json` names the `dmm` library for it, so
`DiffusionPipeline.from_pretrained` loads it too once dmm is importable. `load_merged` does not
rely on that name: a folder called `dmm` in the working directory shadows the package in
`sys.modules`, and diffusers would then look the UNet class up in an empty namespace.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from dmm.models.student import StyleSpec, StyleUNet2DConditionModel
from dmm.sampling import consecutive_seeds, sample_images

MERGE_INFO = "dmm_merge.json"


def is_merged_model(folder: str | Path) -> bool:
    cfg = Path(folder) / "unet" / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == StyleUNet2DConditionModel.__name__


def _with_unet(pipe: DiffusionPipeline, unet) -> DiffusionPipeline:
    """The same pipeline class rebuilt with `unet` (its constructor sees the UNet, e.g. SDXL's sample size)."""
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in pipe.config.items() if k in params}
    kwargs.update(pipe.components)
    kwargs["unet"] = unet
    return type(pipe)(**kwargs)


def load_merged(folder: str | Path, torch_dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The merged pipeline, from any working directory: the UNet class is named here, never looked up."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    if not is_merged_model(folder):
        raise ValueError(
            f"{folder} is not a dmm merged model: expected unet/config.json with "
            f"_class_name {StyleUNet2DConditionModel.__name__!r} (export one with launchers/train.py)"
        )
    unet = StyleUNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch_dtype,
                                                     local_files_only=True)
    # unet=None: diffusers loads only the stock components and never resolves the "dmm" library name
    rest = DiffusionPipeline.from_pretrained(str(folder), unet=None, dtype=torch_dtype, local_files_only=True)
    return _with_unet(rest, unet)


def generate(pipe, prompts: list[str], style: StyleSpec | None = None, *, seed: int = 0, steps: int = 20,
             guidance_scale: float = 3.0, negative_prompt: str | None = None, batch_size: int = 64,
             **kwargs) -> list:
    """PIL images, one per prompt; image k uses seed `seed + k` whatever the batch size (a style is
    required for merged models)."""
    if style is not None:
        pipe.unet.set_style(style)
    return sample_images(pipe, prompts, consecutive_seeds(seed, len(prompts)), steps=steps,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt, batch_size=batch_size,
                         **kwargs)
