"""Every architecture-specific fact dmm relies on, in one map.

SD1.5 and SDXL differ in how many blocks they have, how they are conditioned (one text encoder
vs two plus pooled text and size ids) and which diffusers pipeline drives them. Code elsewhere
asks this module instead of hard-coding block tables.
"""

from __future__ import annotations

import inspect
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
    # sd-mecha's model config of the original (LDM/SGM) single-file layout, and which of its
    # components holds which diffusers pipeline component (dmm.export.ldm_keys).
    single_file_config: str = ""
    single_file_components: tuple[tuple[str, str], ...] = ()
    # Module names in a kohya LoRA, as kohya's own trainer writes them and A1111/ComfyUI read
    # them: diffusers names for SD1.x, original SGM names for SDXL.
    lora_names: str = "diffusers"


ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "StableDiffusionPipeline", 1, False, (4, 4), 512, single_file_config="sd1-ldm",
                 single_file_components=(("unet", "diffuser"), ("vae", "vae"), ("text_encoder", "clip_l"))),
    "sdxl": Arch("sdxl", "StableDiffusionXLPipeline", 2, True, (3, 3), 1024, time_ids=6, linear_projection=True,
                 single_file_config="sdxl-sgm", lora_names="sgm",
                 single_file_components=(("unet", "diffuser"), ("vae", "vae"), ("text_encoder", "clip_l"),
                                         ("text_encoder_2", "clip_g"))),
}

# Layers a style LoRA always stores at full rank: their rank is bounded by the latent channels
# (4 for SD1.5/SDXL), so no useful --rank fits them and storing them exactly costs next to nothing.
LORA_FULL_RANK_LAYERS = ("conv_in", "conv_out")


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


# What makes a UNet the real SD1.5/SDXL one (rather than a small one of the same family): the
# fields A1111/ComfyUI infer from a single file's tensor shapes.
_FULL_SIZE_FIELDS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                     "up_block_types", "in_channels", "out_channels", "transformer_layers_per_block",
                     "attention_head_dim", "projection_class_embeddings_input_dim")


def full_size_arch(unet_config) -> Arch:
    """The architecture of a full-size SD1.5 or SDXL UNet; anything else (the toy UNets) has no
    original single-file layout that A1111/ComfyUI could load, and is refused with that reason."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    arch = detect_arch(unet_config)
    reference = {"sd15": sd15_unet_config, "sdxl": sdxl_unet_config}[arch.name]()
    from diffusers import UNet2DConditionModel  # its defaults fill the fields the references leave out

    defaults = {k: v.default for k, v in inspect.signature(UNet2DConditionModel.__init__).parameters.items()}
    mismatched = []
    for field in _FULL_SIZE_FIELDS:
        want, have = reference.get(field, defaults.get(field)), get(field, defaults.get(field))
        if _plain(want, reference.get("down_block_types")) != _plain(have, get("down_block_types")):
            mismatched.append(f"{field}={have!r} (full-size {arch.name}: {want!r})")
    if mismatched:
        more = f"; and {len(mismatched) - 2} more" if len(mismatched) > 2 else ""
        raise ValueError(f"this UNet is not the full-size {arch.name} architecture ({'; '.join(mismatched[:2])}{more}): "
                         "A1111/ComfyUI infer the architecture from the tensor shapes of a single file, so only "
                         "full-size SD1.5/SDXL models can be written in that layout; export with --format diffusers")
    return arch


def _plain(value, blocks):
    """Config values as comparable plain data (lists vs tuples; an int per block vs one int)."""
    if isinstance(value, (list, tuple)):
        value = [_plain(v, None) for v in value]
        if blocks is not None and len(set(map(str, value))) == 1 and len(value) == len(blocks):
            return value[0]
        return value
    return value


def standard_components(arch: str) -> dict[str, tuple[str, dict]]:
    """The released SD1.5 / SDXL base pipeline's trained components as (class name, config), written
    out by hand (nothing is downloaded): what `dmm.train.dryrun` sizes when a recipe's base folder is
    not on disk. Text encoders: CLIP ViT-L/14 (both) and OpenCLIP ViT-bigG/14 (SDXL's second);
    VAE: the 8x-downsampling KL autoencoder with 4 latent channels."""
    vit_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
    if arch == "sd15":
        return {"unet": ("UNet2DConditionModel", sd15_unet_config()), "vae": ("AutoencoderKL", vae),
                "text_encoder": ("CLIPTextModel", vit_l)}
    if arch == "sdxl":
        big_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
        return {"unet": ("UNet2DConditionModel", sdxl_unet_config()), "vae": ("AutoencoderKL", vae),
                "text_encoder": ("CLIPTextModel", vit_l), "text_encoder_2": ("CLIPTextModelWithProjection", big_g)}
    raise ValueError(f"no standard configuration for architecture {arch!r}; known: {sorted(ARCHS)}")


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent pixel along each side: one downsampling between consecutive VAE levels."""
    get = vae_config.get if isinstance(vae_config, dict) else lambda k, d=None: getattr(vae_config, k, d)
    return 2 ** (len(get("block_out_channels") or (0,)) - 1)


def block_output_shapes(unet_config, latent_size: int) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each feature block's output (see `feature_blocks`) for a square
    latent of side `latent_size`: every down block but the last halves the side, every up block
    but the last doubles it back."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    channels = list(get("block_out_channels"))
    n = len(channels)
    shapes: dict[str, tuple[int, int, int]] = {}
    side = latent_size
    for i, c in enumerate(channels):
        if i < n - 1:
            side = -(-side // 2)  # a stride-2 conv with padding 1 rounds up
        shapes[f"down_blocks.{i}"] = (c, side, side)
    shapes["mid_block"] = (channels[-1], side, side)
    for i, c in enumerate(reversed(channels)):
        if i < n - 1:
            side = side * 2
        shapes[f"up_blocks.{i}"] = (c, side, side)
    return shapes


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
