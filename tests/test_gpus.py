"""dsd.gpus: distinct devices for concurrent jobs, checked with real processes on a CPU machine (total=4)."""

import fcntl
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsd import gpus

SCRIPT = gpus.__file__  # run as a script: the prefix must work without importing the dsd package (torch)

# The command a job runs under the prefix: report its devices, then hold them until a file appears.
HOLDER = (
    "import os, sys, time\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'), flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
)


def start(n, lock_dir, release_file, *options):
    cmd = [sys.executable, SCRIPT, str(n), "--total", "4", "--lock-dir", str(lock_dir), "--quiet", *options]
    cmd += ["--", sys.executable, "-c", HOLDER, str(release_file)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc, timeout):
    """The next stdout line of proc, or None if none came within timeout seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return proc.stdout.readline().strip()


def devices_of(line):
    return set(line.split(","))


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    gpus.release()


def test_concurrent_jobs_get_distinct_devices(tmp_path):
    release = tmp_path / "release"
    procs = [start(1, tmp_path / "locks", release) for _ in range(4)]
    try:
        lines = [read_line(p, 30) for p in procs]  # all four hold their device at the same time
        assert sorted(lines) == ["0", "1", "2", "3"]
    finally:
        release.touch()
        for p in procs:
            assert p.wait(30) == 0, p.stderr.read()


def test_third_job_waits_for_a_free_pair(tmp_path):
    locks = tmp_path / "locks"
    procs = [start(2, locks, tmp_path / f"r{i}") for i in range(3)]
    try:
        held = {}  # which two get a pair first is up to the scheduler
        deadline = time.monotonic() + 30
        while len(held) < 2 and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in held and (line := read_line(p, 0.1)) is not None:
                    held[i] = devices_of(line)
        assert len(held) == 2, [p.stderr for p in procs]
        (a, pair_a), (b, pair_b) = held.items()
        assert pair_a | pair_b == {"0", "1", "2", "3"}
        (waiting,) = set(range(3)) - set(held)
        assert read_line(procs[waiting], 1.5) is None  # all four busy: the third job waits
        (tmp_path / f"r{a}").touch()
        assert procs[a].wait(10) == 0
        assert devices_of(read_line(procs[waiting], 10)) == pair_a  # it gets the pair given back
    finally:
        for i in range(3):
            (tmp_path / f"r{i}").touch()
        for p in procs:
            p.wait(30)


def test_killed_job_releases_its_devices_and_timeout_is_clear(tmp_path):
    locks = tmp_path / "locks"
    holder = start(3, locks, tmp_path / "never")
    try:
        assert len(devices_of(read_line(holder, 30))) == 3
        assert gpus.acquire(1, total=4, lock_dir=locks, timeout=5) == [3]  # the one device left
        gpus.release()
        t0 = time.monotonic()
        with pytest.raises(gpus.GPUTimeoutError, match=r"2 of 4 GPUs .* did not become free within 0.5 s"):
            gpus.acquire(2, total=4, lock_dir=locks, timeout=0.5)
        assert time.monotonic() - t0 < 3
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # a failed acquire changes nothing
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the flocks
        holder.wait(10)
        assert gpus.acquire(4, total=4, lock_dir=locks, timeout=5) == [0, 1, 2, 3]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    finally:
        holder.kill()
        holder.wait(10)


def test_a_rank_that_exits_as_a_signal_is_forwarded_still_fails_the_job(monkeypatch):
    """A signal the prefix forwards (SLURM's SIGTERM reaches every process at once) may land after a rank
    exited and before the prefix reaped it: forwarding it must not reap the rank unseen, or the prefix
    reports success for a job whose rank failed."""
    waitpid, others = os.waitpid, _children()

    def late_waitpid(pid, options):  # the signal comes once the rank has exited, before it is reaped
        while not any(_state(child) == "Z" for child in _children() - others):
            time.sleep(0.01)
        monkeypatch.setattr(os, "waitpid", waitpid)
        os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs here, before the call below
        return waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", late_waitpid)
    assert gpus.run_ranks(1, [], python="false") == 1  # `false -m dsd`: a rank failing at once


def _children() -> set[str]:
    me = os.getpid()
    return set(Path(f"/proc/{me}/task/{me}/children").read_text().split())


def _state(pid: str) -> str:
    """R, S, ... and Z for a process that has exited and is not reaped yet."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_cli_timeout_is_one_line_and_status_2(tmp_path):
    locks = tmp_path / "locks"
    assert gpus.acquire(4, total=4, lock_dir=locks) == [0, 1, 2, 3]  # this process holds everything
    cmd = [sys.executable, SCRIPT, "1", "--total", "4", "--lock-dir", str(locks), "--timeout", "0.3"]
    result = subprocess.run([*cmd, "--", "true"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("dsd: error: dsd.gpus: 1 of 4 GPUs (0,1,2,3) did not become free")
    assert len(result.stderr.strip().splitlines()) == 1


def test_jobs_with_different_tmpdirs_lock_in_one_folder(tmp_path, monkeypatch):
    """TMPDIR differs between users and between Snakemake jobs (its `tmpdir` resource): the default lock
    folder must not follow it, or two jobs each lock "their" GPU 0 in their own folder and share it."""
    monkeypatch.delenv("DSD_GPU_LOCK_DIR", raising=False)
    device = f"dsd-test-{os.getpid()}"  # a name no real job locks, in the machine-wide folder
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", device)
    release = tmp_path / "release"
    cmd = [sys.executable, SCRIPT, "1", "--quiet"]
    holder = subprocess.Popen(
        [*cmd, "--", sys.executable, "-c", HOLDER, str(release)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        assert read_line(holder, 30) == device
        other = subprocess.run(
            [*cmd, "--timeout", "0.5", "--", "true"], capture_output=True, text=True, timeout=30,
            env=os.environ | {"TMPDIR": str(tmp_path / "elsewhere")},
        )  # fmt: skip
        assert other.returncode == 2 and "did not become free" in other.stderr, other.stderr
    finally:
        release.touch()
        holder.wait(30)
        (gpus.lock_folder() / f"gpu-{device}.lock").unlink(missing_ok=True)


def test_a_dsd_job_on_the_cpu_locks_no_gpu(tmp_path, monkeypatch):
    """`device: cpu` on a GPU machine: the training rule's prefix still asks for gpus_per_job GPUs (they are
    its ranks), but locking them made the CPU jobs wait for each other, one per GPU, with the cores idle."""
    from conftest import parse, tiny_vision_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    locks = tmp_path / "locks"
    assert gpus.acquire(1, lock_dir=locks) == [0]  # another job holds the only GPU
    config = parse(tiny_vision_config(tmp_path, device="cpu"))
    job = [
        "prepare",
        "--spec",
        config.row("resnet18").data_spec().to_json(),
        "--options",
        config.options.to_json(),
    ]
    cmd = [sys.executable, SCRIPT, "1", "--lock-dir", str(locks), "--timeout", "1", "--dsd", "--", *job]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert result.returncode == 0, result.stderr
    assert "prepared shapes" in result.stdout


def test_the_lock_folders_and_files_stay_usable_by_other_users(tmp_path, monkeypatch):
    """The first job on a machine creates the shared folder and its lock files: whatever its umask, another
    user's job must still open the files (flock needs read access) and add its SLURM job's folder (it was
    0755 under the default umask: every other user's GPU job on that node failed with Permission denied)."""
    base = tmp_path / "shared"
    monkeypatch.setenv("DSD_GPU_LOCK_DIR", str(base))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    old = os.umask(0o077)
    try:
        assert gpus.acquire(1, total=1) == [0]
    finally:
        os.umask(old)
    assert stat.S_IMODE(base.stat().st_mode) == 0o1777
    assert stat.S_IMODE((base / "slurm-42").stat().st_mode) == 0o1777
    for lock in (base / "slurm-42").iterdir():
        assert stat.S_IMODE(lock.stat().st_mode) & 0o044 == 0o044, lock


def test_existing_cuda_visible_devices_are_shared_by_their_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,GPU-1b2c")
    assert gpus.acquire(2, lock_dir=tmp_path) == [0, 1]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert sorted(p.name for p in tmp_path.glob("gpu-*.lock")) == [
        "gpu-3.lock",
        "gpu-5.lock",
        "gpu-GPU-1b2c.lock",
    ]
    assert gpus.held() == ["3", "5"]


def test_no_gpu_or_zero_requested_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_count_devices", lambda: 0)
    assert gpus.acquire(1, lock_dir=tmp_path) == []
    assert gpus.acquire(0, total=4, lock_dir=tmp_path) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.acquire(2, lock_dir=tmp_path) == []
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert gpus.held() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    # the prefix on a CPU machine just runs the command, with the environment untouched
    result = subprocess.run(
        [sys.executable, SCRIPT, "1", "--lock-dir", str(tmp_path), "--", sys.executable, "-c",
         "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"},
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "-1", result.stderr
    # `--dsd` with no GPU asked for: one `python -m dsd`
    result = subprocess.run(
        [sys.executable, SCRIPT, "0", "--dsd", "--", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_more_than_visible_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="asked for 5 GPUs but only 4 are visible"):
        gpus.acquire(5, total=4, lock_dir=tmp_path)


def test_slurm_jobs_get_their_own_lock_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_GPU_LOCK_DIR", str(tmp_path))
    assert gpus.lock_folder() == tmp_path
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert gpus.lock_folder() == tmp_path / "slurm-42"


def test_cpu_runs_can_pin_the_kernels_instruction_set():
    assert gpus.cpu_isa_env("avx2", "cpu") == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"
    }  # fmt: skip
    assert gpus.cpu_isa_env("avx2", "cuda") == {}  # never for GPU runs
    assert gpus.cpu_isa_env("native", "cpu") == {}


def test_the_avx2_pin_reaches_mkls_matrix_products():
    """Under the pin a Linear layer computes the bits MKL's own AVX2 switch gives: on an AVX-512 machine MKL
    ignored the ATen and oneDNN variables and summed in its AVX-512 order (trivially equal on an AVX2 one)."""
    code = (
        "import hashlib, torch; torch.manual_seed(0); x, w = torch.randn(64, 512), torch.randn(10, 512); "
        "print(hashlib.sha1(torch.nn.functional.linear(x, w).numpy().tobytes()).hexdigest())"
    )

    def bits(extra: dict) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_"))}
        env |= gpus.cpu_isa_env("avx2", "cpu") | extra
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    assert bits({}) == bits({"MKL_ENABLE_INSTRUCTIONS": "AVX2"})


def test_a_job_started_by_hand_trains_with_the_kernels_its_cpu_isa_pins(tmp_path):
    """`dsd train --config ...` in a plain process, with no Snakemake to set the environment first: the pin is
    in place before torch starts (it imported torch first and trained with AVX-512 kernels; trivially equal on
    an AVX2 machine)."""
    import json

    from conftest import parse, prepare_data, tiny_vision_config, write_config

    raw = tiny_vision_config(tmp_path, seeds=[0]) | {"cpu_isa": "avx2"}
    prepare_data(parse(raw), "resnet18")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_"))}
    job = ["train", "--config", str(write_config(tmp_path, raw)), "--row", "resnet18", "--seed", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "dsd", *job, "--phase", "dense"],
        env=env | {"DSD_PREFORK": "0"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = tmp_path / "results" / "runs" / "resnet18" / "seed0" / "dense" / "metrics.json"
    assert json.loads(metrics.read_text())["cpu_capability"] == "AVX2"


def test_precision_and_memory_format_are_decided_per_device_and_model():
    """What a GPU job would use, decided on the CPU: the autocast type, and channels-last for the CNNs only."""
    import torch
    from torchvision import models

    from dsd.engine.distributed import autocast_dtype, prefers_channels_last
    from dsd.spec import RunOptions, parse_row
    from dsd.tracks.captioning.model import ShowAndTell
    from dsd.tracks.speech import model as speech_model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype("bf16", cuda) == torch.bfloat16 and autocast_dtype("fp16", cuda) == torch.float16
    assert autocast_dtype("fp32", cuda) is None and all(
        autocast_dtype(p, cpu) is None for p in ("auto", "bf16")
    )
    with torch.device("meta"):
        cnns = [models.get_model(name) for name in ("resnet18", "vgg16", "googlenet")]
        ds2 = parse_row("ds2", {"track": "speech", "dataset": "spoken", "model": {"arch": "deepspeech2"},
                                "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}, None)  # fmt: skip
        others = [speech_model.build(ds2.experiment(RunOptions())), ShowAndTell(8, 8, 16, 16, 0.0)]
    assert all(prefers_channels_last(m) for m in cnns) and not any(prefers_channels_last(m) for m in others)
    assert all(prefers_channels_last(m, cpu) for m in cnns)  # the CPU too (oneDNN)


def test_no_channels_last_on_the_cpu_where_torch_corrupts_the_heap():
    """torch 2.11's CPU backward of a strided 1x1 convolution with fewer than 8 input channels corrupts the heap
    in channels-last: a width-4 mini ResNet (its downsample) trains in the default layout, width 8 does not."""
    import torch
    from torchvision.models.resnet import BasicBlock

    from dsd.engine.distributed import prefers_channels_last
    from dsd.tracks.vision.model import MiniResNet

    cpu = torch.device("cpu")
    assert not prefers_channels_last(MiniResNet(BasicBlock, 4, 10), cpu)
    assert prefers_channels_last(MiniResNet(BasicBlock, 4, 10), torch.device("cuda"))
    assert prefers_channels_last(MiniResNet(BasicBlock, 8, 10), cpu)


def test_auto_threads_and_workers_share_the_node_among_its_gpu_jobs(monkeypatch):
    """16 cores and 4 GPUs at one GPU per job: four jobs of 4 threads, 3 loader workers each; the config's
    `auto` resolves with this machine's cores and the GPUs CUDA_VISIBLE_DEVICES shows."""
    from conftest import REPO

    from dsd.config import load_config
    from dsd.gpus import cpus_per_job

    assert cpus_per_job(1, cores=16, gpus=4) == (4, 3)
    assert cpus_per_job(2, cores=64, gpus=8) == (16, 7)  # 4 two-GPU jobs; 7 workers for each of 2 ranks
    assert cpus_per_job(1, cores=16, gpus=0) == (1, 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    config = load_config(REPO / "configs" / "paper.yaml", check_models=False)
    cores = len(os.sched_getaffinity(0))
    assert (config.options.threads, config.options.workers) == (cores, max(0, cores - 1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    config = load_config(REPO / "configs" / "paper.yaml", sets=["workers=2"], check_models=False)
    assert (config.options.threads, config.options.workers) == (1, 2)


def test_auto_workers_of_a_one_process_job_are_its_cores_less_one(tmp_path, monkeypatch):
    """An evaluation runs one process on one GPU: `workers: auto` is its job's cores less
    one. It got a DDP rank's share (cores / gpus_per_job, less one) like the training jobs, though nothing else
    runs in it: with `gpus_per_job: 4` a quarter of its loader workers."""
    from conftest import BIN, REPO, tiny_vision_config, write_config

    from dsd.config import load_config
    from dsd.gpus import cpus_per_job

    assert cpus_per_job(4, cores=16, gpus=4) == (16, 3)  # one 4-GPU job: 3 workers for each of its 4 ranks
    assert cpus_per_job(4, cores=16, gpus=4, processes=1) == (16, 15)  # its evaluation: one process
    assert cpus_per_job(1, cores=16, gpus=4, processes=1) == (4, 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    config = load_config(REPO / "configs" / "paper.yaml", sets=["gpus_per_job=2"], check_models=False)
    threads = config.options.threads
    assert config.options.workers == max(0, threads // 2 - 1)
    assert config.one_process_options.workers == threads - 1
    assert config.one_process_options.threads == threads
    pinned = load_config(REPO / "configs" / "paper.yaml", sets=["workers=2"], check_models=False)
    assert pinned.one_process_options == pinned.options  # a number is every process's, as written

    # what the rules pass: the evaluation's command carries the one-process count, the training's the ranks'
    raw = tiny_vision_config(
        tmp_path, seeds=[0], device="cuda", threads="auto", workers="auto", gpus_per_job=2
    )
    plan = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "-p", "--cores", "all",
         "--configfile", str(write_config(tmp_path, raw)), "--resources", "gpu=2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-3000:]
    commands = [
        line for line in plan.stdout.splitlines() if "-m dsd evaluate" in line or " train --spec" in line
    ]
    workers = {
        ("evaluate" if "-m dsd evaluate" in c else "train"): re.search(r'"workers": (\d+)', c)[1]
        for c in commands
    }
    assert workers == {"evaluate": str(threads - 1), "train": str(max(0, threads // 2 - 1))}, workers


def test_auto_threads_inside_a_slurm_job_stay_within_its_cpus(monkeypatch):
    """A SLURM job without CPU pinning (TaskPlugin=task/none) sees the whole node: `auto` must share the CPUs
    the job was given (--cpus-per-task), not the node's, or the GPU jobs packed on a node oversubscribe it."""
    from dsd.gpus import cpus_per_job

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpus_per_job(1, gpus=1) == (1, 0)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(10**6))  # more than this machine has: its own cores count
    assert cpus_per_job(1, gpus=1) == (len(os.sched_getaffinity(0)), len(os.sched_getaffinity(0)) - 1)


def test_a_slurm_jobs_lock_folder_is_removed_once_no_process_of_it_uses_it(tmp_path, monkeypatch):
    """`slurm-<id>` folders were never removed: one per GPU job ever run on the node. A folder stays while any
    process of its job uses it (two here, sharing it), and goes with its `.users` file once none does."""
    locks = tmp_path / "locks"
    monkeypatch.setenv("DSD_GPU_LOCK_DIR", str(locks))
    env = os.environ | {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1"}
    holders = [
        subprocess.Popen(
            [
                sys.executable,
                SCRIPT,
                "1",
                "--quiet",
                "--",
                sys.executable,
                "-c",
                HOLDER,
                str(tmp_path / f"done{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    assert {read_line(holder, 60) for holder in holders} == {"0", "1"}  # job 7's two processes, both running
    (tmp_path / "done0").touch()
    holders[0].communicate(timeout=30)
    monkeypatch.setenv("SLURM_JOB_ID", "8")  # another job's process looks for its folder: sweeps unused ones
    assert gpus.lock_folder() == locks / "slurm-8"
    assert (locks / "slurm-7").is_dir()  # job 7's second process still uses it
    (tmp_path / "done1").touch()
    holders[1].communicate(timeout=30)
    gpus.lock_folder()
    assert sorted(p.name for p in locks.iterdir()) == ["slurm-8", "slurm-8.users"]  # this process uses it
    gpus.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    assert gpus.lock_folder() == locks
    assert list(locks.iterdir()) == []


def test_a_process_joining_a_job_folder_as_it_is_swept_gets_a_new_one(tmp_path, monkeypatch):
    """A process that opened the `.users` file while a sweeper held it (removing the folder) must not keep the
    unlinked file: the folder it then uses would look unused, and be swept under its GPU locks."""
    import threading

    monkeypatch.setenv("DSD_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    users = tmp_path / "slurm-9.users"
    users.touch()
    sweeper = os.open(users, os.O_RDONLY)
    fcntl.flock(sweeper, fcntl.LOCK_EX)
    joined = []
    joiner = threading.Thread(target=lambda: joined.append(gpus.lock_folder()))
    joiner.start()
    time.sleep(0.5)  # the joiner has opened the file and waits for its shared lock
    users.unlink()  # what the sweep does, under its exclusive lock
    os.close(sweeper)
    joiner.join(30)
    assert joined == [tmp_path / "slurm-9"] and joined[0].is_dir()
    held = os.fstat(gpus._job_users["9"])
    assert (held.st_dev, held.st_ino) == (users.stat().st_dev, users.stat().st_ino)  # the new file's


def test_a_rank_killed_by_a_signal_is_named_in_the_job_log(tmp_path, monkeypatch, capfd):
    """A rank the OOM killer ends prints nothing itself: the prefix says which rank and which signal, and that
    it stopped the ranks left waiting for it, so the job's log does not end without a reason."""
    rank = tmp_path / "rank"
    rank.write_text('#!/bin/sh\nif [ "$RANK" = 1 ]; then kill -9 $$; fi\nexec sleep 30\n')
    rank.chmod(0o755)
    monkeypatch.setattr(gpus, "FAILED_RANK_GRACE_SECONDS", 0.5)
    assert gpus.run_ranks(2, [], python=str(rank)) == 137
    said = capfd.readouterr().err.splitlines()
    assert "dsd.gpus: rank 1 ended by SIGKILL (exit status 137)" in said, said
    assert "dsd.gpus: rank 0 still running 0.5 s after rank 1 failed: killed" in said, said


def _attempt(log: Path, out: Path, said: str) -> None:
    """One attempt of a training job as the rule starts it: Snakemake deletes the log first, the shell opens it
    for stderr (`2> log`), the prefix runs, then the job writes its lines."""
    log.unlink(missing_ok=True)
    job = f"import sys; from dsd import gpus; gpus.keep_earlier_attempts(['train', '--out', {str(out)!r}]); print({said!r}, file=sys.stderr)"
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-c", job], stderr=stderr, check=True, timeout=60)


def test_a_phase_continued_from_its_resume_point_keeps_its_earlier_attempts_in_its_log(tmp_path):
    """Snakemake deletes a job's log before each attempt: the log of a phase cut by a time limit (or preempted,
    or killed) and resumed by `retries` or a rerun said only the last attempt, not why the first one ended."""
    out, log = tmp_path / "runs" / "dense", tmp_path / "logs" / "dense.log"
    out.mkdir(parents=True)
    log.parent.mkdir()
    _attempt(log, out, "first: SIGTERM: checkpointed dense after 1 epoch")
    (out / "resume.pt").write_bytes(b"")
    _attempt(log, out, "second: resuming")
    _attempt(log, out, "third: resuming again")
    lines = log.read_text().splitlines()
    assert lines[0] == "first: SIGTERM: checkpointed dense after 1 epoch", lines
    assert "a new attempt at this phase" in lines[1] and lines[2] == "second: resuming", lines
    assert "a new attempt at this phase" in lines[3] and lines[4:] == ["third: resuming again"], lines
    (out / "resume.pt").unlink()  # the phase finished; trained again (a new spec), it starts afresh
    _attempt(log, out, "afresh")
    assert log.read_text().splitlines() == ["afresh"]
    assert sorted(p.name for p in log.parent.iterdir()) == [".dense.log.attempts", "dense.log"]


def test_a_slurm_job_works_out_auto_threads_and_workers_from_its_own_allocation(monkeypatch):
    """Snakemake resolves `threads: auto` / `workers: auto` on the login node, where no GPU gives 1 thread and
    no loader workers: every paper job on SLURM trained on one core whatever its cpus_per_task. In the job, the
    options say which were auto and the job's CPUs and GPUs decide."""
    import argparse

    from conftest import REPO

    from dsd import cli
    from dsd.config import load_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # the login node
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    planned = load_config(
        REPO / "configs" / "paper.yaml", sets=["gpus_per_job=2"], check_models=False
    ).options
    assert (planned.threads, planned.workers, planned.auto_cpus) == (1, 0, ("threads", "workers"))
    args = argparse.Namespace(options=planned.to_json())
    planned_here = cli._options(args)  # not in a SLURM job: as planned
    assert (planned_here.threads, planned_here.workers) == (1, 0)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the job's two GPUs
    training = cli._options(args)
    assert (training.threads, training.workers) == (cores, max(0, cores // 2 - 1))  # per rank of 2
    evaluation = cli._options(args, one_process=True)
    assert (evaluation.threads, evaluation.workers) == (cores, cores - 1)
    numbers = load_config(
        REPO / "configs" / "paper.yaml", sets=["threads=3", "workers=1"], check_models=False
    )
    assert numbers.options.auto_cpus == ()
    given = cli._options(argparse.Namespace(options=numbers.options.to_json()))
    assert (given.threads, given.workers) == (3, 1)  # numbers stay numbers


def test_a_cpu_slurm_job_given_auto_uses_its_whole_allocation(monkeypatch):
    """A job without a GPU (preparing a real data set: verify_data's decoding, speech featurising) on SLURM: its
    cores are its own, not a node's shared among GPU jobs."""
    import argparse

    from conftest import REPO

    from dsd import cli
    from dsd.config import load_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    planned = load_config(REPO / "configs" / "paper.yaml", check_models=False).options
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    job = cli._options(argparse.Namespace(options=planned.to_json()))
    cores = len(os.sched_getaffinity(0))
    assert (job.threads, job.workers) == (cores, max(0, cores - 1))
