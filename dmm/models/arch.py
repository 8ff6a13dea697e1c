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
    # Text encoders whose token states are concatenated into the cross-attention input.
    text_encoders: int
    # Conditioned on pooled text + size ids (`addition_embed_type="text_time"`).
    uses_text_time: bool
    # Number of blocks in diffusers naming at full size (down, up); the mid block is always one.
    full_size_blocks: tuple[int, int]
    default_resolution: int
    # Numbers in the size conditioning (original size, crop corner, target size) when uses_text_time.
    time_ids: int = 0
    # Transformer blocks project in/out with Linear (SDXL) rather than 1x1 Conv (SD1.5).
    linear_projection: bool = False


ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "StableDiffusionPipeline", 1, False, (4, 4), 512),
    "sdxl": Arch("sdxl", "StableDiffusionXLPipeline", 2, True, (3, 3), 1024, time_ids=6, linear_projection=True),
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


def unet_config(arch: str, *, block_out_channels: tuple[int, ...] = (16, 32), layers_per_block: int = 1,
                attention_head_dim: int | tuple[int, ...] = 4, norm_num_groups: int = 8, text_dim: int = 32,
                pooled_dim: int | None = None, sample_size: int = 8, latent_channels: int = 4,
                addition_time_embed_dim: int = 8, use_linear_projection: bool | None = None) -> dict:
    """`UNet2DConditionModel` arguments of a small real-architecture UNet: the one tiny-model factory
    (unit tests, the toy world). Its conditioning follows the architecture map: cross-attention
    over `text_encoders` concatenated token states of width `text_dim`, plus for SDXL the pooled
    text (`pooled_dim`, default `text_dim`) and size ids. The layout is the cheap one: the first
    (highest-resolution) block has no attention, every later block does."""
    spec = get_arch(arch)
    n = len(block_out_channels)
    if n < 2:
        raise ValueError(f"block_out_channels needs at least 2 levels, got {block_out_channels!r}")
    config = dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=spec.text_encoders * text_dim,
        transformer_layers_per_block=1,
        use_linear_projection=spec.linear_projection if use_linear_projection is None else use_linear_projection,
    )
    if spec.uses_text_time:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=spec.time_ids * addition_time_embed_dim
            + (text_dim if pooled_dim is None else pooled_dim),
        )
    return config


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


def unet_blocks(unet_config) -> list[str]:
    """Key prefixes of a diffusers UNet's blocks, in forward order, from its config (SD1.5, SDXL or
    any tiny UNet of the same family): what per-block merge weights are addressed by. The
    embeddings come first, then each down block, the mid block, each up block and the output head."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    down, up = len(get("down_block_types") or ()), len(get("up_block_types") or ())
    if not down or not up:
        raise ValueError("a UNet config needs down_block_types and up_block_types to name its blocks")
    blocks = ["conv_in", "time_embedding"]
    if get("addition_embed_type") == "text_time":
        blocks.append("add_embedding")
    blocks += [f"down_blocks.{i}" for i in range(down)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(up)]
    return blocks + ["conv_norm_out", "conv_out"]
