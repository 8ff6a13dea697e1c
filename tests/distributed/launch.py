"""Start the distributed worker as real processes (torchrun or the deepspeed launcher)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # MKL_CBWR: MKL's strict conditional numerical reproducibility, so that a GEMM's result does not
    # depend on where its operands happen to lie in memory (bitwise resume on CPU).
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1",
              "MKL_CBWR": "AUTO,STRICT",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", "")})
    return e


def launch(args: list[str], *, nproc: int = 2, launcher: str = "torchrun", timeout: float = 600,
           script: Path = WORKER) -> subprocess.CompletedProcess:
    port = str(free_port())
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        cmd = [exe, "--num_gpus", str(nproc), "--master_port", port, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port, str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (proc.stdout + "\n" + proc.stderr)[-n:]


def error_lines_of_two_ranks(recipe: Path, timeout: float = 300) -> list[str]:
    """Run `launchers/train.py` as two ranks (torchrun's worker environment, so each rank's own
    stderr and exit status can be read: torchrun would kill the slower rank once one exits) and
    return each rank's one `error:` line, after checking that both exited 2 without a traceback."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env()
        e.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DMM_DIST_TIMEOUT_S": "120"})
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launchers" / "train.py"), "--recipe", str(recipe)],
                                      cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    lines = []
    for rank, (proc, (_, stderr)) in enumerate(zip(procs, outs)):
        assert proc.returncode == 2, f"rank {rank} exited {proc.returncode}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"rank {rank}:\n{stderr[-3000:]}"
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"rank {rank}:\n{stderr[-3000:]}"
        lines.append(errors[0])
    return lines
