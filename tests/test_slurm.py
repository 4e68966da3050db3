"""The pipeline on a real (one-node, localhost) SLURM cluster through snakemake-executor-plugin-slurm.

It installs Debian's slurm-wlm and munge with apt and runs daemons as root, so it runs only as root with
DSD_SLURM_TEST=1, which CI's entry point (.ci/run) sets; deselect with `-m "not slow"` or `-k "not slurm"`. About 3 minutes: six SLURM
jobs in five rounds, each ~30-45 s, mostly the two Snakemake start-ups (and torch imports) per job; then ~50 s
for one phase signalled as the profile says.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, tiny_vision_config, write_config
from slurm_cluster import FAST_POLL_SNAKEMAKE, PARTITION, SlurmCluster, install

pytestmark = pytest.mark.slow

DEADLINE = 480  # seconds for the whole Snakemake run (10 SLURM jobs); then it is killed with SIGKILL
POLL = 5  # seconds between two squeue status checks (see slurm_cluster.FAST_POLL_SNAKEMAKE)


def _enabled() -> bool:
    return os.environ.get("DSD_SLURM_TEST") == "1" and os.geteuid() == 0  # apt + daemons + ~3.5 min


def test_profile_is_valid_yaml_with_comments_for_every_setting():
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    settings = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all("#" in line for line in settings), [line for line in settings if "#" not in line]
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb", "cpus_per_task"} <= set(
        profile["default-resources"]
    )
    assert {"train_phase", "evaluate_phase"} <= set(profile["set-resources"])


def test_profile_dry_run(tmp_path):
    """The profile's settings are all known to Snakemake and the plugin (a dry run parses them all)."""
    config = tiny_vision_config(tmp_path, seeds=[0])
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "-q", "rules",
         "--configfile", str(write_config(tmp_path, config)),
         "--profile", str(REPO / "profiles" / "slurm")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_phase" in result.stdout + result.stderr


