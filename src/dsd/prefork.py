"""A warm interpreter for the pipeline's many short jobs: `python -m dsd` runs in a child forked from it.

A job of the embedded pipeline trains for seconds, but a fresh interpreter first spends seconds importing
torch, torch._dynamo (the optimizers pull it in), torchvision, torchaudio and wandb: over two hundred jobs a
large share of `make run` (`make bench`, section 6, measures it). So the first `python -m dsd` starts a server that imports all
of it once and then forks one child per job, as a DataLoader forks its workers from a process that has
torch imported. The child takes the job's arguments, working directory, environment and standard streams
(passed as file descriptors, so logs and progress go where the job's would), runs the same `dsd.cli.main`,
and its exit status becomes the job's. The client forwards signals to the child (SIGTERM still checkpoints
and stops); if the client dies, the child gets SIGTERM too.

On only with `DSD_PREFORK=1` (`make run` sets it for the embedded CPU pipeline), and even then off under
torchrun, inside SLURM jobs, off Linux, and where an NVIDIA driver is loaded (GPU jobs run for hours, and CUDA
must not be initialised before a fork). The socket lives in a folder private to the user (mode 0700, checked
before use); the client checks that the server runs as its own user before sending it anything, and the
server refuses connections from other users. The job's exit status comes back through a pipe of its own as
well, so a server that dies after the job ended cannot turn a finished job into a failure. A server serves
one key (interpreter, installed packages, dsd sources, the environment variables libraries read at import),
so an edit or an install starts a fresh one; it exits after IDLE_SECONDS without jobs. Its log is the socket
path + ".log". Jobs run as children of the server, so they are in its cgroup: schedulers other than
Snakemake's local one would not account for them (hence opt-in). This module imports only the
standard library: the client must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IDLE_SECONDS = 60.0
in_child = False  # True in a job forked from the server: torch was imported with the server's environment
CONNECT_SECONDS = 20.0  # the server binds within milliseconds of starting; this only covers a slow disk
WARM_MODULES = (
    "torch",
    "torch._dynamo",
    "torchvision",
    "torchaudio",
    "wandb",
    "wandb.sdk.launch.inputs.internal",  # what wandb.init imports on every run (about a second)
    "jiwer",
    "dsd.cli",
    "dsd.engine.trainer",
    "dsd.engine.evaluation",
    "dsd.engine.prepare",
    "dsd.report.tables",
    "dsd.tracks.vision.metric",
    "dsd.tracks.captioning.metric",
    "dsd.tracks.speech.metric",
)
_IMPORT_TIME_ENV = (
    "OMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA_", "PYTHON", "LD_", "WANDB_", "ATEN_", "ONEDNN_", "DNNL_",
)  # fmt: skip
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def enabled(environ=os.environ) -> bool:
    """Only when asked for (`DSD_PREFORK=1`, which `make run` sets for the embedded CPU pipeline)."""
    if environ.get("DSD_PREFORK", "0").lower() not in ("1", "on", "true", "yes"):
        return False
    if any(k in environ for k in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")):
        return False
    return (
        sys.platform == "linux" and hasattr(socket, "send_fds") and not Path("/proc/driver/nvidia").exists()
    )


def server_key(environ=os.environ) -> str:
    """Changes with the interpreter, any install into its site-packages, any dsd source, import-time env."""
    import site

    h = hashlib.sha256(f"{sys.executable}\0{sys.prefix}\0{os.getuid()}".encode())
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            h.update(f"{folder}:{os.stat(folder).st_mtime_ns}".encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".yaml", ".csv"):
            st = path.stat()
            h.update(f"{path}:{st.st_mtime_ns}:{st.st_size}".encode())
    for name in sorted(environ):
        if name.startswith(_IMPORT_TIME_ENV):
            h.update(f"{name}={environ[name]}".encode())
    return h.hexdigest()[:20]


def private_folder(environ=os.environ) -> Path | None:
    """The user's own folder for the socket (mode 0700): $DSD_PREFORK_DIR, else $XDG_RUNTIME_DIR/dsd-prefork,
    else <tmp>/dsd-prefork-<uid>. None when it exists but is not private (another owner, a symlink, group or
    other access): then nothing is served or sent through it."""
    if environ.get("DSD_PREFORK_DIR"):
        folder = Path(environ["DSD_PREFORK_DIR"])
    elif environ.get("XDG_RUNTIME_DIR"):
        folder = Path(environ["XDG_RUNTIME_DIR"]) / "dsd-prefork"
    else:
        folder = Path(tempfile.gettempdir()) / f"dsd-prefork-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700, parents=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return folder


def socket_path(key: str, environ=os.environ) -> Path | None:
    folder = private_folder(environ)
    return None if folder is None else folder / f"{key}.sock"


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# ----------------------------------------------------------------------------------------------- client


def run(argv: list[str]) -> int | None:
    """The job's exit status, run by a warm server; None when it must run in this process instead."""
    if not enabled():
        return None
    path = socket_path(server_key())
    if path is None:
        print("dsd: warm interpreter off: its socket folder is not private to this user", file=sys.stderr)
        return None
    try:
        conn = _connect(path)
    except OSError as err:
        print(f"dsd: warm interpreter unavailable ({err}); starting a fresh one", file=sys.stderr)
        return None
    if peer_uid(conn) != os.getuid():  # never hand our environment and streams to another user's process
        conn.close()
        print("dsd: warm interpreter refused: its server runs as another user", file=sys.stderr)
        return None
    status_r, status_w = os.pipe()  # the job's own exit status, even if the server dies before reporting it
    with conn:
        try:
            _send_request(conn, argv, status_w)
            os.close(status_w)
            reader = conn.makefile("rb")
            pid_line = reader.readline()
        except OSError:
            pid_line = b""
        if not pid_line:  # the server was exiting, nothing started: run here
            os.close(status_r)
            return None
        pid = int(pid_line)
        for sig in _FORWARDED:
            signal.signal(sig, lambda signum, frame: _forward(pid, signum))
        status = reader.readline()
    written = os.read(status_r, 64)  # the child has exited (the socket closed): its word is in the pipe
    os.close(status_r)
    if written:
        return int(written)
    if not status:
        print(f"dsd: the warm interpreter went away while running job pid {pid}", file=sys.stderr)
        return 1
    code = int(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _connect(path: Path) -> socket.socket:
    deadline = time.monotonic() + CONNECT_SECONDS
    started = False
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if not started:
                _start_server(path)
                started = True
            if time.monotonic() > deadline:
                raise OSError(f"no server at {path} after {CONNECT_SECONDS:.0f} s") from None
            time.sleep(0.01)


def _start_server(path: Path) -> None:
    with open(f"{path}.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "dsd.prefork", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in the job's process group: a job's Ctrl-C is forwarded, not broadcast
        )  # in the job's folder: it imports the dsd a fresh `python -m dsd` there would (PYTHONPATH=src, say)


def _send_request(conn: socket.socket, argv: list[str], status_fd: int) -> None:
    fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
    socket.send_fds(conn, [b"F"], [*fds, status_fd])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask()}
    payload = json.dumps(request).encode()
    conn.sendall(struct.pack("!I", len(payload)) + payload)


