"""Crashes, preemption and bad checkpoints: resumed runs equal uninterrupted ones bitwise on the CPU."""

import argparse
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import BIN, REPO, snakemake, tiny_vision_config, write_config

from dsd import checkpoint, paths
from dsd.config import Experiment
from dsd.errors import CheckpointError, NonFiniteLoss
from dsd.train import run_phase

VOLATILE = {"seconds", "wall_seconds", "machine"}


def slow_sparse_config(tmp):
    """Long enough a sparse phase (6 epochs of 8 steps) to be killed in the middle of it."""
    config = tiny_vision_config(tmp, seeds=[0])
    exp = config["experiments"]["resnet18"]
    exp["data"]["generate"] = {"per_class": {"train": 13, "val": 3, "test": 3}}
    exp["model"]["width"] = 8
    exp["train"]["max_steps_per_epoch"] = 8
    exp["phases"][1]["epochs"] = 6
    return config


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def assert_same_run(dir_a, dir_b, row, seed, phases):
    for phase in phases:
        run_a, run_b = (paths.run_dir(d, row, seed, phase) for d in (dir_a, dir_b))
        metrics_a, metrics_b = (json.loads(paths.metrics(r).read_text()) for r in (run_a, run_b))
        assert strip(metrics_a) == strip(metrics_b), phase
        model_a, model_b = (
            torch.load(paths.checkpoint(r), weights_only=True)["model"] for r in (run_a, run_b)
        )
        for name in model_a:
            assert torch.equal(model_a[name], model_b[name]), f"{phase}: {name} differs"


def test_kill_9_mid_sparse_phase_then_rerun_is_bitwise_identical(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for folder in (reference, crashed):
        folder.mkdir()
    ref_config = slow_sparse_config(reference)
    result = snakemake(reference, write_config(reference, ref_config))
    assert result.returncode == 0, result.stderr[-2000:]

    config = slow_sparse_config(crashed)
    configfile = write_config(crashed, config)
    sparse_run = paths.run_dir(config["output_dir"], "resnet18", 0, "sparse1")
    process = subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile")]
        + ["-d", str(crashed), "--configfile", str(configfile), "--cores", "1"],
        cwd=crashed,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not paths.resume(sparse_run).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    jobs = [p for p in psutil.Process(process.pid).children(recursive=True) if "train" in p.cmdline()]
    for job in jobs:
        job.send_signal(
            signal.SIGKILL
        )  # the training job, mid-phase, as the OOM killer or a node failure would
    assert process.wait(timeout=120) != 0  # snakemake saw its job die
    assert jobs and paths.resume(sparse_run).exists() and not paths.metrics(sparse_run).exists()

    rerun = snakemake(crashed, configfile)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_run(
        ref_config["output_dir"], config["output_dir"], "resnet18", 0, ["sparse1", "redense1", "control"]
    )


def test_sigterm_checkpoints_mid_epoch_and_resume_is_exact(tmp_path):
    config = slow_sparse_config(tmp_path)
    exp = Experiment.from_config(config, "resnet18")
    from dsd import tracks

    tracks.get("vision").DATASETS["shapes"](exp)
    dense = paths.run_dir(exp.output_dir, "resnet18", 0, "dense")
    run_phase(exp, 0, "dense", dense, progress=False)
    reference = run_phase(
        exp, 0, "sparse1", tmp_path / "reference", init=paths.checkpoint(dense), progress=False
    )

    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "dsd", "train", "--spec", exp.to_json(), "--seed", "0", "--phase", "sparse1"]
    cmd += ["--init", str(paths.checkpoint(dense)), "--out", str(out)]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while not paths.resume(out).exists() and process.poll() is None:
        time.sleep(0.005)
    time.sleep(0.15)  # somewhere inside a later epoch
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "SIGTERM: checkpointed sparse1" in stderr, stderr
    assert not paths.metrics(out).exists()
    resumed = run_phase(exp, 0, "sparse1", out, init=paths.checkpoint(dense), progress=False)
    assert strip(resumed) == strip(reference)
    a = torch.load(paths.checkpoint(out), weights_only=True)
    b = torch.load(paths.checkpoint(tmp_path / "reference"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_same_config_and_seed_twice_is_identical(tmp_path):
    config = tiny_vision_config(tmp_path)
    exp = Experiment.from_config(config, "resnet18")
    from dsd import tracks

    tracks.get("vision").DATASETS["shapes"](exp)
    first = run_phase(exp, 1, "dense", tmp_path / "a", progress=False)
    second = run_phase(exp, 1, "dense", tmp_path / "b", progress=False)
    assert strip(first) == strip(second)
    other_seed = run_phase(exp, 2, "dense", tmp_path / "c", progress=False)
    assert strip(other_seed)["history"] != strip(first)["history"]


def test_bad_checkpoints_are_named(tmp_path):
    config = tiny_vision_config(tmp_path)
    exp = Experiment.from_config(config, "resnet18")
    from dsd import tracks

    track = tracks.get("vision")
    track.DATASETS["shapes"](exp)
    run_phase(exp, 0, "dense", tmp_path / "dense", progress=False)
    good = paths.checkpoint(tmp_path / "dense")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        checkpoint.load(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a DSD checkpoint"):
        checkpoint.load(foreign)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "dsd-checkpoint", "obj": argparse.Namespace(code="runs on load")}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt: refused, it needs pickled code"):
        checkpoint.load(pickled)

    other = Experiment.from_config(
        tiny_vision_config(
            tmp_path,
            experiments={
                "resnet18": {
                    **config["experiments"]["resnet18"],
                    "model": {"arch": "vgg16", "size": "mini", "width": 4, "num_classes": 10},
                }
            },
        ),
        "resnet18",
    )
    with pytest.raises(CheckpointError, match="checkpoint is for a different model"):
        run_phase(other, 0, "sparse1", tmp_path / "sparse", init=good, progress=False)


def test_non_finite_loss_stops_with_step_number(tmp_path):
    config = tiny_vision_config(tmp_path)
    config["experiments"]["resnet18"]["phases"][0]["lr"] = float(
        "inf"
    )  # the first step makes the weights NaN
    exp = Experiment.from_config(config, "resnet18")
    from dsd import tracks

    tracks.get("vision").DATASETS["shapes"](exp)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at epoch 0, step \d+"):
        run_phase(exp, 0, "dense", tmp_path / "run", progress=False)
    assert not paths.metrics(tmp_path / "run").exists() and not paths.checkpoint(tmp_path / "run").exists()
