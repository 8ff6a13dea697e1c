"""Caption conditioning, computed by the pipeline's own `encode_prompt`: the one caption encoder.

Training must condition the UNets exactly as sampling does; delegating to the pipeline (SD1.5:
one text encoder; SDXL: two, plus pooled text and size ids) guarantees it. `encode_prompts` and
`size_ids` are the only places that call the pipeline for this; `FrozenPipeline` (the trainer's
frozen base with a caption cache) and the toy world's caption table both use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from dmm.models.arch import Arch, detect_arch


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None

    def select(self, index: torch.Tensor) -> Conditioning:
        extra = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], extra)

    def cat(self, other: Conditioning) -> Conditioning:
        """Both batches in one: self's rows first."""
        extra = None if self.added_cond_kwargs is None else {
            k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), extra)

    def unet_kwargs(self) -> dict:
        return {} if self.added_cond_kwargs is None else {"added_cond_kwargs": self.added_cond_kwargs}


@torch.no_grad()
def encode_prompts(pipe, captions: list[str], device: torch.device | str = "cpu", arch: Arch | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token states [N, L, D], pooled text [N, P] or None) of `captions`, in one `encode_prompt` call.

    SDXL (pooled text + size ids) is recognised from the UNet's config through the architecture
    map (`detect_arch`), the same way everywhere; pass `arch` when the pipeline's UNet was handed
    on. Batched encoding may differ in the last bits from one caption at a time (CPU GEMM paths
    depend on the batch size): callers that need bitwise resume encode one caption per call."""
    device = torch.device(device)
    if arch is None:
        if getattr(pipe, "unet", None) is None:
            raise ValueError("encode_prompts: the pipeline has no UNet to detect its architecture from; "
                             "pass arch=dmm.models.arch.detect_arch(<its unet config>)")
        arch = detect_arch(pipe.unet.config)
    if arch.uses_text_time:
        embeds, _, pooled, _ = pipe.encode_prompt(list(captions), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(list(captions), device, 1, False)
    return embeds, None


def size_ids(pipe, resolution: int) -> torch.Tensor:
    """SDXL's size conditioning [1, 6] (original size, crop, target size) exactly as the pipeline builds it."""
    size = (resolution, resolution)
    te2 = getattr(pipe, "text_encoder_2", None)
    proj_dim = te2.config.projection_dim if te2 is not None else None
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=proj_dim)


class CaptionEncoder:
    """Captions -> Conditioning through one set of text encoders, with a bounded cache.

    The trainer has one for the base (the student's conditioning) and one per teacher that brings
    its own text encoders, so a teacher is conditioned as its own pipeline would condition it, on
    exactly the same (dropped) captions as the student."""

    def __init__(self, pipe, arch: Arch, time_ids: torch.Tensor | None, cache_size: int = 4096):
        self.pipe, self.arch, self.time_ids = pipe, arch, time_ids
        self.device = torch.device("cpu")
        self._cache: dict[str, tuple] = {}
        self._cache_size = cache_size

    def to(self, device: torch.device | str) -> CaptionEncoder:
        self.device = torch.device(device)
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(self.device)
        self._cache.clear()
        return self

    def with_encoders(self, text_encoder=None, text_encoder_2=None) -> CaptionEncoder:
        """The same tokenizers and size ids with other text encoders (None keeps this one's)."""
        parts = dict(self.pipe.components)
        if text_encoder is not None:
            parts["text_encoder"] = text_encoder
        if text_encoder_2 is not None:
            parts["text_encoder_2"] = text_encoder_2
        return CaptionEncoder(type(self.pipe)(**parts), self.arch, self.time_ids, self._cache_size).to(self.device)

    def _encode_new(self, captions: list[str]) -> None:
        """Encode captions not seen before and remember them (bounded cache).

        One caption per call: batched, SDXL's pooled embedding of a caption differed in the last
        bits with its batch partners (CPU GEMM paths depend on the batch size), so a caption first
        met before a checkpoint was encoded differently after resuming, breaking bitwise resume.
        """
        for caption in captions:
            embeds, pooled = encode_prompts(self.pipe, [caption], self.device, self.arch)
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[caption] = (embeds[0], None if pooled is None else pooled[0])

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Conditioning:
        new = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if new:
            self._encode_new(new)
        encoded = [self._cache[c] for c in captions]
        hidden = torch.stack([e[0] for e in encoded])
        if not self.arch.uses_text_time:
            return Conditioning(hidden, None)
        pooled = torch.stack([e[1] for e in encoded])
        time_ids = self.time_ids.to(hidden.device, hidden.dtype).repeat(len(captions), 1)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})


# What training from precomputed inputs never loads (dmm.data.precompute made their outputs).
ENCODER_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FrozenPipeline:
    """The frozen base pipeline (text encoders, VAE, scheduler, initial UNet) with a caption cache.
    `encoders=False`: scheduler and UNet only (training from precomputed latents and conditioning)."""

    def __init__(self, path: str | Path, *, resolution: int, cache_size: int = 4096, encoders: bool = True):
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"base model folder {path} is not a diffusers pipeline folder (no model_index.json); "
                "point model.base at the base model's folder"
            )
        self.path = path
        parts = json.loads((path / "model_index.json").read_text())
        skip = {} if encoders else {name: None for name in ENCODER_PARTS if name in parts}
        self.pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **skip)
        for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.arch: Arch = detect_arch(self.pipe.unet.config)
        self.resolution = resolution
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.captions: CaptionEncoder | None = None
        if encoders:
            time_ids = size_ids(self.pipe, resolution) if self.arch.uses_text_time else None
            self.captions = CaptionEncoder(self.pipe, self.arch, time_ids, cache_size)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> FrozenPipeline:
        """Move the frozen text encoders and VAE (the UNet is handed to the student, not moved)."""
        self.device = torch.device(device)
        if getattr(self.pipe, "vae", None) is not None:
            self.pipe.vae.to(self.device)
        if self.captions is not None:
            self.captions.to(self.device)
        return self

    @property
    def time_ids(self) -> torch.Tensor | None:
        return None if self.captions is None else self.captions.time_ids

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (the distribution mean: deterministic, resumable)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> Conditioning:
        if self.captions is None:
            raise RuntimeError("this FrozenPipeline was loaded without text encoders (precomputed inputs): "
                               "the batch carries the conditioning")
        return self.captions.encode(captions)


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Classifier-free guidance dropout, drawn ONCE per sample and shared by student and teacher."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
