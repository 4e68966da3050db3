"""What a user sees while and after runs: one wandb step per (row, seed) across phases, the scheduled LR, one
log line per epoch, and a report that opens on the results table."""

import json
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import evaluate, parse, prepare_data, tiny_vision_config, train
from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7  # the .wandb file: a header, then a LevelDB-style log of protobuf records


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run file."""
    rows = []
    for record in wandb_records(path):
        if record.HasField("history"):
            items = record.history.item
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def wandb_records(path: Path) -> list:
    """The records of an offline run file, read with the public protobuf definitions."""
    data, records, pos, chunk = path.read_bytes(), [], HEADER, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunk = payload if kind in (1, 2) else chunk + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def test_one_continuous_step_per_run_and_the_scheduled_lr(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = parse(tiny_vision_config(tmp_path, seeds=[0], wandb={"mode": "offline", "project": "dsd-test"}))
    prepare_data(config, "resnet18")
    for phase in ("dense", "sparse1", "redense1", "control"):
        train(config, "resnet18", 0, phase)
    lines = [
        line
        for line in capfd.readouterr().err.splitlines()
        if re.match(r"resnet18 seed 0 \S+ epoch \d+/\d+:", line)
    ]
    assert len(lines) == 1 + 2 + 1 + 3  # one line per epoch: dense 1, sparse 2, re-dense 1, control 2 + 1
    assert all(
        re.search(
            r"train loss [\d.]+, val top1_error_pct [\d.]+, lr \S+, sparsity [\d.]+%, \d+ s elapsed, ETA \d+ s$",
            line,
        )
        for line in lines
    )
    runs = {}
    for folder in (tmp_path / "results" / "wandb" / "wandb").glob("offline-run-*"):
        history = [row for row in wandb_history(next(folder.glob("*.wandb"))) if "phase" in row]
        first = history[0]["phase"]
        runs["control" if first.startswith("control") else first] = history
    steps = [row["_step"] for phase in ("dense", "sparse1", "redense1") for row in runs[phase]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one axis across the chain's phases
    assert [row["_step"] for row in runs["sparse1"]][0] > runs["dense"][-1]["_step"]
    control = [row["_step"] for row in runs["control"]]
    assert control[0] > runs["dense"][-1]["_step"]  # the control continues from the dense phase too
    base = config.row("resnet18").recipe["sparse1"].lr
    assert [row["lr"] for row in runs["sparse1"]][-1] < base  # cosine within the phase: the scheduled value
    assert {row["phase"] for row in runs["redense1"]} == {"redense1"}


@pytest.mark.parametrize("verdict", ["no significant difference"])
def test_report_landing_page_renders_the_table(tmp_path, verdict):
    import pandas as pd

    from dsd.report.tables import landing_page

    comparison = pd.DataFrame(
        {"row": ["resnet18"], "metric": ["top1_error_pct"], "baseline_mean": [40.0], "dsd_mean": [38.0],
         "dsd_std": [1.0], "control_mean": [37.5], "control_std": [1.2], "rel_gain_vs_baseline_pct": [5.0],
         "rel_gain_vs_control_pct": [-1.3], "verdict": [verdict], "n_seeds": [3], "dense_converged": ["no"]}
    )  # fmt: skip
    text = landing_page(comparison, pd.DataFrame(), "Some words.")
    assert ".. csv-table::" in text and '"resnet18", "top1_error_pct", "40.00"' in text and verdict in text


def test_evaluation_samples_and_checkpoints_reach_wandb(tmp_path, monkeypatch):
    """Opt-in here (auto: GPU jobs): the evaluation as a run with its samples as a Table, model.pt an artifact."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = {"arch": "deepspeech", "hidden": 32, "rnn_hidden": 24, "rnn_layers": 2, "conv_channels": 4}
    raw = {
        "output_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "data"), "seeds": [0], "threads": 1,
        "wandb": {"mode": "offline", "project": "dsd-test", "evaluations": "on", "checkpoints": True},
        "experiments": {"ds": {
            "track": "speech", "dataset": "spoken", "model": model, "train": {"batch_size": 8},
            "data": {"utterances_per_speaker": {"train": 6, "dev": 2, "test": 2}}, "eval": {"batch_size": 16},
            "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}},
    }  # fmt: skip
    config = parse(raw)
    prepare_data(config, "ds")
    train(config, "ds", 0, "dense")
    result = evaluate(config, "ds", 0, "dense")
    runs = {}
    for folder in (tmp_path / "results" / "wandb" / "wandb").glob("offline-run-*"):
        records = wandb_records(next(folder.glob("*.wandb")))
        name = next(r.run.display_name for r in records if r.HasField("run"))
        runs[name] = (folder, records)
    assert set(runs) == {"ds-seed0-dense", "ds-seed0-dense-eval"}
    folder, records = runs["ds-seed0-dense-eval"]
    history = wandb_history(next(folder.glob("*.wandb")))
    logged = [{k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("samples/")} for row in history]
    logged = [item for item in logged if item]
    assert logged and logged[0]["_type"] == "table-file" and logged[0]["nrows"] == len(result["samples"])
    table = json.loads((folder / "files" / logged[0]["path"]).read_text())
    assert table["columns"] == ["id", "reference", "hypothesis"]
    assert [row[1] for row in table["data"]] == [s["reference"] for s in result["samples"]]
    summary = {
        i.key: json.loads(i.value_json) for r in records if r.HasField("summary") for i in r.summary.update
    }
    assert summary["test/wer_pct"] == pytest.approx(result["test"]["wer_pct"])
    artifacts = [r.artifact for r in runs["ds-seed0-dense"][1] if r.HasField("artifact")]
    assert [(a.name, a.type) for a in artifacts] == [("ds-seed0-dense", "model")]


def test_greedy_monitor_values_are_named_so_in_the_log_and_wandb(tmp_path, monkeypatch, capfd):
    """Speech's per-epoch validation decodes greedily, its evaluation with the configured decoder (a beam search
    in the embedded default: 27% WER where greedy says 70%): the training job's line and wandb history say
    greedy_wer_pct, so that neither reads as the evaluation's val/wer_pct of the same group."""
    from dsd.cli import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = {"arch": "deepspeech", "hidden": 32, "rnn_hidden": 24, "rnn_layers": 2, "conv_channels": 4}
    raw = {
        "output_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "data"), "seeds": [0], "threads": 1,
        "wandb": {"mode": "offline", "project": "dsd-test"},
        "experiments": {"ds": {
            "track": "speech", "dataset": "spoken", "model": model, "train": {"batch_size": 8},
            "data": {"utterances_per_speaker": {"train": 6, "dev": 2, "test": 2}}, "eval": {"batch_size": 16},
            "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}},
    }  # fmt: skip
    configfile = tmp_path / "config.yaml"
    configfile.write_text(json.dumps(raw))
    assert main(["prepare", "--config", str(configfile), "--row", "ds"]) == 0
    assert main(["train", "--config", str(configfile), "--row", "ds", "--seed", "0", "--phase", "dense"]) == 0
    out = capfd.readouterr()
    assert re.search(r"ds seed 0 dense epoch 1/1: .*, val greedy_wer_pct [\d.]+, ", out.err), out.err
    assert re.search(r"trained; validation greedy_wer_pct [\d.]+, greedy_cer_pct [\d.]+$", out.out), out.out
    (run,) = (tmp_path / "results" / "wandb" / "wandb").glob("offline-run-*/*.wandb")
    logged = {key for row in wandb_history(run) for key in row if key.startswith("val/")}
    assert logged == {"val/greedy_wer_pct", "val/greedy_cer_pct"}


def test_system_metrics_and_evaluation_runs_default_to_gpu_jobs_only():
    from dsd.spec import Wandb

    assert Wandb().wants("system", gpu=True) and not Wandb().wants("system", gpu=False)
    assert Wandb(system="on").wants("system", gpu=False) and not Wandb(evaluations="off").wants(
        "evaluations", True
    )
    assert not Wandb(mode="disabled", system="on").wants("system", gpu=True)


def preempt_dense_after_its_first_epoch(raw: dict):
    """The resnet18 dense phase (3 epochs) as a `dsd train` process, SIGTERM once it has a resume point: it
    checkpoints and exits 2. Returns the parsed config."""
    from dsd import paths

    raw["experiments"]["resnet18"]["phases"][0]["epochs"] = 3
    config = parse(raw)
    prepare_data(config, "resnet18")
    out = paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")
    spec, options = config.phase("resnet18", 0, "dense").to_json(), config.options.to_json()
    cmd = [sys.executable, "-m", "dsd", "train", "--spec", spec, "--options", options, "--out", str(out)]
    job = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while not paths.resume(out).exists() and job.poll() is None:
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 2, job.stderr.read()[-2000:]
    return config


def test_a_preempted_phase_keeps_its_wandb_records_and_resumes_the_same_run(tmp_path, monkeypatch):
    """SIGTERM mid-phase: the job's offline run file holds the epochs it logged (the job ends with os._exit,
    so only a finished run is on disk), and the rerun that resumes the phase continues that wandb run."""
    from test_reliability import slow_sparse_config

    from dsd import paths

    monkeypatch.delenv("WANDB_MODE", raising=False)
    raw = slow_sparse_config(tmp_path) | {"wandb": {"mode": "offline", "project": "dsd-test"}}
    config = preempt_dense_after_its_first_epoch(raw)
    (preempted,) = (paths.wandb_dir(config.options.output_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    assert [row["train_loss"] for row in wandb_history(preempted) if "train_loss" in row]  # epoch 1 at least
    train(config, "resnet18", 0, "dense")
    runs = sorted((paths.wandb_dir(config.options.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name  # one run id: `wandb sync` makes it one run


def test_the_eta_of_a_resumed_phase_counts_only_the_epochs_left(tmp_path, monkeypatch, capfd):
    """A phase of three epochs resumed after its first: the ETA is the rate of this job's epochs times the
    epochs left, not times the epochs this job has not trained yet (the clock moves 10 s per epoch trained)."""
    import types

    from test_reliability import slow_sparse_config

    from dsd.engine import trainer

    config = preempt_dense_after_its_first_epoch(slow_sparse_config(tmp_path))
    clock = [0.0]

    def ten_seconds_each(*args):
        clock[0] += 10
        return train_epoch(*args)

    train_epoch = trainer.train_epoch
    monkeypatch.setattr(trainer, "train_epoch", ten_seconds_each)
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(time=lambda: clock[0]))
    capfd.readouterr()
    train(config, "resnet18", 0, "dense")
    etas = re.findall(r"dense epoch (\d)/3: .*, (\d+) s elapsed, ETA (\d+) s", capfd.readouterr().err)
    assert etas[-2:] == [("2", "10", "10"), ("3", "20", "0")]


def test_the_wall_time_of_a_resumed_phase_counts_the_job_before_it(tmp_path):
    """The phases table's wall_seconds of a phase preempted after its first epoch and resumed: its three epochs'
    training time at least, not only the two the second job trained."""
    from test_reliability import slow_sparse_config

    config = preempt_dense_after_its_first_epoch(slow_sparse_config(tmp_path))
    metrics = train(config, "resnet18", 0, "dense")
    epochs = [record["seconds"] for record in metrics["history"]]
    assert len(epochs) == 3 and metrics["wall_seconds"] >= sum(epochs)


def test_a_resumed_phase_says_where_it_continues(tmp_path, capfd):
    """The job that continues a preempted phase (stopped in its second epoch, or just after its first) says so
    in its log before training (its first epoch line can be an epoch away), as one that cannot continue says it
    starts afresh."""
    from test_reliability import slow_sparse_config

    config = preempt_dense_after_its_first_epoch(slow_sparse_config(tmp_path))
    capfd.readouterr()
    train(config, "resnet18", 0, "dense")
    lines = capfd.readouterr().err.splitlines()
    resumed = [line for line in lines if "resuming" in line]
    assert len(resumed) == 1 and re.search(
        r"^dsd: resnet18 seed 0 dense: resuming from \S+resume\.pt after 1 epoch( and \d+ steps?)?$",
        resumed[0],
    ), lines
    assert lines.index(resumed[0]) < next(i for i, line in enumerate(lines) if "dense epoch 2/3" in line)
