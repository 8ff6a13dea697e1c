"""Speed switches on UNets (recipe `perf:`): attention kernel, memory format, torch.compile per block.

Each changes how a UNet computes, not what: the tests compare a run with and without each switch
within float tolerance. They act through diffusers' and torch's own hooks (attention processors,
`Module.compile`, `memory_format`), never by editing model code.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn


def set_attention(unet: nn.Module, kind: str) -> None:
    """sdpa: torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs);
    classic: the explicit softmax(QK^T)V, for comparison and for backends without SDPA."""
    if kind not in ("sdpa", "classic"):
        raise ValueError(f"attention must be sdpa or classic, got {kind!r}")
    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def compile_blocks(unet: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each down/mid/up block in place: small graphs compile quickly and keep the
    forward hooks (feature imitation) and per-block activation checkpointing working."""
    for block in unet_blocks(unet):
        block.compile(backend=backend)


def to_channels_last(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last)


def apply_speed_switches(model: nn.Module, perf) -> None:
    """The recipe's `perf` switches on a UNet (student, teacher) or a model holding one as `encoder`
    (the discriminator)."""
    unet = getattr(model, "encoder", model)
    set_attention(unet, perf.attention)
    if perf.channels_last:
        to_channels_last(model)
    if perf.compile == "blocks":
        compile_blocks(unet, perf.compile_backend)


__all__ = ["apply_speed_switches", "compile_blocks", "set_attention", "to_channels_last", "unet_blocks"]
