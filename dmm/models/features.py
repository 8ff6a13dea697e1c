"""Block outputs through forward hooks, for feature imitation (no forked UNet forward)."""

from __future__ import annotations

import torch
from torch import nn

from dmm.models.arch import feature_blocks


class BlockFeatures:
    """Records the output of every down block, the mid block and every up block while active.

    with BlockFeatures(unet) as feats:
        unet(...)
    feats.outputs  # {"down_blocks.0": tensor, ..., "mid_block": tensor, "up_blocks.3": tensor}
    """

    def __init__(self, unet: nn.Module, detach: bool = False):
        self.blocks = feature_blocks(unet)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            # Down blocks return (hidden_states, residuals); the hidden states are the block's output.
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[name] = hidden.detach() if self.detach else hidden

        return record

    def __enter__(self) -> BlockFeatures:
        self.outputs = {}
        self._handles = [block.register_forward_hook(self._hook(name)) for name, block in self.blocks.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
