"""Exponential moving averages of the student's weights, kept whole (unsharded) in fp32.

Two uses: `optim.ema_decay` keeps an average that the export writes instead of the raw weights
(common in distillation: the average sits closer to the teachers than the last noisy step), and
an objective may keep one as a target network (SPLAM's, decay 0.95). Either reads the student's
parameters through `engine.full_params` after each optimizer step, so it works the same under
ZeRO-3 and FSDP2 (where that read is an all-gather) as in one process. The average lives in a
checkpoint as one safetensors file, written by the main rank, read by every rank that holds one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file

from dmm.io import atomic_save_safetensors

EMA_FILE = "ema-{name}.safetensors"
Params = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def pairs(params: Params) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a mapping, or the pairs themselves (possibly lazy: gathered one by one)."""
    return params.items() if isinstance(params, Mapping) else params


class WeightEMA:
    """`shadow[k] <- decay * shadow[k] + (1 - decay) * param[k]` after every student step.

    `shadow` may be the parameters of a module (a target network that is called in forward passes),
    updated in place; `None` keeps plain tensors, made from the first parameters seen."""

    def __init__(self, name: str, decay: float, shadow: dict[str, torch.Tensor] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA {name}: decay must be in (0, 1), got {decay}")
        self.name, self.decay = name, decay
        self.shadow = shadow

    def start(self, params: Params) -> None:
        """Begin at the student's current weights."""
        self.begin()
        walk([self], params, WeightEMA.start_one)

    def begin(self) -> None:
        """Before `start_one` calls: a new average is made from the parameters it is given, an
        existing one (a target network's parameters) is overwritten with them."""
        self._fresh = self.shadow is None
        if self._fresh:
            self.shadow = {}

    @torch.no_grad()
    def start_one(self, name: str, value: torch.Tensor) -> None:
        if self._fresh:
            self.shadow[name] = value.detach().float().clone()
        elif name in self.shadow:
            self.shadow[name].copy_(value)

    def update(self, params: Params) -> None:
        walk([self], params, WeightEMA.update_one)

    @torch.no_grad()
    def update_one(self, name: str, value: torch.Tensor) -> None:
        """One parameter (a sharded engine gathers them one at a time)."""
        if name in self.shadow:
            self.shadow[name].lerp_(value.to(self.shadow[name].dtype), 1.0 - self.decay)

    def check_names(self, names) -> None:
        if set(names) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(names)), sorted(set(names) - set(self.shadow))
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
        self.check_names(state)
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)


def walk(emas, params: Params, step) -> None:
    """`step(ema, name, value)` for every parameter and average, reading each parameter once (a
    sharded engine's gather), then check that every average saw exactly its own names."""
    names = []
    for name, value in pairs(params):
        names.append(name)
        for ema in emas:
            step(ema, name, value)
    for ema in emas:
        ema.check_names(names)


def ema_state(checkpoint: Path, name: str = "student") -> dict[str, torch.Tensor] | None:
    """A checkpoint's average of that name, or None when it keeps none."""
    path = Path(checkpoint) / EMA_FILE.format(name=name)
    return load_file(str(path)) if path.is_file() else None


__all__ = ["EMA_FILE", "WeightEMA", "ema_state", "walk"]
