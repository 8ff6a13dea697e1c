"""Multi-class discriminator: a UNet encoder (down blocks + mid block) and a small head, 2N logits.

The encoder is a real `UNet2DConditionModel` initialised from the base, with its decoder half
removed (no up blocks, identity output head), so its stock forward returns mid-block features.
Logits [0, N) mean "real image of style i", [N, 2N) "student image of style i".
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_as_called(module: nn.Module, *args):
    """torch.utils.checkpoint of one block, recomputed in backward with the trainability its
    parameters had in forward. The generator loss runs the discriminator frozen and the trainer
    makes it trainable again before that loss's backward: a plain recomputation would then save
    other tensors than the forward did (torch refuses: "different metadata")."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]

    def run(*inputs):
        now = [p.requires_grad for p in params]
        if now == flags:
            return module(*inputs)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        try:
            return module(*inputs)
        finally:
            for p, flag in zip(params, now):
                p.requires_grad_(flag)

    return checkpoint(run, *args, use_reentrant=False)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class MultiClassDiscriminator(nn.Module):
    def __init__(self, base_unet: UNet2DConditionModel, num_styles: int, head_layers: int = 2):
        super().__init__()
        encoder = copy.deepcopy(base_unet)
        encoder.up_blocks = nn.ModuleList()
        encoder.conv_norm_out = None
        encoder.conv_act = nn.Identity()
        encoder.conv_out = nn.Identity()
        if getattr(encoder, "class_embedding", None) is not None:
            encoder.class_embedding = None  # a student base: the discriminator is style-blind
        self.encoder = encoder
        channels = base_unet.config.block_out_channels[-1]
        layers: list[nn.Module] = []
        for _ in range(head_layers):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
        self.head = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2 * num_styles))
        self.num_styles = num_styles
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing (`train.gradient_checkpointing`): the encoder's blocks through
        diffusers' own switch, the head likewise; both recompute as called (`checkpoint_as_called`).
        Its update runs 2x the micro-batch (fake and real), so its stored activations are the SDXL
        step's largest."""
        self.encoder.enable_gradient_checkpointing(checkpoint_as_called)
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.encoder.disable_gradient_checkpointing()
        self.gradient_checkpointing = False

    def forward(self, x_t, t, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
        feats = self.encoder(x_t, t, encoder_hidden_states, **kwargs).sample
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint_as_called(self.head, feats)
        return self.head(feats)
