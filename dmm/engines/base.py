"""What the trainer needs from a training engine (single process, DeepSpeed, FSDP2).

An engine owns the two trained models (student and discriminator), their optimizers and lr
schedules: it wraps them for its parallelism, runs backward and the optimizer step with
gradient clipping, saves and restores them, and gathers the full student for export. Teachers
and the base model's frozen parts never go through an engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from dmm.registry import Registry

# Engines register themselves here (one file each); `distributed.engine` names one, and its
# typed options come from `distributed.options`.
ENGINES: Registry[type[Engine]] = Registry("engine", builtins="dmm.engines")


class Engine(ABC):
    name: str = "abstract"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def prepare(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                schedulers: dict[str, object]) -> dict[str, nn.Module]:
        """Wrap the trained models; returns the modules to call in forward passes."""

    @abstractmethod
    def backward(self, which: str, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, which: str, max_norm: float) -> float | torch.Tensor:
        """Clip, step the optimizer and lr schedule, zero the grads; returns the pre-clip grad norm
        (a float, or a 0-d tensor left on the device so that a step needs no host synchronisation)."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write models, optimizers and schedules into `folder` (collective in distributed engines)."""

    @abstractmethod
    def load(self, folder: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        """The unsharded weights of a trained model (complete on the main rank)."""

    @classmethod
    @abstractmethod
    def holds_checkpoint(cls, folder: Path, which: str) -> bool:
        """Whether `folder` holds this engine's checkpoint of model `which`."""

    @classmethod
    @abstractmethod
    def consolidate(cls, folder: Path, which: str,
                    template: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The full fp32 weights of `which` from this engine's checkpoint folder, in one process
        without a process group (export after training). `template` builds a state dict of the
        right keys and shapes, for formats that need one."""

    @contextlib.contextmanager
    def full_params(self, which: str) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
        """The current unsharded parameters of a trained model as (name, tensor) pairs, on EVERY rank
        (collective in sharded engines: every rank walks all of them, in order; each tensor is valid
        until the next one is read, as a sharded engine gathers them one at a time). Read-only: a
        weight average reads them here after each optimizer step."""
        yield ((n, p.detach()) for n, p in self.models[which].named_parameters())

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a decision made once, e.g. which checkpoint to resume)."""
        return obj


class TorchOptimizerEngine(Engine):
    """An engine whose models step plain torch optimizers (single process, FSDP2): backward is
    autograd's, a step clips, steps the optimizer and the lr schedule, and zeroes the grads.
    Subclasses fill `models`, `optimizers` and `schedulers` in `prepare`."""

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, object]

    def backward(self, which, loss):
        loss.backward()

    def step(self, which, max_norm):
        params = [p for p in self.models[which].parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            norm = norm.full_tensor()
        self.optimizers[which].step()
        self.schedulers[which].step()
        self.optimizers[which].zero_grad(set_to_none=True)
        return norm.detach()
