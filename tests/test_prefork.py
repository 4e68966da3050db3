"""The warm interpreter (dsd.prefork): a job run in a forked child must be the job a fresh process runs."""

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, parse, prepare_data, tiny_vision_config
from test_reliability import slow_sparse_config, strip

from dsd import paths, prefork


def dsd_command(*args, env, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "dsd", *args], env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


@pytest.fixture
def sockets():
    """A short folder of its own: a unix socket path must stay under 108 bytes (pytest's tmp paths are long).
    The servers the test started stop with it: each would idle on for a minute, torch imported."""
    folder = Path(tempfile.mkdtemp(prefix="dsd-pf-"))
    yield folder
    for pid in _server_pids(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)


def served_jobs(folder) -> list[str]:
    return [line for log in folder.glob("*.log") for line in log.read_text().splitlines() if "pid " in line]


def test_a_job_in_the_warm_interpreter_equals_one_in_a_fresh_process(tmp_path, sockets):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    job = ["--spec", config.phase("resnet18", 0, "dense").to_json(), "--options", config.options.to_json()]
    warm = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    cold = os.environ | {"DSD_PREFORK": "0", "DSD_PREFORK_DIR": str(sockets)}
    runs = {}
    for name, env in (("warm", warm), ("cold", cold), ("warm-again", warm)):
        out = tmp_path / name
        result = dsd_command("train", *job, "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr
        assert "resnet18 seed 0 dense" in result.stdout  # the child wrote to the job's own stdout
        runs[name] = out
    assert len(served_jobs(sockets)) == 2, served_jobs(sockets)  # the cold run did not go through the server
    metrics = {k: json.loads(paths.metrics(v).read_text()) for k, v in runs.items()}
    assert strip(metrics["warm"]) == strip(metrics["cold"]) == strip(metrics["warm-again"])
    models = {k: torch.load(paths.checkpoint(v), weights_only=True)["model"] for k, v in runs.items()}
    for name, weight in models["cold"].items():
        assert torch.equal(weight, models["warm"][name]) and torch.equal(weight, models["warm-again"][name])


def test_a_job_pinning_the_instruction_set_gets_its_kernels_from_the_warm_interpreter(tmp_path, sockets):
    """The server's torch started without the pin (a `DSD_PREFORK=1` call by hand): the job that asks for
    `cpu_isa: avx2` reruns itself in a fresh interpreter, so its kernels are AVX2 ones, not the server's."""
    config = parse(tiny_vision_config(tmp_path) | {"cpu_isa": "avx2"})
    prepare_data(config, "resnet18")
    job = ["--spec", config.phase("resnet18", 0, "dense").to_json()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_CBWR"))}
    env |= {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    native = config.options.to_json().replace('"avx2"', '"native"')
    for name, options in (("native", native), ("avx2", config.options.to_json())):
        result = dsd_command("train", *job, "--options", options, "--out", str(tmp_path / name), env=env)
        assert result.returncode == 0, result.stderr
    capability = {
        n: json.loads(paths.metrics(tmp_path / n).read_text())["cpu_capability"] for n in ("native", "avx2")
    }
    probe = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
    fresh = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert capability == {"native": fresh, "avx2": "AVX2"}, capability
    assert (
        len(served_jobs(sockets)) == 2
    )  # both went to the server; the pinned one left it for a fresh process


def test_exit_status_and_error_line_pass_through(tmp_path, sockets):
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    result = dsd_command("check-config", str(tmp_path / "missing.yaml"), env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("dsd: error:") and "missing.yaml" in result.stderr, result.stderr
    usage = dsd_command("train", "--no-such-flag", env=env)  # argparse's exit inside the child
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-flag" in usage.stderr
    assert len(served_jobs(sockets)) == 2


def test_the_warm_job_runs_the_code_a_fresh_one_would(tmp_path, sockets):
    """Another checkout of dsd found the way a fresh `python -m dsd` finds it (here PYTHONPATH=src, relative to
    the job's folder): the server imports that one too, not the one installed in the environment."""
    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO / "src" / "dsd", checkout / "src" / "dsd", ignore=shutil.ignore_patterns("__pycache__")
    )
    cli = checkout / "src" / "dsd" / "cli.py"
    cli.write_text(cli.read_text().replace(": ok ({counted(", ": ok in the checkout ({counted("))
    config = shutil.copy(REPO / "configs" / "default.yaml", checkout / "default.yaml")
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets), "PYTHONPATH": "src"}
    result = dsd_command("check-config", config, env=env, cwd=checkout)
    assert result.returncode == 0, result.stderr
    assert "ok in the checkout" in result.stdout, result.stdout
    assert len(served_jobs(sockets)) == 1


def test_the_warm_job_creates_files_with_its_own_umask(tmp_path, sockets):
    """The server was started by an earlier job, with that job's umask: a job's files get the job's own."""
    config = parse(tiny_vision_config(tmp_path))
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    first = dsd_command("check-config", str(REPO / "configs" / "default.yaml"), env=env, umask=0o022)
    assert first.returncode == 0, first.stderr
    job = [
        "prepare",
        "--spec",
        config.row("resnet18").data_spec().to_json(),
        "--options",
        config.options.to_json(),
    ]
    result = dsd_command(*job, env=env, umask=0o077)
    assert result.returncode == 0, result.stderr
    assert len(served_jobs(sockets)) == 2
    marker = paths.prepared(config.options.data_root, "shapes")
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_signals_reach_the_job_and_its_status_comes_back(tmp_path, sockets, sig):
    """A signal to the client lands in the forked child; a job a signal kills reports 128 + N, as a shell does
    (Ctrl-C: training checkpoints at the next step, says so in one line and exits 130, as a fresh process)."""
    config = slow_sparse_config(tmp_path)
    config["experiments"]["resnet18"]["phases"][0]["epochs"] = 30
    config = parse(config)
    prepare_data(config, "resnet18")
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    out = tmp_path / "dense"
    spec = config.phase("resnet18", 0, "dense").to_json()
    cmd = [sys.executable, "-m", "dsd", "train", "--spec", spec, "--options", config.options.to_json()]
    client = subprocess.Popen([*cmd, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not paths.resume(out).exists() and client.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    client.send_signal(sig)  # training checkpoints on SIGTERM/SIGUSR1/SIGINT; SIGHUP ends it
    _, stderr = client.communicate(timeout=60)
    assert client.returncode == 128 + sig, stderr
    assert ("SIGINT: checkpointed dense" in stderr) == (sig == signal.SIGINT) and "Traceback" not in stderr
    assert not paths.metrics(out).exists()
    assert len(served_jobs(sockets)) == 1


def test_the_warm_up_starts_no_openmp_threads_that_a_forked_job_would_wait_for():
    """The server forks every job after its warm-up: had the warm-up run a parallel op, OpenMP's thread pool would
    exist in the server only, and each job's first parallel op would hang. So a parallel op after the warm-up
    must still start the pool (a thread more)."""
    probe = (
        "import os, torch\n"
        "from dsd import prefork\n"
        "torch.set_num_threads(2)\n"
        "prefork.warm_up()\n"
        "warm = len(os.listdir('/proc/self/task'))\n"
        "torch.ones(1 << 20).sum()  # above torch's grain size: runs on the pool\n"
        "print(len(os.listdir('/proc/self/task')) - warm)\n"
    )
    started = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert int(started.stdout) >= 1, started.stderr


def test_the_server_key_follows_import_time_environment_only():
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    assert prefork.server_key(base) == prefork.server_key(base | {"SNAKEMAKE_JOB": "7", "HOME": "/tmp"})
    assert prefork.server_key(base) != prefork.server_key(base | {"OMP_NUM_THREADS": "4"})
    assert prefork.server_key(base) != prefork.server_key(base | {"PYTHONHASHSEED": "0"})


def test_it_stays_out_of_torchrun_slurm_and_when_switched_off():
    assert not prefork.enabled({})  # opt-in: make run asks for it, nothing else does by default
    assert not prefork.enabled({"DSD_PREFORK": "0"})
    assert not prefork.enabled({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not prefork.enabled({"SLURM_JOB_ID": "12"})


def _logged_servers(sockets) -> list[int]:
    lines = (line for log in sockets.glob("*.log") for line in log.read_text().splitlines())
    return [int(line.split("[", 1)[1].split("]", 1)[0]) for line in lines if "] serving " in line]


def _server_pid(sockets) -> int:
    pids = _logged_servers(sockets)
    assert pids, "no server log"
    return pids[0]


def _server_pids(sockets) -> list[int]:
    """The servers of this folder still running (a pid whose server went idle may name another process now)."""
    pids = []
    for pid in _logged_servers(sockets):
        with contextlib.suppress(OSError):
            if str(sockets).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def test_a_server_that_dies_cannot_fail_a_job_that_finishes(tmp_path, sockets):
    """kill -9 of the warm server while a job runs: the job completes and its own exit status comes back."""
    config = slow_sparse_config(tmp_path)
    config["experiments"]["resnet18"]["phases"][0]["epochs"] = 4
    config = parse(config)
    prepare_data(config, "resnet18")
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    out = tmp_path / "dense"
    spec = config.phase("resnet18", 0, "dense").to_json()
    cmd = [sys.executable, "-m", "dsd", "train", "--spec", spec, "--options", config.options.to_json()]
    client = subprocess.Popen([*cmd, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not paths.resume(out).exists() and client.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(_server_pid(sockets), signal.SIGKILL)
    _, stderr = client.communicate(timeout=120)
    assert client.returncode == 0, stderr
    assert paths.metrics(out).exists() and "went away" not in stderr


SYSTEM_PYTHON = shutil.which(
    "python3", path="/usr/bin:/bin"
)  # runnable by another user (the venv may not be)


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON, reason="needs root and a system python3")
def test_the_socket_is_private_and_other_users_are_refused(tmp_path, sockets):
    env = os.environ | {"DSD_PREFORK": "1", "DSD_PREFORK_DIR": str(sockets)}
    assert dsd_command("check-config", str(REPO / "configs" / "default.yaml"), env=env).returncode == 0
    folder = prefork.private_folder(env)
    assert (
        folder == sockets
        and folder.stat().st_uid == os.getuid()
        and stat.S_IMODE(folder.stat().st_mode) == 0o700
    )
    (sock,) = sockets.glob("*.sock")
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5); print(s.recv(1))"
    as_nobody = {"user": 65534, "group": 65534, "capture_output": True, "text": True, "timeout": 30}
    blocked = subprocess.run([SYSTEM_PYTHON, "-c", probe, str(sock)], **as_nobody)
    assert blocked.returncode != 0 and "PermissionError" in blocked.stderr  # the folder keeps them out
    os.chmod(sockets, 0o755)  # open the door on purpose: the server itself must still refuse them
    os.chmod(sock, 0o666)
    try:
        refused = subprocess.run([SYSTEM_PYTHON, "-c", probe, str(sock)], **as_nobody)
        assert refused.stdout.strip() == "b''"  # connected, then closed without a word
        assert any("refused a connection from uid 65534" in log.read_text() for log in sockets.glob("*.log"))
        assert prefork.private_folder(env) is None  # and our own jobs no longer use a folder others can enter
        plain = dsd_command("check-config", str(REPO / "configs" / "default.yaml"), env=env)
        assert plain.returncode == 0 and "not private" in plain.stderr
    finally:
        os.chmod(sockets, 0o700)
