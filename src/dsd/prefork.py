"""A warm interpreter for the pipeline's many short jobs: `python -m dsd` runs in a child forked from it.

A job of the embedded pipeline trains for seconds, but a fresh interpreter first spends 4-8 s on this
2-core CPU importing torch, torch._dynamo (the optimizers pull it in), torchvision, torchaudio and wandb: over
a hundred jobs that is a third of `make run`. So the first `python -m dsd` starts a server that imports all
of it once and then forks one child per job, as a DataLoader forks its workers from a process that has
torch imported. The child takes the job's arguments, working directory, environment and standard streams
(passed as file descriptors, so logs and progress go where the job's would), runs the same `dsd.cli.main`,
and its exit status becomes the job's. The client forwards signals to the child (SIGTERM still checkpoints
and stops); if the client dies, the child gets SIGTERM too.

Off with `DSD_PREFORK=0`; off by itself under torchrun, inside SLURM jobs, off Linux, and where an NVIDIA
driver is loaded (GPU jobs run for hours, and CUDA must not be initialised before a fork). A server serves
one key (interpreter, installed packages, dsd sources, the environment variables libraries read at import),
so an edit or an install starts a fresh one; it exits after IDLE_SECONDS without jobs. Its log is the socket
path + ".log"; the socket lives in the temp folder, or in `$DSD_PREFORK_DIR`. This module imports only the
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
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IDLE_SECONDS = 60.0
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
_IMPORT_TIME_ENV = ("OMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA_", "PYTHON", "LD_", "WANDB_")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def enabled(environ=os.environ) -> bool:
    if environ.get("DSD_PREFORK", "1").lower() in ("0", "off", "false", "no"):
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


def socket_path(key: str, environ=os.environ) -> Path:
    folder = Path(environ.get("DSD_PREFORK_DIR") or tempfile.gettempdir())
    return folder / f"dsd-prefork-{os.getuid()}-{key}.sock"


# ----------------------------------------------------------------------------------------------- client


def run(argv: list[str]) -> int | None:
    """The job's exit status, run by a warm server; None when it must run in this process instead."""
    if not enabled():
        return None
    path = socket_path(server_key())
    try:
        conn = _connect(path)
    except OSError as err:
        print(f"dsd: warm interpreter unavailable ({err}); starting a fresh one", file=sys.stderr)
        return None
    with conn:
        try:
            _send_request(conn, argv)
            reader = conn.makefile("rb")
            pid_line = reader.readline()
        except OSError:
            pid_line = b""
        if not pid_line:  # the server was exiting, nothing started: run here
            return None
        pid = int(pid_line)
        for sig in _FORWARDED:
            signal.signal(sig, lambda signum, frame: _forward(pid, signum))
        status = reader.readline()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "dsd.prefork", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in the job's process group: a job's Ctrl-C is forwarded, not broadcast
            cwd="/",
        )


def _send_request(conn: socket.socket, argv: list[str]) -> None:
    fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
    socket.send_fds(conn, [b"F"], fds)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    conn.sendall(struct.pack("!I", len(payload)) + payload)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- server


def serve(path: Path) -> None:
    lock = open(f"{path}.lock", "w")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server owns this path (two first jobs raced to start one)
    path.unlink(missing_ok=True)  # a socket file left by a server that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(128)  # clients queue here while the imports below run
    started = time.monotonic()
    for name in WARM_MODULES:
        try:
            __import__(name)
        except Exception as err:  # an optional module missing: the job imports what it needs itself
            _log(f"warm-up: {name} not imported ({type(err).__name__}: {err})")
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


def _accept(listener: socket.socket, children: dict, resources: tuple) -> None:
    conn, _ = listener.accept()
    conn.settimeout(10.0)  # a client that connects and sends nothing must not stall every other job
    fds: list[int] = []
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        if len(fds) != 3:
            raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} descriptors")
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
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.argv[0], *request["argv"]]
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
