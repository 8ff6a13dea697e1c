"""Tiny configurations of the real diffusers/transformers classes, and pipeline-folder assembly.

Every toy model is the production class with a small config, so the DMM code paths that load
SDXL/SD1.5 pipelines run unchanged on the toy world. Sizes are chosen for 2 CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmm.models.arch import ARCHS, get_arch, unet_config

LATENT_CHANNELS = 4


@dataclass
class ClipConfig:
    """Tiny CLIP: text 64 wide x 3 layers, ViT on 32x32 with 4x4 patches."""

    hidden: int = 64
    text_layers: int = 3
    vision_layers: int = 3
    heads: int = 4
    projection_dim: int = 64
    image_size: int = 32
    patch_size: int = 4


@dataclass
class UNetConfig:
    """Tiny UNet on 16x16x4 latents: cross-attention only at 8x8, 4x4 and the mid block."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    heads: tuple[int, ...] = (2, 4, 4)
    norm_num_groups: int = 8
    addition_time_embed_dim: int = 8


def make_clip(cfg: ClipConfig, tokenizer) -> "transformers.CLIPModel":  # noqa: F821
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 2,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                max_position_embeddings=tokenizer.model_max_length, projection_dim=cfg.projection_dim,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 2, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  projection_dim=cfg.projection_dim)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def text_encoders_from_clip(clip, pooled_scale: float = 1.0):
    """(CLIPTextModel, CLIPTextModelWithProjection) sharing the CLIP text tower's weights.

    `pooled_scale` is folded into the projection weights (pooled RMS ~1 for SDXL's text_time
    embedding) so a stock pipeline reproduces exactly what training saw."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tcfg = clip.config.text_config
    tower = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    te1, te2 = CLIPTextModel(tcfg), CLIPTextModelWithProjection(tcfg)
    for te in (te1, te2):
        own = te.state_dict()
        prefix = "" if all(k in own for k in tower) else "text_model."  # layout differs across versions
        missing, unexpected = te.load_state_dict({prefix + k: v for k, v in tower.items()}, strict=False)
        if unexpected or [k for k in missing if "text_projection" not in k]:
            raise RuntimeError(f"text tower copy failed: missing={missing} unexpected={unexpected}")
    with torch.no_grad():
        te2.text_projection.weight.copy_(clip.text_projection.weight * pooled_scale)
    return te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


def make_vae(resolution: int = 32):
    """AutoencoderKL with one 2x downsampling: 32x32x3 -> 16x16x4."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                         sample_size=resolution, mid_block_add_attention=False, force_upcast=False)


def make_unet(arch: str, cfg: UNetConfig, text_width: int, pooled_dim: int, latent_size: int):
    """SDXL-shaped (text_time added embedding, cross-attention over both encoders' concat) or
    SD1.5-shaped, from the one factory `dmm.models.arch.unet_config`."""
    from diffusers import UNet2DConditionModel

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return UNet2DConditionModel(**unet_config(
        arch, block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        attention_head_dim=tuple(cfg.heads), norm_num_groups=cfg.norm_num_groups, text_dim=text_width,
        pooled_dim=pooled_dim, sample_size=latent_size, latent_channels=LATENT_CHANNELS,
        addition_time_embed_dim=cfg.addition_time_embed_dim))


SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def make_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                       steps_offset=1)


def make_pipeline(arch: str, tokenizer, text_encoders, vae, unet, scheduler=None):
    """A stock diffusers pipeline object (what `save_pretrained` turns into a pipeline folder)."""
    scheduler = scheduler or make_sample_scheduler()
    te1, te2 = text_encoders
    cls = pipeline_class(arch)
    if get_arch(arch).text_encoders == 2:
        return cls(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                   unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False, add_watermarker=False)
    return cls(vae=vae, text_encoder=te1, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pipeline_class(arch: str):
    """The diffusers pipeline class the architecture map names for `arch`."""
    import diffusers

    return getattr(diffusers, get_arch(arch).pipeline_class)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
