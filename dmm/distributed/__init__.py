"""Process groups for the distributed engines, whatever started the processes.

`launch_env()` reads who we are from torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, failing those, from SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST, a port derived from the
job id). `init_process_group()` starts torch.distributed once from it (nccl on GPUs, gloo
otherwise). `agree()` turns an error raised on some ranks into the same error on every rank.
"""

from dmm.distributed.env import LaunchEnv, init_process_group, launch_env
from dmm.distributed.collective import CollectiveError, agree, all_gather_object

__all__ = ["CollectiveError", "LaunchEnv", "agree", "all_gather_object", "init_process_group", "launch_env"]
