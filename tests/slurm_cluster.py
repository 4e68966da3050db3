"""A throw-away one-node SLURM cluster on localhost, for tests: munged, slurmctld and slurmd as root.

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one temporary folder;
nothing under /etc is touched and the daemons use free ports, so it does not clash with a real installation.
The clients find the cluster through `SLURM_CONF` and an `srun` wrapper first on PATH (see `env()`). Needs root and Debian's `slurm-wlm` and
`munge` (`install()` runs apt-get). No accounting database: `sacct` does not work, poll with `squeue`.

    with SlurmCluster() as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
PARTITION = "main"


def installed() -> bool:
    return all(Path(path).exists() for path in DAEMONS) and shutil.which("sbatch") is not None


def install(timeout: float = 600) -> None:
    """apt-get update once, then install slurm-wlm and munge (about 10-60 s); no-op when installed."""
    if installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


# `python -c FAST_POLL_SNAKEMAKE <snakemake args>`: Snakemake with the SLURM executor polling at most every
# DSD_SLURM_POLL_SECONDS. The plugin waits 10 s longer after every poll that sees nothing finish (40, 50,
# 60 ... s by default), which is right for a real queue but turns a test of five 30-s jobs into ten minutes.
# Only the waiting between two squeue calls changes; submission, status parsing and the jobs do not.
FAST_POLL_SNAKEMAKE = """
import os, sys
import snakemake_executor_plugin_slurm as slurm
base = slurm.Executor.next_seconds_between_status_checks
cap = float(os.environ.get("DSD_SLURM_POLL_SECONDS", "5"))
slurm.Executor.next_seconds_between_status_checks = property(
    base.fget, lambda self, value: base.fset(self, None if value is None else min(value, cap))
)
from snakemake.cli import main
sys.argv[0] = "snakemake"
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class SlurmCluster:
    """One node (this machine, all its CPUs, 90% of its memory), one partition `main`, no GPUs."""

    def __init__(
        self, root: str | os.PathLike | None = None, min_job_age: int = 600, proctrack: str = "linuxproc"
    ):
        # a short path: the munge socket path must stay under the 108-byte limit of Unix sockets
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="dsd-slurm-"))
        self.min_job_age = min_job_age  # squeue status polling needs finished jobs to stay visible
        # linuxproc loses a step's processes once their parent dies; pgid, as a real cluster's cgroup, kills
        # every process a step leaves when its task ends (those of its process group: no cgroups here)
        self.proctrack = proctrack
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.sock"
        self._pidfiles = {
            "slurmd": self.root / "slurmd.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munged.pid",
        }

    def env(self, base: dict | None = None) -> dict:
        """The environment for SLURM clients (sbatch, squeue, snakemake) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":  # not the settings of an allocation this test might run inside
                del env[key]
        return env

    # --- start -----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise RuntimeError("the test cluster runs its daemons as root")
        if not installed():
            raise RuntimeError(f"install {' and '.join(PACKAGES)} first (SlurmCluster.install())")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._write_srun_wrapper()
        self._run(["/usr/sbin/slurmctld", "-f", str(self.conf)], "slurmctld")
        self._run(["/usr/sbin/slurmd", "-f", str(self.conf)], "slurmd")
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._run(
            [
                "/usr/sbin/munged",
                "--force",  # as root, in a folder munged would otherwise find too open
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self._pidfiles['munged']}",
                f"--log-file={self.root / 'logs' / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            "munged",
        )
        encode = subprocess.run(
            ["munge", "-S", str(self.munge_socket), "-n"], capture_output=True, timeout=10, check=True
        )
        decode = subprocess.run(
            ["unmunge", "-S", str(self.munge_socket)], input=encode.stdout, capture_output=True, timeout=10
        )
        if b"Success" not in decode.stdout:
            raise RuntimeError(f"munge does not work: {decode.stdout!r} {decode.stderr!r}")

    def _write_conf(self) -> None:
        root, node = self.root, self.node
        lines = [
            "ClusterName=dsdtest",
            f"SlurmctldHost={node}(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={self._pidfiles['slurmctld']}",
            f"SlurmdPidFile={self._pidfiles['slurmd']}",
            f"SlurmctldLogFile={root / 'logs' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'logs' / 'slurmd.log'}",
            f"ProctrackType=proctrack/{self.proctrack}",  # no cgroups in a container
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age}",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
            f"RealMemory={int(_memory_mb() * 0.9)} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)

    def _write_srun_wrapper(self) -> None:
        """An `srun` that finds this cluster: the jobstep executor runs `srun` inside each job with every
        SLURM_* variable but a few removed, SLURM_CONF too, and srun would then look for /etc/slurm/slurm.conf
        (which a real cluster has, and which this test must not write)."""
        srun = self.root / "bin" / "srun"
        srun.parent.mkdir(exist_ok=True)
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec /usr/bin/srun "$@"\n')
        srun.chmod(0o755)

    def _run(self, cmd: list[str], name: str) -> None:
        """Start a daemon (it forks into the background and writes its pid file)."""
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env())
        if result.returncode:
            raise RuntimeError(f"{name} did not start: {result.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + 15
        while not self._pid(name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file\n{self.logs()}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10, env=self.env()
            )
            state = (result.stdout or result.stderr).strip()
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:g} s (sinfo: {state!r})\n{self.logs()}")

    # --- stop ------------------------------------------------------------------------------------------

    def _pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self._pidfiles[name].read_text().strip())
        return None

    def stop(self, cleanup: bool = True) -> None:
        """Cancel what is left, stop the daemons by their pids (SIGTERM, then SIGKILL), remove the folder."""
        if self.conf.exists():
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True, timeout=10
                )
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if cleanup:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, tail: int = 30) -> str:
        out = []
        for log in sorted((self.root / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone (the daemons fork away from us, so this is rare)
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True
