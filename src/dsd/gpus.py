"""Distinct GPUs for concurrent jobs on one machine: one `flock`ed lock file per device.

Snakemake's `--resources gpu=N` limits how many GPUs the running jobs ask for together, but it does not say
*which* GPU a job gets (snakemake issue #116): four single-GPU jobs would all train on GPU 0. `acquire(n)`
picks `n` devices no other process holds, holds one lock file per device for the lifetime of the process,
and sets `CUDA_VISIBLE_DEVICES` to them. The locks are `fcntl.flock` locks, so the kernel releases them
when the last process holding them ends, also on a crash or `kill -9`: no stale marker files.

As a command prefix (what the Snakemake rules use), the locks go with the command through `exec`:

    python -m dsd.gpus 1 -- python -m dsd train ...
    python /path/to/dsd/gpus.py 2 --timeout 3600 -- torchrun ...   # same, without importing the dsd package
    python /path/to/dsd/gpus.py 2 --dsd -- train ...                # python -m dsd train, one rank per GPU

With `--dsd` and N > 1 the prefix does not exec: it stays the parent of N ranks of `python -m dsd` (see
`run_ranks`), forwards SIGTERM / SIGUSR1 to them and exits with their status. torchrun would not do: it turns
a signal into its own non-zero exit (Snakemake then deletes a phase its ranks finished) and leaves its ranks
running when it is killed. Each rank dies with the prefix and holds the lock files too, so the devices stay
locked while any rank lives. A `--dsd` command whose `--options` say `device: cpu` locks no GPU and runs
`gpus_per_job` ranks whatever N (the rules ask Snakemake for 0 GPUs for it).

On a machine without GPUs (or with `n` = 0) nothing is locked and nothing is changed. This module imports
only the standard library (torch only as a last resort to count devices), so the prefix costs milliseconds.

Where the locks live: `--lock-dir`, else `$DSD_GPU_LOCK_DIR`, else `/tmp/dsd-gpu-locks` (not $TMPDIR: users,
and Snakemake jobs with their `tmpdir` resource, set it apart, and jobs locking in two folders share GPUs);
inside a SLURM job a subfolder per job id, since SLURM already gives each job its own GPUs (the indices a job
sees may be renumbered from 0, so jobs must not compete for "GPU 0" across allocations), while the processes
inside one allocation (a Snakemake run under `salloc`) share its folder and get distinct devices of it. Each
of them holds a shared flock on `slurm-<id>.users` beside the folder; a folder whose file no process holds
(its job's processes ended) is removed by the next process on the machine that looks for its lock folder.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "GPUTimeoutError",
    "acquire",
    "cpu_isa_env",
    "cpus_per_job",
    "held",
    "job_cores",
    "keep_earlier_attempts",
    "lock_folder",
    "main",
    "release",
    "run_ranks",
    "visible_devices",
]

POLL_SECONDS = 0.2  # between two attempts while the wanted devices are busy (plus up to 50% jitter)
# After one rank failed, how long the others may take to end on their own before they are killed: ranks fail
# together (a config error, a signal, a non-finite loss), so one still running past this waits in a collective
# for the failed rank, until NCCL's or gloo's own timeout (minutes).
FAILED_RANK_GRACE_SECONDS = 30.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2)
RENDEZVOUS_PREFIX = "dsd-rendezvous-"  # + the prefix's pid: a folder of a prefix gone is removed

_held: dict[str, int] = {}  # device id (as in CUDA_VISIBLE_DEVICES) -> open, flocked fd
_saved_env: list[str | None] = []  # CUDA_VISIBLE_DEVICES before acquire(), restored by release()
_job_users: dict[str, int] = {}  # SLURM job id -> open fd of its folder's `.users` file, flocked shared


class GPUTimeoutError(TimeoutError):
    """Raised when `n` devices did not become free within the timeout."""


def lock_folder(path: str | os.PathLike | None = None) -> Path:
    """The folder of the lock files (see the module docstring); created if missing. Inside a SLURM job, this
    process uses its job's folder until `release()` or its end; folders of jobs no process uses are removed."""
    if path is not None:
        return _shared_folder(Path(path))
    path = _shared_folder(Path(os.environ.get("DSD_GPU_LOCK_DIR") or _machine_tmp() / "dsd-gpu-locks"))
    _sweep_job_folders(path)
    job = os.environ.get("SLURM_JOB_ID")
    return _join_job_folder(path, job) if job else path