def _umask() -> int:
    mask = os.umask(0o022)  # reading it is setting it
    os.umask(mask)
    return mask


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- server


def serve(path: Path) -> None:
    # the folder it started in resolved the path as the first job's would; kept absolute, it holds no folder
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]
    path = path.absolute()
    os.chdir("/")
    lock = open(f"{path}.lock", "w")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server owns this path (two first jobs raced to start one)
    path.unlink(missing_ok=True)  # a socket file left by a server that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)  # the socket is created 0600: no window in which others may connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(128)  # clients queue here while the imports below run
    started = time.monotonic()
    warm_up()
    _log(f"serving {path} (imports took {time.monotonic() - started:.1f} s)")

    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd hears children exit
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    resources = (lock, listener, selector, wake_r, wake_w)
    while True:
        events = selector.select(timeout=None if children else IDLE_SECONDS)
        if not events and not children:
            break
        for key, _ in events:
            if key.fileobj is listener:
                _accept(listener, children, resources)
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        _reap(children)
    path.unlink(missing_ok=True)  # we hold the lock, so the socket file is ours
    _log("idle, exiting")


def warm_up() -> None:
    """Import WARM_MODULES, and nothing more: a parallel torch op here would start OpenMP's threads, which a forked
    child lacks, and the child's first parallel op would wait for them forever."""
    for name in WARM_MODULES:
        try:
            __import__(name)
        except Exception as err:  # an optional module missing: the job imports what it needs itself
            _log(f"warm-up: {name} not imported ({type(err).__name__}: {err})")


