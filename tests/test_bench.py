"""`make bench` itself: a quick run of every section into a temporary folder (the committed figures untouched)."""

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
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 6.", "## 7.", "## 8."):
        assert section in summary, section
    speech = pd.read_csv(tmp_path / "speech_memory.csv")
    assert list(speech["scale"]) == ["1x", "3x"] and (speech["peak_rss_mb"] > 0).all()