def _join_job_folder(parent: Path, job: str) -> Path:
    """`parent/slurm-<job>`, marked in use by a shared flock on `slurm-<job>.users` beside it, held as the GPU
    locks are (through exec, until release() or the process's end): the kernel drops it when the last process
    of the job using the folder ends, also on kill -9, and the folder can then be swept."""
    if job not in _job_users:
        _job_users[job] = _hold_shared(parent / f"slurm-{job}.users")
    return _shared_folder(parent / f"slurm-{job}")


def _hold_shared(path: Path) -> int:
    """A shared flock on the file at `path`, still that file once held: a sweeper unlinks it while holding it
    exclusively, and a lock on an unlinked file would keep nothing from being swept."""
    while True:
        fd = _open(path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _is_file_at(fd, path):
            return fd
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    held_file = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held_file.st_dev, held_file.st_ino)


def _sweep_job_folders(parent: Path) -> None:
    """Remove the SLURM job folders whose `.users` file no process holds (the job's processes using it ended),
    the folder first, then the file, under its exclusive lock: a process joining meanwhile waits for it, then
    finds the file gone and starts a new one. Another user's folder may not be removable (sticky): kept."""
    for users in parent.glob("slurm-*.users"):
        try:
            fd = os.open(users, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if _try_lock(fd) and _is_file_at(fd, users):
                folder = parent / users.name.removesuffix(".users")
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    users.unlink(missing_ok=True)
        finally:
            os.close(fd)  # drops the exclusive lock


def _shared_folder(path: Path) -> Path:
    """`path`, created if missing as /tmp is (sticky, every user may add files): another user's jobs on this
    machine create their lock files and SLURM job folders in it."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # mkdir's mode is cut by the umask
            path.chmod(0o1777)
    return path


def _machine_tmp() -> Path:
    """The machine's temporary folder, the same for every process whatever its TMPDIR."""
    return Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())


