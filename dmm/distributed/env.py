"""Rank, world size and rendezvous address from torchrun, the deepspeed launcher or SLURM."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list ("gpu[003-005,9],cpu1" -> "gpu003")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\],\-]+)", head)
    return m.group(1) + m.group(2) if m else head


def launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or set by hand
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or 0)
        port = int(env.get("MASTER_PORT") or 20000 + job % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or first_host(nodelist), port, "slurm")
    return LaunchEnv()


def init_process_group(timeout_s: float | None = None) -> LaunchEnv:
    """Start torch.distributed (once) for this process; returns who we are. One process: nothing to start."""
    info = launch_env()
    if not info.distributed or torch.distributed.is_initialized():
        return info
    # torch's env:// rendezvous reads these; SLURM does not set them.
    os.environ.update({"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
                       "LOCAL_RANK": str(info.local_rank), "MASTER_ADDR": info.master_addr,
                       "MASTER_PORT": str(info.master_port)})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("DMM_DIST_TIMEOUT_S", 1800)))
    torch.distributed.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                         timeout=timeout)
    return info


def device_for(info: LaunchEnv) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
