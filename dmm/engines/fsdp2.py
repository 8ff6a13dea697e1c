"""FSDP2 engine: `torch.distributed.fsdp.fully_shard` on every UNet block, the root last, with a
mixed-precision policy (bf16 compute, fp32 reduction) when the recipe asks for bf16.

The trainer builds its optimizers before the engine shards the models; sharding replaces the
parameters by DTensors, so `prepare` rebuilds each optimizer over the sharded parameters with
the same groups and hyperparameters and points its lr schedule at it. Checkpoints are
torch.distributed.checkpoint folders (one per model: sharded weights and optimizer state) plus
the lr schedule's state.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dmm.distributed import init_process_group
from dmm.distributed.collective import ProcessGroupCollectives
from dmm.distributed.env import device_for
from dmm.engines.base import ENGINES, TorchOptimizerEngine
from dmm.io import atomic_torch_save


def unet_blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard one by one: every down/mid/up block of a (student or discriminator) UNet."""
    unet = getattr(model, "encoder", model)  # the discriminator keeps its UNet encoder in .encoder
    blocks = list(getattr(unet, "down_blocks", [])) + list(getattr(unet, "up_blocks", []) or [])
    if getattr(unet, "mid_block", None) is not None:
        blocks.insert(len(getattr(unet, "down_blocks", [])), unet.mid_block)
    return blocks


def _rebuild_optimizer(old: torch.optim.Optimizer, names_before: dict[int, str], model: nn.Module):
    by_name = dict(model.named_parameters())
    groups = []
    for group in old.param_groups:
        new = {k: v for k, v in group.items() if k != "params"}
        new["params"] = [by_name[names_before[id(p)]] for p in group["params"]]
        groups.append(new)
    try:
        return type(old)(groups, **old.defaults)
    except TypeError:  # defaults that the constructor does not take back: the groups carry everything
        return type(old)(groups)


@ENGINES.register("fsdp2", description="PyTorch FSDP2: fully_shard per UNet block, root last, "
                  "torch.distributed.checkpoint")
class FSDP2Engine(ProcessGroupCollectives, TorchOptimizerEngine):
    name = "fsdp2"

    def __init__(self, recipe, options=None):
        info = init_process_group()
        if not dist.is_initialized():
            raise ValueError("distributed.engine fsdp2 needs a process group: launch with torchrun, the "
                             "deepspeed launcher or SLURM (one process: use engine none)")
        from torch.distributed.device_mesh import init_device_mesh

        self.recipe = recipe
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device_for(info)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        if recipe.train.mixed_precision == "bf16":
            self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            self.mp = MixedPrecisionPolicy()

    def prepare(self, models, optimizers, schedulers):
        self.models, self.optimizers, self.schedulers = {}, {}, schedulers
        for which, model in models.items():
            names = {id(p): n for n, p in model.named_parameters()}
            # Reshard every unit after forward, the root included: with the root left unsharded
            # (the default), toggling the discriminator's requires_grad for the generator loss
            # crashed the backward on CPU (torch 2.13).
            for block in unet_blocks(model):
                fully_shard(block, mesh=self.mesh, mp_policy=self.mp, reshard_after_forward=True)
            fully_shard(model, mesh=self.mesh, mp_policy=self.mp, reshard_after_forward=True)
            # FSDP2 settles its dtypes lazily, at the first forward. The discriminator's first
            # forward is the frozen generator-loss pass, which would leave its gradients in bf16
            # under the bf16 policy; settle them now, while every parameter is trainable.
            fully_shard.state(model)._lazy_init()
            optimizer = _rebuild_optimizer(optimizers[which], names, model)
            schedulers[which].optimizer = optimizer
            self.models[which], self.optimizers[which] = model, optimizer
        return dict(self.models)

    # ------------------------------------------------------------------ state
    def save(self, folder: Path) -> None:
        for which, model in self.models.items():
            msd, osd = get_state_dict(model, self.optimizers[which])
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / which))
            if self.is_main:
                atomic_torch_save({"scheduler": self.schedulers[which].state_dict()},
                                  folder / which / "scheduler.pt")

    def load(self, folder: Path) -> None:
        for which, model in self.models.items():
            if not (folder / which / ".metadata").is_file():
                raise FileNotFoundError(f"{folder / which} holds no torch.distributed.checkpoint for {which}")
            msd, osd = get_state_dict(model, self.optimizers[which])
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(folder / which))
            set_state_dict(model, self.optimizers[which], model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            sched = torch.load(folder / which / "scheduler.pt", map_location="cpu", weights_only=True)
            self.schedulers[which].load_state_dict(sched["scheduler"])

    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        state = get_model_state_dict(self.models[which],
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().float().clone() for k, v in state.items()} if self.is_main else {}

    @contextlib.contextmanager
    def full_params(self, which: str):
        """Each DTensor parameter all-gathered when read (one at a time, the same order on every rank)."""
        yield ((n, (p.full_tensor() if isinstance(p, DTensor) else p).detach())
               for n, p in self.models[which].named_parameters())

    def local_numel(self, which: str) -> tuple[int, int]:
        total = local = 0
        for p in self.models[which].parameters():
            total += p.numel()
            local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        return local, total

    @classmethod
    def holds_checkpoint(cls, folder: Path, which: str) -> bool:
        return (folder / which / ".metadata").is_file()

    @classmethod
    def consolidate(cls, folder: Path, which: str, template) -> dict[str, torch.Tensor]:
        """The weights of a torch.distributed.checkpoint folder, loaded into a template's shapes."""
        state = {"model": {k: torch.empty_like(v, dtype=torch.float32) for k, v in template().items()}}
        dcp.load(state, checkpoint_id=str(Path(folder) / which), no_dist=True)
        return state["model"]

    def full_grads(self, which: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.models[which].named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                out[name] = g.detach().float().cpu().clone()
        return out
