#!/usr/bin/env python
"""Start or stop a real one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) in a folder.

  python scripts/slurm/local_cluster.py start  ROOT     # prints `export SLURM_CONF=ROOT/etc/slurm.conf`
  python scripts/slurm/local_cluster.py stop   ROOT
  python scripts/slurm/local_cluster.py status ROOT

Needs root and Debian's slurmctld, slurmd, slurm-client, munge, slurmdbd and mariadb-server
(.ci/run installs them). Every daemon's state, logs and pid files live under ROOT; `stop` cancels
the jobs and ends, by the pid in its own pid file, each daemon this script started (a munged
that was already running is left alone). Daemons listen on 127.0.0.1 on non-default ports.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORTS = {"ctld_port": 16817, "slurmd_port": 16818, "dbd_port": 16819, "db_port": 13306}
NEEDED = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "scontrol", "sacct", "munged", "mariadbd",
          "mariadb-install-db")


class ClusterError(RuntimeError):
    pass


def missing_programs() -> list[str]:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in NEEDED if shutil.which(p, path=paths) is None]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)


def _wait(what: str, check, timeout: float = 60.0, log: Path | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.3)
    extra = f"; last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]) if log and log.is_file() else ""
    raise ClusterError(f"timed out waiting for {what}{extra}")


def _alive(pidfile: Path, name: str) -> int | None:
    """The pid in `pidfile` if that process runs and is `name` (not a zombie)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return None
    comm, state = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2]
    return pid if name.startswith(comm[:15]) and state not in "ZX" else None


def _fill(template: Path, out: Path, values: dict, mode: int = 0o644) -> None:
    text = string.Template(template.read_text()).substitute(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, out)


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


def env(root: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(Path(root) / "etc" / "slurm.conf")}