def _count_devices() -> int:
    """How many CUDA devices this machine has, cheaply: no torch when there is no GPU driver at all."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    if nvidia.is_dir():
        return sum(1 for _ in nvidia.iterdir())
    if not Path("/dev/kfd").exists():  # neither NVIDIA nor ROCm driver: no CUDA device
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def visible_devices() -> list[str]:
    """The device ids a process may use: the entries of CUDA_VISIBLE_DEVICES, else 0 .. count-1."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every device
        return ids[: ids.index("-1")] if "-1" in ids else ids
    return [str(i) for i in range(_count_devices())]


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _open(path: Path) -> int:
    """The lock file, read-only (flock needs no write access); created only when missing, since O_CREAT on
    another user's file in a sticky shared folder is refused where fs.protected_regular is set (systemd's
    default)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            os.fchmod(fd, 0o644)  # readable by every user whatever this one's umask: their flock needs it
        except FileExistsError:  # another job created it in between
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.set_inheritable(fd, True)  # the locks must survive exec into the training command
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def acquire(
    n: int,
    total: int | None = None,
    lock_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> list[int]:
    """Lock `n` free devices, point CUDA_VISIBLE_DEVICES at them, and return their indices.

    `total`: how many devices to share (default: all visible ones): devices 0 .. total-1, or the first
    `total` entries of CUDA_VISIBLE_DEVICES when it is set. `total=4` on a CPU machine is what the tests use.
    The indices returned are positions in that list, equal to the device numbers when CUDA_VISIBLE_DEVICES
    was not set. Blocks until `n` devices are free at the same time, or raises GPUTimeoutError after
    `timeout` seconds (None: wait forever). Returns [] and changes nothing when `n` is 0 or there is no
    device. The locks stay held until `release()` or the end of the process (and of any process it `exec`s
    or forks that keeps the descriptors open).
    """
    if n < 0:
        raise ValueError(f"cannot acquire {n} GPUs")
    if total is None:
        devices = visible_devices()
    elif total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        devices = [str(i) for i in range(total)]  # no need to count: the caller says how many there are
    else:
        devices = visible_devices()
        if total > len(devices):
            raise ValueError(f"total={total} but CUDA_VISIBLE_DEVICES lists only {len(devices)} devices")
        devices = devices[:total]
    if n == 0 or not devices:
        return []
    if n > len(devices):
        raise ValueError(f"asked for {n} GPUs but only {len(devices)} are visible ({','.join(devices)})")
    if _held:
        raise RuntimeError(f"this process already holds GPUs {','.join(_held)}; call release() first")

    folder = lock_folder(lock_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    fds = {device: _open(folder / _lock_name(device)) for device in devices}
    guard = _open(folder / "allocate.lock")  # one allocation at a time: no two half-allocations starving
    try:
        while True:
            fcntl.flock(guard, fcntl.LOCK_EX)
            got = []
            try:
                for device in devices:
                    if _try_lock(fds[device]):
                        got.append(device)
                        if len(got) == n:
                            break
                if len(got) < n:
                    for device in got:
                        fcntl.flock(fds[device], fcntl.LOCK_UN)
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
            if len(got) == n:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise GPUTimeoutError(
                    f"dsd.gpus: {n} of {len(devices)} GPUs ({','.join(devices)}) did not become free within "
                    f"{timeout:g} s; lock files in {folder} (a device is busy while a process holds its lock)"
                )
            pause = POLL_SECONDS * (1 + 0.5 * random.random())
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        os.close(guard)
    for device, fd in fds.items():
        if device in got:
            _held[device] = fd
        else:
            os.close(fd)
    _saved_env[:] = [os.environ.get("CUDA_VISIBLE_DEVICES")]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(got)
    return [devices.index(device) for device in got]


def held() -> list[str]:
    """The device ids this process holds (as written to CUDA_VISIBLE_DEVICES)."""
    return list(_held)


def release() -> None:
    """Give the devices back now (otherwise that happens when the process ends); restore the environment."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)  # closing the last descriptor of the open file releases its flock
    while _job_users:  # this process no longer uses its SLURM job's folder
        _, fd = _job_users.popitem()
        os.close(fd)
    if _saved_env:
        previous = _saved_env.pop()
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def cpu_isa_env(isa: str, device: str) -> dict[str, str]:
    """Environment that limits torch's CPU kernels to one instruction set: ATen's own, oneDNN's (convolutions)
    and MKL's (matrix products, in its conditional-reproducibility mode), so that an AVX-512 machine does not
    sum in its own order. It does not make every CPU compute the same bits (results/published/PROVENANCE.md:
    an AVX-512 Xeon so pinned trained other weights than the AVX2 machine). Empty for GPU runs and `native`.
    Read when torch starts: set it before the job's interpreter imports torch."""
    gpu = device == "cuda" or (device == "auto" and _count_devices() > 0)
    if isa == "native" or gpu:
        return {}
    return {"ATEN_CPU_CAPABILITY": isa, "ONEDNN_MAX_CPU_ISA": isa.upper(), "MKL_CBWR": isa.upper()}