def test_gpu_jobs_planned_on_a_login_node_get_more_than_one_cpu(tmp_path):
    """Snakemake plans on the login node, where no GPU is visible: `threads: auto` (the paper config's) is 1
    there, and cpus_per_task: threads asked SLURM for one CPU per ImageNet job, its loaders starved."""
    config = tiny_vision_config(tmp_path, seeds=[0], device="cuda", threads="auto", workers="auto")
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
         "--configfile", str(write_config(tmp_path, config)), "--profile", str(REPO / "profiles" / "slurm")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ | {"CUDA_VISIBLE_DEVICES": "-1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = (result.stdout + result.stderr).split("rule ")[1:]
    cpus = {
        job.split(":")[0]: re.search(r"cpus_per_task=(\d+)", job).group(1) for job in jobs if "gpu=1" in job
    }
    assert {"train_phase", "evaluate_phase"} <= set(cpus) and "1" not in cpus.values(), cpus
    # a job's ranks start on the node it runs on: SLURM could spread --gpus=N over several nodes
    assert all("nodes=1" in job for job in jobs if job.startswith("train_phase")), jobs[:1]


def _test_profile(folder: Path) -> Path:
    """The repository's SLURM profile, pointed at the test cluster: its partition, no account, no GPUs."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["jobs"] = 2
    profile["latency-wait"] = 5
    profile["retries"] = 0
    profile["slurm-init-seconds-before-status-checks"] = POLL  # first squeue this long after a submission
    profile["slurm-no-account"] = True  # no accounting database here
    profile["slurm-keep-successful-logs"] = True
    profile["default-resources"].pop("slurm_account")
    profile["default-resources"] |= {"slurm_partition": PARTITION, "mem_mb": 1000, "runtime": 10}
    profile["set-resources"] = {
        rule: {"slurm_partition": PARTITION, "mem_mb": 2000, "runtime": 10, "gpu": 0}
        for rule in ("train_phase", "evaluate_phase")
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def test_pipeline_on_slurm(tmp_path):
    if not _enabled():
        pytest.skip(
            "SLURM integration test: run as root with DSD_SLURM_TEST=1 (installs slurm-wlm, munge by apt)"
        )
    try:
        install()
    except (
        RuntimeError,
        subprocess.TimeoutExpired,
    ) as err:  # no Debian mirror reachable: not our code's fault
        pytest.skip(f"SLURM integration test: could not install slurm-wlm and munge: {err}")
    config = tiny_vision_config(tmp_path, seeds=[0])
    exp = config["experiments"]["resnet18"]
    exp["train"]["max_steps_per_epoch"] = 1
    exp["phases"] = [
        {"kind": "dense", "epochs": 1, "lr": 0.05},
        {"kind": "sparse", "epochs": 1, "lr": 0.005, "sparsity": 0.3},
        {"kind": "redense", "epochs": 1},
    ]
    configfile = write_config(tmp_path, config)
    profile = _test_profile(tmp_path / "profile")
    log = tmp_path / "snakemake.log"
    cmd = [
        sys.executable, "-c", FAST_POLL_SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
        "--configfile", str(configfile), "--profile", str(profile), "tables",
    ]  # fmt: skip
    cluster = SlurmCluster()
    proc = None
    t0 = time.monotonic()
    try:
        cluster.start()
        with log.open("w") as out:
            # own session: the deadline kill takes Snakemake and everything it started
            proc = subprocess.Popen(
                cmd,
                cwd=tmp_path,
                env=cluster.env() | {"DSD_SLURM_POLL_SECONDS": str(POLL)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # Snakemake ignores SIGTERM while polling
                proc.wait(10)
                pytest.fail(f"snakemake on SLURM took more than {DEADLINE} s\n{_tail(log)}\n{cluster.logs()}")
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, f"{_tail(log)}\n{cluster.logs()}"
        log_text = log.read_text()
        # prepare_data, 4 phases (dense, sparse1, redense1, control), their 4 evaluations, tables: 10 sbatch jobs
        assert log_text.count("has been submitted with SLURM jobid") == 10, _tail(log)
        results = Path(config["output_dir"])
        for phase in ("dense", "sparse1", "redense1", "control"):
            for name in ("metrics.json", "eval.json"):
                path = results / "runs" / "resnet18" / "seed0" / phase / name
                assert path.exists(), f"{path} missing\n{_tail(log)}"
        assert (results / "tables" / "paper_comparison.csv").exists()
        assert (results / "tables" / "paper_comparison.md").exists()
        slurm_logs = list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
        assert len(slurm_logs) == 10, slurm_logs  # one per SLURM job (kept: slurm-keep-successful-logs)
        print(f"SLURM pipeline: {elapsed:.0f} s")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        cluster.stop()


def _profile_signal() -> str:
    """The signal the profile's `--signal=SIG@SECONDS` line (commented out: a user enables it) asks for."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    return re.search(r"--signal=(?:R:)?(\w+)@\d+", text).group(1)


def _wait_for(predicate, proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(1)
    return False


def test_profile_signal_checkpoints_a_phase_on_slurm(tmp_path):
    """The profile's `--signal` (sent before the time limit to every process of the job's steps) must reach the
    training job with Snakemake still alive around it: SIGUSR1 killed the Snakemake of the step (no handler), the
    step ended, and SLURM killed what it left (a cgroup, here a process group) before the phase checkpointed."""
    if not _enabled():
        pytest.skip(
            "SLURM integration test: run as root with DSD_SLURM_TEST=1 (installs slurm-wlm, munge by apt)"
        )
    try:
        install()
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"SLURM integration test: could not install slurm-wlm and munge: {err}")
    config = tiny_vision_config(tmp_path, seeds=[0])
    exp = config["experiments"]["resnet18"]
    exp["model"]["width"] = 64  # epochs of seconds: the signal arrives mid-phase
    exp["data"]["generate"]["per_class"]["train"] = 100
    exp["train"]["max_steps_per_epoch"] = 1000
    exp["phases"] = [
        {"kind": "dense", "epochs": 8, "lr": 0.05},
        {"kind": "sparse", "epochs": 1, "lr": 0.005, "sparsity": 0.3},
    ]
    configfile = write_config(tmp_path, config)
    run = Path(config["output_dir"]) / "runs" / "resnet18" / "seed0" / "dense"
    train_log = Path(config["output_dir"]) / "logs" / "resnet18" / "seed0" / "dense.log"
    base = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
            "--configfile", str(configfile)]  # fmt: skip
    prepared = subprocess.run(
        [*base, "--cores", "1", str(Path(config["data_root"]) / "shapes.prepared.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    log = tmp_path / "snakemake.log"
    cmd = [sys.executable, "-c", FAST_POLL_SNAKEMAKE, *base[1:], "--profile", str(_test_profile(tmp_path / "profile")),
           str(run / "metrics.json")]  # fmt: skip
    cluster = SlurmCluster(proctrack="pgid")
    proc = None
    try:
        cluster.start()
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=cluster.env() | {"DSD_SLURM_POLL_SECONDS": str(POLL)},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            trained = _wait_for(lambda: "epoch 1/8" in _tail(train_log), proc, DEADLINE / 2)
            assert trained, f"no epoch trained\n{_tail(log)}\n{_tail(train_log)}\n{cluster.logs()}"
            jobs = subprocess.run(
                ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=cluster.env()
            )
            # scancel --signal signals the steps, not the batch shell: what sbatch --signal=SIG@T does
            subprocess.run(
                ["scancel", f"--signal={_profile_signal()}", *jobs.stdout.split()], env=cluster.env()
            )
            proc.wait(timeout=DEADLINE / 2)
        assert "checkpointed dense" in _tail(train_log), f"{_tail(train_log)}\n{_tail(log)}"
        assert (run / "resume.pt").exists()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        cluster.stop()


def test_the_min_job_age_the_readme_asks_for_outlasts_the_plugins_longest_poll_interval():
    """With squeue polling, a job that left squeue's list (MinJobAge after its end) is one the plugin takes for
    one not yet listed, and waits for forever. The plugin polls up to `max_sleep_time` apart: the README's
    MinJobAge said 120 s, where 2.8 polls 180 s apart."""
    import snakemake_executor_plugin_slurm as plugin

    poll = int(re.search(r"max_sleep_time = (\d+)", Path(plugin.__file__).read_text()).group(1))
    readme = " ".join((REPO / "README.md").read_text().split())
    asked = int(re.search(r"`MinJobAge` is (\d+) s or more", readme).group(1))
    assert asked > poll, (asked, poll)
