"""Every architecture-specific fact dmm relies on, in one map.

SD1.5 and SDXL differ in how many blocks they have, how they are conditioned (one text encoder
vs two plus pooled text and size ids) and which diffusers pipeline drives them. Code elsewhere
asks this module instead of hard-coding block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Arch:
    name: str
    pipeline_class: str
    text_encoders: int
    uses_text_time: bool
    # Number of blocks in diffusers naming at full size (down, up); the mid block is always one.
    full_size_blocks: tuple[int, int]
    default_resolution: int


ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "StableDiffusionPipeline", 1, False, (4, 4), 512),
    "sdxl": Arch("sdxl", "StableDiffusionXLPipeline", 2, True, (3, 3), 1024),
}


def detect_arch(unet_config) -> Arch:
    """SDXL is the one conditioned on pooled text + size ids (`addition_embed_type="text_time"`)."""
    kind = unet_config.get("addition_embed_type") if isinstance(unet_config, dict) else getattr(
        unet_config, "addition_embed_type", None
    )
    return ARCHS["sdxl" if kind == "text_time" else "sd15"]


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]


def time_embed_dim(unet) -> int:
    """Width of the time embedding that the style prompt is added to (1280 for SD1.5 and SDXL)."""
    return unet.time_embedding.linear_2.out_features


def feature_blocks(unet) -> dict[str, nn.Module]:
    """The blocks whose outputs feature imitation matches: every down block, the mid block, every up block."""
    blocks: dict[str, nn.Module] = {}
    for i, block in enumerate(unet.down_blocks):
        blocks[f"down_blocks.{i}"] = block
    blocks["mid_block"] = unet.mid_block
    for i, block in enumerate(unet.up_blocks):
        blocks[f"up_blocks.{i}"] = block
    return blocks


def tiny_unet_config(arch: str = "sdxl", *, text_dim: int = 32, sample_size: int = 8) -> dict:
    """A real-architecture UNet small enough for unit tests (a few hundred thousand parameters)."""
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=4,
    )
    if arch == "sdxl":
        return dict(
            common,
            cross_attention_dim=2 * text_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + text_dim,
            transformer_layers_per_block=1,
        )
    if arch == "sd15":
        return dict(common, cross_attention_dim=text_dim)
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")


def sd15_unet_config() -> dict:
    """The SD1.5 UNet (860M parameters), for shape, memory and speed checks with random weights."""
    return dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
    )


def sdxl_unet_config() -> dict:
    """The SDXL base UNet (2.57B parameters), for shape, memory and speed checks with random weights."""
    return dict(
        sample_size=128,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        layers_per_block=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )
