"""The core library alone: installed into a fresh environment without the pipeline's packages, it runs the
README's plain-loop quick start and asks only for torch and numpy ranges; and a resolver dry run shows those
ranges accept another torch minor than the pipeline's pin (constraints.txt)."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

# the pipeline's packages the core must not import (tqdm is left out: torch itself imports it when present)
PIPELINE_ONLY = ("snakemake", "wandb", "pandas", "scipy", "matplotlib", "yaml", "torchvision", "torchaudio")


def _source_copy(tmp_path: Path) -> Path:
    """The package's sources without the repository's build state (nothing written into the checkout)."""
    copy = tmp_path / "source"
    (copy / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, copy / name)
    shutil.copytree(REPO / "src" / "dsd", copy / "src" / "dsd", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _base_python() -> str:
    return getattr(sys, "_base_executable", sys.executable)


def _wheel(tmp_path: Path) -> Path:
    """The library's wheel, built offline with this environment's setuptools (the dev extra)."""
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(_source_copy(tmp_path))],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(out.glob("dsd_training-*.whl"))


def test_the_core_installs_alone_and_runs_the_quick_start(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # reuse this environment's torch and numpy (no second multi-GB download): their folder, on the new path
    (site / "reuse_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(_wheel(tmp_path))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    readme = (REPO / "README.md").read_text()
    example = re.search(r"<!-- quickstart:plain -->\n```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "quickstart.py"
    check = f"\nimport sys\nprint('pipeline modules:', sorted(m for m in {PIPELINE_ONLY!r} if m in sys.modules))\n"
    script.write_text(example + check + "print('done', schedule.done, dsd.__file__)\n")
    run = subprocess.run(
        [str(python), str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done True" in run.stdout and str(site) in run.stdout  # the installed copy, not the checkout
    assert "pipeline modules: []" in run.stdout  # the core imports none of the pipeline's packages
    requires = subprocess.check_output(
        [str(python), "-c", "from importlib.metadata import requires; print(requires('dsd-training'))"],
        text=True,
    )
    assert requires.startswith("['torch>=2.3', 'numpy>=1.24'")  # the core's only needs; the rest are extras


OTHER_TORCH = "torch==2.10.*"  # the minor before the pipeline's pin


def _dry_run(tmp: Path) -> None:
    """Resolve the wheel with another torch minor; the outcome lands in `tmp` (result.json last)."""
    try:
        resolve = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary", ":all:",
             "--report", str(tmp / "report.json"), str(_wheel(tmp)), OTHER_TORCH],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        outcome = {"returncode": resolve.returncode, "stderr": resolve.stderr}
    except Exception as error:  # noqa: BLE001 - reported by the test that collects it
        outcome = {"returncode": -1, "stderr": f"{type(error).__name__}: {error}"}
    (tmp / "result.tmp").write_text(json.dumps(outcome))
    (tmp / "result.tmp").replace(tmp / "result.json")


def start_dry_run() -> Path:
    """The dry run waits on the registry (torch's wheel is fetched for its metadata), not on the CPU: conftest
    starts it in a background process at session start, and the test below collects it from the folder."""
    folder = Path(tempfile.mkdtemp(prefix="dsd-dry-run-"))
    code = f"import sys; sys.path[:0] = [{str(REPO / 'tests')!r}]; from test_packaging import _dry_run; from pathlib import Path; _dry_run(Path({str(folder)!r}))"
    subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # fmt: skip
    return folder


def test_the_declared_ranges_accept_another_torch():
    folder = Path(os.environ.get("DSD_DRY_RUN_DIR") or start_dry_run())
    deadline = time.monotonic() + 900
    while not (folder / "result.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    result = json.loads((folder / "result.json").read_text())
    stderr = result["stderr"]
    if result["returncode"] and ("Could not find a version" in stderr or "connection" in stderr.lower()):
        pytest.skip(f"the package registry did not answer: {stderr.strip().splitlines()[-1]}")
    assert result["returncode"] == 0, stderr[-3000:]
    chosen = {
        i["metadata"]["name"]: i["metadata"]["version"]
        for i in json.loads((folder / "report.json").read_text())["install"]
    }
    assert chosen["torch"].startswith("2.10.") and "dsd-training" in chosen
    shutil.rmtree(folder, ignore_errors=True)


def test_the_dsd_command_without_the_pipeline_packages_says_what_to_install():
    block_yaml = "import sys; sys.modules['yaml'] = None; from dsd.command import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", block_yaml, "--help"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dsd: error: the dsd command needs the pipeline's packages (yaml is not installed): "
        "pip install 'dsd-training[pipeline]'"
    )
