"""A teacher's training target computed the plain way: its own pipeline folder, its own text
encoders, one caption at a time. The own-text-encoder tests compare the trainer against this."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from dmm.conditioning import encode_prompts, size_ids
from dmm.models.arch import detect_arch


def perturb_text_encoders(folder: Path, seed: int, scale: float = 0.05) -> None:
    """Make a teacher pipeline folder's text encoder(s) differ from the base's (a fine-tuned TE)."""
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    g = torch.Generator().manual_seed(seed)
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        module.save_pretrained(str(Path(folder) / name))


@torch.no_grad()
def direct_targets(folder: Path, x: torch.Tensor, t: torch.Tensor, captions: list[str], resolution: int):
    """The teacher's UNet output for each sample, conditioned through its own pipeline's encoders."""
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    arch = detect_arch(pipe.unet.config)
    out = []
    for j, caption in enumerate(captions):
        embeds, pooled = encode_prompts(pipe, [caption], "cpu", arch)
        extra = {}
        if pooled is not None:
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_ids(pipe, resolution)}}
        out.append(pipe.unet(x[j:j + 1], t[j:j + 1], embeds, **extra).sample)
    return torch.cat(out)