def cpus_per_job(
    gpus_per_job: int, cores: int | None = None, gpus: int | None = None, processes: int | None = None
) -> tuple[int, int]:
    """(threads, DataLoader workers per process) for `threads: auto` / `workers: auto`: this node's cores shared
    by the GPU jobs that run on it at once (one per `gpus_per_job` GPUs), a core per process kept for its main
    thread. `processes`: how many processes share a job's threads, default `gpus_per_job` (a training job's
    ranks); 1 for a job that runs one process (an evaluation). Without a GPU: one thread, no workers (the
    embedded jobs are many and short; cores run jobs)."""
    cores = cores if cores is not None else job_cores()
    gpus = gpus if gpus is not None else len(visible_devices())
    if gpus == 0:
        return 1, 0
    threads = max(1, cores // max(1, gpus // gpus_per_job))
    return threads, max(0, threads // (processes or gpus_per_job) - 1)


def job_cores() -> int:
    """This process's cores, and inside a SLURM job no more than its --cpus-per-task: SLURM pins a job to its
    CPUs only with an affinity or cgroup task plugin (with task/none a job sees the whole node's)."""
    cores = len(os.sched_getaffinity(0))
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else cores


def _die_with(parent: int, sig: int = signal.SIGKILL) -> None:
    """In a child (a rank before exec, a featurising or loader worker): `sig` when `parent` dies (also by
    kill -9), as none may outlive it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):  # not Linux: may outlive a killed parent
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), sig)


def _start_rank(parent: int) -> None:
    """In a rank, before exec: a process group of its own, so that a terminal's Ctrl-C (sent to the prefix's
    group) reaches it once, forwarded, not twice (a second Ctrl-C means "stop at once"); it dies with the
    prefix."""
    os.setpgid(0, 0)
    _die_with(parent)


def _rank_env(rank: int, n: int, rendezvous: str) -> dict[str, str]:
    """What torchrun would set, with a file store for the rendezvous: no port to collide with another job."""
    world = str(n)
    ids = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    return os.environ | ids | {"DSD_RENDEZVOUS": rendezvous}


def _exit_status(status: int) -> int:
    """A rank's wait status as a shell would report it (128 + N when signal N ended it)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_ranks(n: int, args: list[str], python: str = sys.executable) -> int:
    """Run `python -m dsd ARGS` as ranks 0 .. n-1 and return their exit status (the first failure's).

    SIGTERM, SIGUSR1, SIGINT and SIGHUP go on to every rank (a rank that also got one directly, from a
    scheduler signalling every process of the job, just sees it twice). The ranks inherit the lock files and
    die with this process, whatever ends it."""
    ranks: list[subprocess.Popen] = []

    def forward(signum, frame):
        for rank in ranks:
            if rank.returncode is None:  # not reaped by _wait_for, so its pid is still its own
                with contextlib.suppress(ProcessLookupError):
                    # not rank.send_signal: its poll() reaps a rank that has just exited, whose status
                    # _wait_for then never sees (the ranks failed, the prefix reported success)
                    os.kill(rank.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    remove_stale_rendezvous()
    parent = os.getpid()
    folder = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{parent}-")
    try:
        for rank in range(n):
            ranks.append(
                subprocess.Popen(
                    [python, "-m", "dsd", *args],
                    env=_rank_env(rank, n, f"file://{folder}/store"),
                    pass_fds=tuple(_held.values()),
                    preexec_fn=lambda: _start_rank(parent),
                )
            )
        return _wait_for(ranks)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_rendezvous(folder: str | None = None) -> None:
    """Delete the rendezvous folders of prefixes that no longer run (a prefix killed with kill -9 cannot
    remove its own): `dsd-rendezvous-<pid>-*` under the temporary folder, whose pid is gone."""
    for path in Path(folder or tempfile.gettempdir()).glob(f"{RENDEZVOUS_PREFIX}*-*"):
        pid = path.name.removeprefix(RENDEZVOUS_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    """As `dsd.paths._alive`: this module runs without the dsd package (a script path), so it has its own."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _wait_for(ranks: list[subprocess.Popen]) -> int:
    """Wait for every rank; once one failed, give the others FAILED_RANK_GRACE_SECONDS, then kill them. A rank
    ended by a signal (the OOM killer's SIGKILL) prints nothing itself: said here, in the job's log."""
    failed, deadline, first = 0, None, None
    running = {rank.pid: rank for rank in ranks}
    while running:
        if deadline is not None and time.monotonic() >= deadline:
            for rank in running.values():
                rank.kill()
                _say(
                    f"rank {ranks.index(rank)} still running {FAILED_RANK_GRACE_SECONDS} s after rank "
                    f"{ranks.index(first)} failed: killed"
                )
            deadline = float("inf")
        try:
            pid, status = os.waitpid(-1, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover (PEP 475 retries)
            continue
        if pid == 0:
            time.sleep(POLL_SECONDS)
            continue
        rank = running.pop(pid, None)
        if rank is None:
            continue
        rank.returncode = code = _exit_status(status)
        if os.WIFSIGNALED(status) and deadline != float("inf"):  # not one this function killed
            name = signal.Signals(os.WTERMSIG(status)).name
            _say(f"rank {ranks.index(rank)} ended by {name} (exit status {code})")
        if code and not failed:
            failed, deadline, first = code, time.monotonic() + FAILED_RANK_GRACE_SECONDS, rank
    return failed


def _say(message: str) -> None:
    print(f"dsd.gpus: {message}", file=sys.stderr, flush=True)


def _run_options(dsd_args: list[str]) -> dict:
    """A dsd command's run options (`--options JSON`, as the rules pass them); {} where it gives none."""
    if "--options" not in dsd_args[:-1]:
        return {}
    try:
        options = json.loads(dsd_args[dsd_args.index("--options") + 1])
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


def _arg(args: list[str], flag: str) -> str | None:
    """The value after `flag` in `args`, or None."""
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _stderr_file() -> Path | None:
    """The regular file stderr writes to (a rule's `2> log`), by its current name; None for a terminal or a
    pipe, or off Linux."""
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            return None
        path = Path(os.readlink("/proc/self/fd/2"))
        return path if path.is_absolute() and _is_file_at(2, path) else None
    except OSError:
        return None


def keep_earlier_attempts(dsd_args: list[str]) -> None:
    """A `--dsd train` job whose stderr is a file (its rule's log) that continues its phase from a resume point
    (after a time limit, a preemption, a kill): the earlier attempts' lines go back into the log, above a line
    marking this attempt. Snakemake deletes a job's log before each attempt (a `retries` resubmission, a rerun),
    so each attempt's log is kept as a hard link beside it, `.<log>.attempts`, its name for the next attempt.
    A phase starting afresh starts its log afresh. Best effort: a file system without hard links keeps none."""
    out, log = _arg(dsd_args, "--out"), _stderr_file()
    if not dsd_args or dsd_args[0] != "train" or out is None or log is None:
        return
    kept = log.with_name(f".{log.name}.attempts")
    with contextlib.suppress(OSError):
        continues = (Path(out) / "resume.pt").exists()  # dsd.paths.resume: this module imports no dsd
        if continues and kept.is_file() and not _is_file_at(2, kept):  # not when the log was kept (`2>>`)
            _copy_into_stderr(kept)
            _say(f"a new attempt at this phase ({_where_and_when()}); above: the earlier ones")
        link = kept.with_name(f"{kept.name}.{os.getpid()}")
        os.link(log, link)
        try:
            os.replace(link, kept)
        finally:
            link.unlink(missing_ok=True)


def _where_and_when() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return ", ".join(
        [time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.uname().nodename] + ([f"SLURM job {job}"] if job else [])
    )


def _copy_into_stderr(path: Path) -> None:
    with open(path, "rb") as earlier:
        shutil.copyfileobj(earlier, sys.stderr.buffer)
    sys.stderr.flush()


def _dsd_ranks_and_devices(n: int, dsd_args: list[str]) -> tuple[int, int]:
    """(ranks, GPUs to lock) of a `--dsd` command. With `device: cpu` it locks no GPU (one would only keep other
    jobs waiting, one at a time per GPU) and the rules ask Snakemake for none (N = 0), so its ranks (gloo) are
    the options' `gpus_per_job`."""
    options = _run_options(dsd_args)
    if options.get("device") == "cpu":
        per_job = options.get("gpus_per_job")
        return (per_job if isinstance(per_job, int) and per_job > 0 else max(n, 1)), 0
    return max(n, 1), n


def main(argv: list[str] | None = None) -> int:
    """`python -m dsd.gpus N [--timeout S] [--total T] [--lock-dir D] -- command ...`: lock, then exec."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    else:
        command = []
    parser = argparse.ArgumentParser(
        prog="python -m dsd.gpus",
        description="Lock N free GPUs, set CUDA_VISIBLE_DEVICES to them and exec the command "
        "(the locks are held until it ends).",
        usage="%(prog)s N [options] -- command [args ...]",
    )
    parser.add_argument("n", type=int, help="how many GPUs the command needs (0: run it unchanged)")
    parser.add_argument("--total", type=int, help="share only the first T visible devices")
    parser.add_argument(
        "--lock-dir", help="folder of the lock files (default: $DSD_GPU_LOCK_DIR or /tmp/dsd-gpu-locks)"
    )
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait)")
    parser.add_argument("--quiet", action="store_true", help="do not print the devices chosen")
    parser.add_argument(
        "--dsd",
        action="store_true",
        help="the command is dsd's arguments: run `python -m dsd`, as N ranks (DDP) when N > 1",
    )
    args = parser.parse_args(argv)
    if not command:
        parser.error("give the command after --")
    if args.dsd:
        keep_earlier_attempts(command)
    ranks, devices = _dsd_ranks_and_devices(args.n, command) if args.dsd else (1, args.n)
    if args.dsd and ranks == 1:
        command = [sys.executable, "-m", "dsd", *command]
    try:
        chosen = acquire(devices, total=args.total, lock_dir=args.lock_dir, timeout=args.timeout)
    except (GPUTimeoutError, ValueError, RuntimeError, OSError) as err:
        print(f"dsd: error: {err}", file=sys.stderr)
        return 2
    if chosen and not args.quiet:
        print(
            f"dsd.gpus: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}",
            file=sys.stderr,
            flush=True,
        )
    if ranks > 1:
        return run_ranks(ranks, command)
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"dsd: error: cannot run {command[0]!r}: {err}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
