"""`make bench` itself: a quick run of every section into a temporary folder (the committed figures untouched)."""

import json
import math
import os
import subprocess
import sys

import pandas as pd
from conftest import REPO


def test_every_bench_section_runs_and_reports(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 6.", "## 7.", "## 8.", "## 9.", "## 10."):
        assert section in summary, section
    optimizer = pd.read_csv(tmp_path / "optimizer.csv")
    assert list(optimizer["model"]) == ["resnet18", "resnet18", "resnet50", "resnet50"]
    assert list(optimizer["weights"]) == ["channels-last (the trainer's)", "contiguous"] * 2
    assert (optimizer["fused_ms"] > 0).all()
    speech = pd.read_csv(tmp_path / "speech_memory.csv")
    assert list(speech["scale"]) == ["1x", "3x"] and (speech["peak_rss_mb"] > 0).all()


def test_gpu_bench_runs_the_paper_rows_data_path_and_step(tmp_path):
    """`make gpu-bench`'s script, smoke-tested on the CPU: the paper's ResNet-18 row (full size, random weights)
    on generated 500x375 JPEGs through our loader with one and then two worker processes (a sweep), the pruner
    active, both decoding paths (the same crops: bitwise on the CPU), a summary written."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--rows", "resnet18",
         "--steps", "2", "--warmup", "1", "--batch", "2", "--files", "4", "--workers", "1", "2", "--out", str(tmp_path),
         "--decode", "cpu", "device"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    crops = summary["decoders"]["crops"]
    assert crops["max_abs_levels"] == 0 and summary["decoders"]["device_images_per_s"] > 0
    # grayscale, CMYK, PNG, progressive, 4:4:4: each routed to a decoder, the same crops as the workers'
    assert crops["odd_files_max_abs_levels"] == dict.fromkeys(
        ["grayscale", "cmyk", "png", "progressive", "subsampling444"], 0
    )
    assert [(r["decode"], r["workers"]) for r in summary["rows"]] == [
        ("cpu", 1),
        ("device", 1),
        ("cpu", 2),
        ("device", 2),
    ]
    for result in summary["rows"]:
        assert result["row"] == "resnet18" and result["batch_size"] == 2 and result["images_per_s"] > 0
        assert 0 <= result["data_wait_fraction"] < 1 and result["workers"] >= 1
        assert result["pruned_weights_nonzero"] == 0 and result["compile"] == "no"
        assert (
            math.isfinite(result["last_loss"]) and result["last_loss"] > 0
        )  # read every step, as the trainer
        # paper.yaml: sparse 45 + re-dense 45 epochs, and the control's as many
        assert result["epochs_per_seed"] == 2 * (45 + 45)
    assert "| resnet18 | device | 1 |" in (tmp_path / "summary.md").read_text()


def test_gpu_step_profile_prints_every_variant_of_the_step(tmp_path):
    """The GPU step profile, smoke-tested on the CPU so that a GPU session's device time is not spent on a
    broken script: each variant of the step is timed (the CUDA-graph one is GPU-only). Its JPEGs go into a
    temporary folder that it removes (every run left one in /tmp)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_step_profile.py"), "cpu", "2", "resnet18",
         "--steps", "1"],
        capture_output=True, text=True, timeout=600, env=os.environ | {"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("*/train"))  # torch's own caches may stay
    for line in ("step, pruner on:", "step, pruner off:", "step, foreach optimizer instead of fused",
                 "parts ms:", "step, model and batch NCHW instead:", "step, float masks:"):  # fmt: skip
        assert line in done.stdout, line


def test_gpu_trainer_check_trains_both_rows_and_counts_syncs(tmp_path):
    """The GPU sync-debug script, smoke-tested on the CPU (no compiled part: ~1 min; CUDA's sync debug mode
    has nothing to count here): both vision decoders and the speech row train dense then sparse through the
    trainer, the sparse phase keeps its zeros, and the report has its lines."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_trainer_check.py"), "--device", "cpu",
         "--parts", "vision", "speech"],
        capture_output=True, text=True, timeout=600, env=os.environ | {"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("resnet18 (paper row), decode: cpu: sparse phase 2 steps",
                 "resnet18 (paper row), decode: device: sparse phase 2 steps",
                 "deepspeech2 (paper model), eager: sparse phase 4 steps",
                 "least zero fraction of a pruned tensor 0.500", "step: 0 syncs"):  # fmt: skip
        assert line in done.stdout, line
    assert not list(tmp_path.glob("dsd-trainer-check-*"))


def test_gpu_compile_check_trains_each_variant_through_the_trainer():
    """The GPU script that compares eager, compiled and CUDA-graph training, smoke-tested on the CPU (where
    reduce-overhead forms no graphs): every rerun from eager's dense checkpoint keeps its masks and stays near
    eager, and eager again matches it (the CPU's kernels here are deterministic)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_compile_check.py"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("eager again", "default", "reduce-overhead"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"{variant}:"))
        zeros = float(line.split("pruned tensor ")[1].split()[0])
        to_eager = float(line.split("weight gap to eager ")[1].split("%")[0])
        assert zeros >= 0.29 and to_eager < 10, line  # stale weights would be about 100% apart
        assert variant != "eager again" or to_eager == 0, line


def test_gpu_layout_check_runs_and_the_trainers_resume_is_right():
    """The GPU layout script, smoke-tested on the CPU: after the trainer's `load_optimizer` the fused SGD and
    AdamW steps match a resume in the writer's layout, and both mask layouts are timed."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_layout_check.py"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for kind in ("sgd", "adamw"):
        line = next(line for line in lines if line.strip().startswith(f"{kind} dsd load_optimizer:"))
        assert float(line.split(":")[1]) < 1e-5, line
    assert sum("masks in the" in line for line in lines) == 2
