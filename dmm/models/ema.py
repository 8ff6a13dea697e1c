"""Exponential moving averages of the student's weights, kept whole (unsharded) in fp32.

Two uses: `optim.ema_decay` keeps an average that the export writes instead of the raw weights
(common in distillation: the average sits closer to the teachers than the last noisy step), and
an objective may keep one as a target network (SPLAM's, decay 0.95). Either reads the student's
parameters through `engine.full_params` after each optimizer step, so it works the same under
ZeRO-3 and FSDP2 (where that read is an all-gather) as in one process. The average lives in a
checkpoint as one safetensors file, written by the main rank, read by every rank that holds one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dmm.io import atomic_save_safetensors

EMA_FILE = "ema-{name}.safetensors"


class WeightEMA:
    """`shadow[k] <- decay * shadow[k] + (1 - decay) * param[k]` after every student step.

    `shadow` may be the parameters of a module (a target network that is called in forward passes),
    updated in place; `None` keeps plain tensors, made from the first parameters seen."""

    def __init__(self, name: str, decay: float, shadow: dict[str, torch.Tensor] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA {name}: decay must be in (0, 1), got {decay}")
        self.name, self.decay = name, decay
        self.shadow = shadow

    def start(self, params: dict[str, torch.Tensor]) -> None:
        """Begin at the student's current weights."""
        if self.shadow is None:
            self.shadow = {k: v.detach().float().clone() for k, v in params.items()}
            return
        self._check(params)
        with torch.no_grad():
            for k, v in params.items():
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self._check(params)
        for k, v in params.items():
            self.shadow[k].lerp_(v.to(self.shadow[k].dtype), 1.0 - self.decay)

    def _check(self, params: dict[str, torch.Tensor]) -> None:
        if set(params) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(params)), sorted(set(params) - set(self.shadow))
            raise ValueError(f"EMA {self.name}: the student's parameters do not match the average's "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.shadow.items()}

    def save(self, folder: Path) -> None:
        atomic_save_safetensors(self.state_dict(), Path(folder) / EMA_FILE.format(name=self.name))

    def load(self, folder: Path) -> None:
        path = Path(folder) / EMA_FILE.format(name=self.name)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name}: the checkpoint was written without this "
                                    f"average (was optim.ema_decay or the objective different?)")
        state = load_file(str(path))
        if self.shadow is None:
            self.shadow = state
            return
        self._check(state)
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)


def ema_state(checkpoint: Path, name: str = "student") -> dict[str, torch.Tensor] | None:
    """A checkpoint's average of that name, or None when it keeps none."""
    path = Path(checkpoint) / EMA_FILE.format(name=name)
    return load_file(str(path)) if path.is_file() else None


__all__ = ["EMA_FILE", "WeightEMA", "ema_state"]