def _munge_ok() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True,
                                                      timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start(root: str | Path) -> dict:
    """Start every daemon (idempotent); returns the environment for SLURM clients."""
    if os.geteuid() != 0:
        raise ClusterError("the local SLURM cluster needs root (daemons run as SlurmUser=root)")
    missing = missing_programs()
    if missing:
        raise ClusterError(f"SLURM/munge/MariaDB programs missing: {missing} (see .ci/run)")
    root = Path(root).resolve()
    for sub in ("etc", "state", "spool", "run", "log", "db"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    pass_file = root / "etc" / "db_pass"
    if not pass_file.is_file():
        pass_file.write_text(secrets.token_hex(12))
        os.chmod(pass_file, 0o600)
    values = {"host": host, "root": str(root), "cpus": os.cpu_count() or 1, "memory_mb": _memory_mb(),
              "db_pass": pass_file.read_text().strip(), **PORTS}
    _fill(HERE / "slurm.conf.in", root / "etc" / "slurm.conf", values)
    _fill(HERE / "slurmdbd.conf.in", root / "etc" / "slurmdbd.conf", values, mode=0o600)
    e = env(root)

    # 1. munge (shared by the machine: reuse a running one, remember whether we started it)
    if not _munge_ok():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        r = _run(["runuser", "-u", "munge", "--", _which("munged")])
        if r.returncode != 0:
            raise ClusterError(f"munged did not start: {r.stderr.strip()}")
        _wait("munge", _munge_ok, 20)
        pid = Path("/run/munge/munged.pid")
        if pid.is_file():
            shutil.copy(pid, root / "run" / "munged.pid")  # ours: stop() may end it

    # 2. MariaDB on 127.0.0.1 with a private datadir, a `slurm` user for slurmdbd
    db, sock = root / "db", root / "run" / "mariadb.sock"
    if not (db / "mysql").is_dir():
        r = _run([_which("mariadb-install-db"), "--user=root", f"--datadir={db}",
                  "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120)
        if r.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {r.stderr[-2000:]}")
    if _alive(root / "run" / "mariadbd.pid", "mariadbd") is None:
        log = open(root / "log" / "mariadbd.log", "ab")
        subprocess.Popen([_which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={db}",
                          f"--socket={sock}", f"--port={PORTS['db_port']}", "--bind-address=127.0.0.1",
                          "--skip-name-resolve", f"--pid-file={root / 'run' / 'mariadbd.pid'}",
                          "--innodb-buffer-pool-size=32M"], stdout=log, stderr=log, start_new_session=True)
        _wait("mariadbd", lambda: sock.exists() and _alive(root / "run" / "mariadbd.pid", "mariadbd") is not None,
              60, root / "log" / "mariadbd.log")
        sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{values['db_pass']}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        r = _run(["mariadb", f"--socket={sock}", "-u", "root", "-e", sql])
        if r.returncode != 0:
            raise ClusterError(f"could not create the slurm database user: {r.stderr.strip()}")

    # 3. slurmdbd, 4. slurmctld, 5. slurmd
    if _alive(root / "run" / "slurmdbd.pid", "slurmdbd") is None:
        r = _run([_which("slurmdbd")], env={**e, "SLURM_CONF": str(root / "etc" / "slurm.conf")},
                 cwd=root, timeout=60)
        # slurmdbd reads slurmdbd.conf next to slurm.conf
        if r.returncode != 0:
            raise ClusterError(f"slurmdbd failed: {r.stderr.strip()}")
        _wait("slurmdbd", lambda: _alive(root / "run" / "slurmdbd.pid", "slurmdbd") is not None, 30,
              root / "log" / "slurmdbd.log")
        _wait("slurmdbd port", lambda: _port_open(PORTS["dbd_port"]), 30, root / "log" / "slurmdbd.log")
    if _alive(root / "run" / "slurmctld.pid", "slurmctld") is None:
        r = _run([_which("slurmctld")], env=e)
        if r.returncode != 0:
            raise ClusterError(f"slurmctld failed: {r.stderr.strip()}")
        _wait("slurmctld", lambda: "UP" in _run(["scontrol", "ping"], env=e).stdout, 60,
              root / "log" / "slurmctld.log")
    # The cluster and an account in the accounting database (jobs are refused without them).
    _run(["sacctmgr", "-i", "add", "cluster", "dmmtest"], env=e)
    _run(["sacctmgr", "-i", "add", "account", "dmm", "Cluster=dmmtest"], env=e)
    _run(["sacctmgr", "-i", "add", "user", "root", "Account=dmm", "Cluster=dmmtest"], env=e)
    if _alive(root / "run" / "slurmd.pid", "slurmd") is None:
        r = _run([_which("slurmd"), "-N", host], env=e)
        if r.returncode != 0:
            raise ClusterError(f"slurmd failed: {r.stderr.strip()}")
    _wait("an idle node", lambda: "idle" in _run(["sinfo", "-h", "-o", "%T"], env=e).stdout, 60,
          root / "log" / "slurmd.log")
    return e


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(root: str | Path) -> None:
    root = Path(root).resolve()
    e = env(root)
    if (root / "etc" / "slurm.conf").is_file() and _alive(root / "run" / "slurmctld.pid", "slurmctld"):
        _run(["scancel", "--user", "root", "--full"], env=e)
    for name, pidfile in [("slurmd", "slurmd.pid"), ("slurmctld", "slurmctld.pid"), ("slurmdbd", "slurmdbd.pid"),
                          ("mariadbd", "mariadbd.pid"), ("munged", "munged.pid")]:
        pid = _alive(root / "run" / pidfile, name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        end = time.time() + 20
        while time.time() < end and _alive(root / "run" / pidfile, name):
            time.sleep(0.2)
        if _alive(root / "run" / pidfile, name):
            os.kill(pid, signal.SIGKILL)
    (root / "run" / "munged.pid").unlink(missing_ok=True)


def status(root: str | Path) -> dict[str, bool]:
    root = Path(root).resolve()
    return {n: _alive(root / "run" / f"{n}.pid", n) is not None
            for n in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    action, root = args
    try:
        if action == "start":
            start(root)
            print(f"export SLURM_CONF={Path(root).resolve() / 'etc' / 'slurm.conf'}")
        elif action == "stop":
            stop(root)
        else:
            for name, up in status(root).items():
                print(f"{name}: {'running' if up else 'stopped'}")
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
