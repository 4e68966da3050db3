"""What a user sees while and after runs: one wandb step per (row, seed) across phases, the scheduled LR, one
log line per epoch, and a report that opens on the results table."""

import json
import re
import struct
from pathlib import Path

import pytest
from conftest import parse, prepare_data, tiny_vision_config, train
from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7  # the .wandb file: a header, then a LevelDB-style log of protobuf records


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run file, read with the public protobuf definitions."""
    data, rows, pos, chunk = path.read_bytes(), [], HEADER, b""
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
            if record.HasField("history"):
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


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