def _accept(listener: socket.socket, children: dict, resources: tuple) -> None:
    conn, _ = listener.accept()
    uid = peer_uid(conn)
    if uid != os.getuid():  # the folder is private; this is the second lock on the door
        _log(f"refused a connection from uid {uid}")
        conn.close()
        return
    conn.settimeout(10.0)  # a client that connects and sends nothing must not stall every other job
    fds: list[int] = []
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 4)
        if len(fds) != 4:
            raise ValueError(f"expected stdin, stdout, stderr and a status pipe, got {len(fds)} descriptors")
        (size,) = struct.unpack("!I", _read_exactly(conn, 4))
        request = json.loads(_read_exactly(conn, size))
    except (OSError, ValueError, struct.error) as err:
        _log(f"bad request: {err}")
        for fd in fds:  # the server must not collect the descriptors of requests it refused
            os.close(fd)
        conn.close()
        return
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        _child(request, fds, conn, resources, children)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    _log(f"pid {pid}: {' '.join(request['argv'][:1] + _brief(request['argv'][1:]))} in {request['cwd']}")
    try:
        conn.sendall(f"{pid}\n".encode())
    except OSError:
        _forward(pid, signal.SIGTERM)  # the client is already gone


def _reap(children: dict) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def _child(request: dict, fds: list[int], conn: socket.socket, resources: tuple, children: dict) -> None:
    """In the forked child: become the job, run it, exit with its status (never returns)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        lock, listener, selector, wake_r, wake_w = resources
        selector.close()
        listener.close()
        lock.close()  # the server's copy keeps the lock; a child outliving it must not block a new server
        for fd in (wake_r, wake_w):
            os.close(fd)
        for other in children.values():
            other.close()
        for target, fd in zip((0, 1, 2), fds[:3], strict=True):
            os.dup2(fd, target)
            os.close(fd)
        status_fd = fds[3]
        os.set_inheritable(status_fd, False)
        os.chdir(request["cwd"])
        os.umask(request["umask"])  # the job's, not that of the job that started the server
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.argv[0], *request["argv"]]
        from dsd import prefork  # this server runs as __main__; the job's code reads dsd.prefork

        prefork.in_child = True
        _fresh_random_state()
        threading.Thread(target=_stop_when_client_leaves, args=(conn,), daemon=True).start()
        from dsd.cli import main

        code = main(request["argv"])
    except SystemExit as stop:  # argparse errors and --help
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except KeyboardInterrupt:  # Ctrl-C forwarded by the client: the traceback and status of a fresh process
        import traceback

        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(Exception):
            os.write(status_fd, f"{code}\n".encode())  # the client's copy of the status, server or not
        os._exit(code)


def _stop_when_client_leaves(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    os.kill(os.getpid(), signal.SIGTERM)  # as if the job had been stopped: checkpoint and exit


def _fresh_random_state() -> None:
    """What a new interpreter would have: fresh entropy for random/numpy, torch's default initial seed."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(torch.initial_seed())


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("client closed the connection mid-request")
        data += chunk
    return data


def _brief(args: list[str]) -> list[str]:
    return [a if len(a) < 60 else a[:57] + "..." for a in args]


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
