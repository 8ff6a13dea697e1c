"""One process, plain PyTorch: the reference every distributed engine is tested against."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dmm.engines.base import ENGINES, TorchOptimizerEngine
from dmm.io import atomic_save_safetensors, atomic_torch_save


@ENGINES.register("none", description="one process, plain PyTorch (CUDA when present): the reference engine")
class SingleProcessEngine(TorchOptimizerEngine):
    name = "none"

    def __init__(self, recipe=None, options=None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

    def prepare(self, models, optimizers, schedulers):
        self.models, self.optimizers, self.schedulers = models, optimizers, schedulers
        return models

    def save(self, folder: Path) -> None:
        for which, model in self.models.items():
            atomic_save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                                    folder / f"{which}.safetensors")
            atomic_torch_save({"optimizer": self.optimizers[which].state_dict(),
                               "scheduler": self.schedulers[which].state_dict()}, folder / f"{which}_optim.pt")

    def load(self, folder: Path) -> None:
        for which, model in self.models.items():
            model.load_state_dict(load_file(str(folder / f"{which}.safetensors")))
            state = torch.load(folder / f"{which}_optim.pt", map_location="cpu", weights_only=True)
            self.optimizers[which].load_state_dict(state["optimizer"])
            self.schedulers[which].load_state_dict(state["scheduler"])

    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        model: nn.Module = self.models[which]
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @classmethod
    def holds_checkpoint(cls, folder: Path, which: str) -> bool:
        return (folder / f"{which}.safetensors").is_file()

    @classmethod
    def consolidate(cls, folder: Path, which: str, template=None) -> dict[str, torch.Tensor]:
        return load_file(str(folder / f"{which}.safetensors"))
