"""DeepSpeed engine: ZeRO stage 1/2/3 over the student and the discriminator, bf16, optional
optimizer CPU offload. Teachers stay outside (plain frozen modules on their own ranks).

Each trained model gets its own `deepspeed.initialize` with the trainer's torch AdamW (no fused
Adam to compile) and LambdaLR. Gradient accumulation is the trainer's: it calls `backward` once
per micro-step with the loss already scaled, and `step` once per optimizer step; DeepSpeed is
told the number of micro-steps so it reduces gradients only at the boundary. Checkpoints use
DeepSpeed's own sharded format, one tag (sub-folder) per model.
"""

from __future__ import annotations

import contextlib

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from dmm.distributed import init_process_group
from dmm.distributed.collective import ProcessGroupCollectives
from dmm.distributed.env import device_for
from dmm.engines.base import ENGINES, Engine
from dmm.schema import ConfigError, setting

log = logging.getLogger("dmm.engines.deepspeed")


@dataclass(frozen=True)
class DeepSpeedOptions:
    zero_stage: Literal[0, 1, 2, 3] = setting(2, help="ZeRO stage: 1 shards optimizer state, 2 also gradients, "
                                                      "3 also parameters")
    offload_optimizer: bool = setting(False, help="keep optimizer state on the CPU (needs zero_stage >= 1)")

    def __post_init__(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("distributed.options.offload_optimizer needs distributed.options.zero_stage >= 1")


def ds_config(recipe, options: DeepSpeedOptions, batch_size: int) -> dict:
    d = recipe.distributed
    zero: dict = {"stage": options.zero_stage}
    zero_force = True
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # The trainer's torch AdamW runs on the offloaded fp32 partitions (no DeepSpeedCPUAdam to build).
        zero_force = False
    if options.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": d.grad_accum_steps,
        "gradient_clipping": recipe.optim.grad_clip if recipe.optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": zero_force,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.train.mixed_precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


class FrozenAwareCall(torch.nn.Module):
    """What the trainer calls for the DeepSpeed-wrapped discriminator.

    The generator loss goes through the discriminator while it is frozen (the trainer switches
    `requires_grad` off around that forward) and is back-propagated inside the student's
    backward. Through the DeepSpeed engine, or through its bare module, that pass corrupts
    ZeRO's per-step gradient bookkeeping: the discriminator's gradients of the following
    backward were not reduced across ranks (caught by the 2-process gradient test). So here
    `requires_grad_` only records the wish, and a frozen call runs a plain replica of the
    discriminator (parameters whole on every rank with ZeRO <= 2), re-synchronised from the
    engine's weights after every optimizer step. Unfrozen calls go to the engine.
    """

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.frozen = False
        self._replica: list = []  # a list, so the replica is not a registered submodule
        self._replica_step = -1

    def requires_grad_(self, requires_grad: bool = True):
        self.frozen = not requires_grad
        return self

    def _frozen_replica(self) -> torch.nn.Module:
        import copy

        module = self.engine.module
        if not self._replica:
            self._replica.append(copy.deepcopy(module).requires_grad_(False))
            self._replica_step = self.engine.global_steps
        if self._replica_step != self.engine.global_steps:
            with torch.no_grad():
                for dst, src in zip(self._replica[0].parameters(), module.parameters()):
                    dst.copy_(src)
            self._replica_step = self.engine.global_steps
        return self._replica[0]

    def forward(self, *args, **kwargs):
        if not self.frozen:
            return self.engine(*args, **kwargs)
        return self._frozen_replica()(*args, **kwargs)


@ENGINES.register("deepspeed", description="DeepSpeed ZeRO 0-3 over student and discriminator, optional "
                  "optimizer offload", options=DeepSpeedOptions)
class DeepSpeedEngine(ProcessGroupCollectives, Engine):
    name = "deepspeed"

    def __init__(self, recipe, options: DeepSpeedOptions | None = None):
        os.environ.setdefault("DS_BUILD_OPS", "0")
        info = init_process_group()
        import deepspeed

        self.deepspeed = deepspeed
        if not dist.is_initialized():  # one process: DeepSpeed still wants a (size-1) group
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29511")})
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        self.recipe = recipe
        self.options = options or DeepSpeedOptions()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device_for(info)
        self.stage = self.options.zero_stage
        self.accum = recipe.distributed.grad_accum_steps
        self.engines: dict = {}
        self._pending: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def prepare(self, models, optimizers, schedulers):
        out = {}
        for which, model in models.items():
            config = ds_config(self.recipe, self.options, self.recipe.data.batch_size)
            if which == "disc" and self.stage == 3:
                # The discriminator is called frozen inside the student's loss (see FrozenAwareCall),
                # which needs its parameters whole on every rank: ZeRO-2 (sharded grads and optimizer).
                config["zero_optimization"] = {"stage": 2, **{k: v for k, v in config["zero_optimization"].items()
                                                              if k == "offload_optimizer"}}
            engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizers[which],
                                                         lr_scheduler=schedulers[which], config=config,
                                                         dist_init_required=False)
            self.engines[which] = engine
            self._pending[which] = 0
            out[which] = FrozenAwareCall(engine) if which == "disc" else engine
        self.schedulers = schedulers
        return out

    # ------------------------------------------------------------------ training
    def backward(self, which, loss):
        engine = self.engines[which]
        if self._pending[which]:
            engine.step()  # closes the previous micro-step: DeepSpeed only counts it (no update)
        engine.backward(loss, scale_wrt_gas=False)  # the trainer already scaled by 1/grad_accum_steps
        self._pending[which] += 1

    def step(self, which, max_norm):
        engine = self.engines[which]
        if self._pending[which] != self.accum:
            raise RuntimeError(f"{which}: {self._pending[which]} backward passes before step, expected {self.accum}")
        engine.step()  # the boundary: clip (gradient_clipping), optimizer and lr schedule
        self._pending[which] = 0
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ state
    def save(self, folder: Path) -> None:
        for which, engine in self.engines.items():
            engine.save_checkpoint(str(folder), tag=which, save_latest=False)

    def load(self, folder: Path) -> None:
        for which, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(folder), tag=which, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise FileNotFoundError(f"{folder / which} holds no DeepSpeed checkpoint for {which}")

    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        module = self.engines[which].module
        if self.stage == 3 and which == "student":
            params = list(module.parameters())
            with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                    if self.is_main else {}
            return state
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    @contextlib.contextmanager
    def full_params(self, which: str):
        module = self.engines[which].module
        if self.stage != 3 or which != "student":
            yield ((n, p.detach()) for n, p in module.named_parameters())
            return

        def gathered():  # ZeRO-3: one parameter gathered at a time
            for n, p in module.named_parameters():
                with self.deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield n, p.detach()

        yield gathered()

    def local_numel(self, which: str) -> tuple[int, int]:
        """(parameters held by this rank, parameters of the whole model)."""
        total = local = 0
        for p in self.engines[which].module.parameters():
            full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            total += full
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
        return local, total

    def full_grads(self, which: str) -> dict[str, torch.Tensor]:
        """Unsharded, rank-averaged gradients after backward (collective; for tests)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.engines[which].module.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().float().cpu().clone()
        return out


    @classmethod
    def holds_checkpoint(cls, folder: Path, which: str) -> bool:
        return (folder / which).is_dir() and any((folder / which).glob("*model_states.pt"))

    @classmethod
    def consolidate(cls, folder: Path, which: str, template=None) -> dict[str, torch.Tensor]:
        """DeepSpeed's own zero_to_fp32, in one process, no GPU needed."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=which)
        return {k: v.float().contiguous() for k, v in state.items()}
