import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_sessionstart(session):
    """Start the one network-bound test's work before the first test runs (see test_packaging): once, in the
    process that starts the session (pytest-xdist's workers inherit where its result will be)."""
    if hasattr(session.config, "workerinput") or os.environ.get("DSD_DRY_RUN_DIR"):
        return
    selected = [str(arg) for arg in session.config.args]
    if not selected or any(
        "packaging" in arg or not arg.endswith(".py") and "::" not in arg for arg in selected
    ):
        from test_packaging import start_dry_run

        os.environ["DSD_DRY_RUN_DIR"] = str(start_dry_run())


def tiny_vision_config(tmp: Path, **extra) -> dict:
    """One vision row, two seeds, a few images per class and two steps per epoch: the whole chain in seconds."""
    config = {
        "output_dir": str(tmp / "results"),
        "data_root": str(tmp / "data"),
        "seeds": [0, 1],
        "rows": ["resnet18"],
        "threads": 1,
        "wandb": {"mode": "disabled"},
        "experiments": {
            "resnet18": {
                "track": "vision",
                "dataset": "shapes",
                "model": {"arch": "resnet18", "size": "mini", "width": 4, "num_classes": 10},
                "data": {
                    "image_size": 32,
                    "resize": 32,
                    "val_dir": "val",
                    "test_dir": "test",
                    "in_memory": True,
                    "generate": {"per_class": {"train": 6, "val": 2, "test": 2}},
                },
                "train": {"batch_size": 16, "lr_schedule": "cosine", "max_steps_per_epoch": 2},
                "prune": {"exclude": ["conv1.weight"]},
                "phases": [
                    {"kind": "dense", "epochs": 1, "lr": 0.05},
                    {"kind": "sparse", "epochs": 2, "lr": 0.005, "sparsity": 0.3},
                    {"kind": "redense", "epochs": 1},
                ],
            }
        },
    }
    config.update(extra)
    return config


def write_config(tmp: Path, config: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(
    workdir: Path, configfile: Path, *args: str, timeout: int = 600, env=None
) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env)


def dsd_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture
def tiny_config(tmp_path):
    return tiny_vision_config(tmp_path)


# ------------------------------------------------------------------- the pipeline's steps, in-process


def parse(config: dict):
    from dsd.config import parse_config

    return parse_config(config)


def prepare_data(config, row: str) -> dict:
    """`dsd prepare` of a row's data set (config: a parsed Config)."""
    from dsd.engine import prepare

    return prepare.prepare(config.row(row).data_spec().experiment(config.options))


def train(config, row: str, seed: int, phase: str, out=None, init=None) -> dict:
    """`dsd train` of one phase; `init` defaults to the previous phase's checkpoint under output_dir."""
    from dsd import paths
    from dsd.engine.trainer import run_phase

    spec = config.phase(row, seed, phase)
    out = out or paths.run_dir(config.options.output_dir, row, seed, phase)
    if init is None and spec.previous() is not None:
        init = paths.checkpoint(paths.run_dir(config.options.output_dir, row, seed, spec.previous().phase))
    return run_phase(spec, out, init=init, options=config.options)


def evaluate(config, row: str, seed: int, phase: str, checkpoint=None, splits=("val", "test")) -> dict:
    from dsd import paths
    from dsd.engine.evaluation import evaluate_checkpoint

    checkpoint = checkpoint or paths.checkpoint(paths.run_dir(config.options.output_dir, row, seed, phase))
    spec = config.phase(row, seed, phase)
    return evaluate_checkpoint(spec, config.row(row).eval, checkpoint, config.options, splits)


def reachable_objects(root) -> int:
    """The Python objects reachable from `root` (classes and modules not followed): a data set's index that
    holds an object per item grows with the items, and a forked loader worker copies every object it reads."""
    import gc
    import types

    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) not in seen and not isinstance(obj, (type, types.ModuleType)):
            seen.add(id(obj))
            stack.extend(gc.get_referents(obj))
    return len(seen)


def sigint_as(disposition):
    """A Popen preexec_fn giving the child this SIGINT disposition: SIG_DFL as a terminal's foreground job has
    it (the suite itself may run with SIGINT ignored, as a background job does: CI), SIG_IGN as under nohup."""
    import signal

    return lambda: signal.signal(signal.SIGINT, disposition)


def killed_while_writing(folder: Path, write: str, name: str) -> None:
    """A process that runs `write` (Python; `sys.argv[1]` is `name`) in `folder`, then is killed with kill -9
    before it can clean up: what a job killed mid-write leaves."""
    import signal

    script = f"import os, signal, sys; {write}; os.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.run([sys.executable, "-c", script, name], cwd=folder)
    assert killed.returncode == -signal.SIGKILL


def leave_process_group() -> None:
    """A test rank's end, as `python -m dsd` ends (dsd.__main__): the ranks meet at a barrier, then exit without
    the interpreter's teardown. Tearing a gloo group down can abort a rank whose peer already had (SIGABRT), and
    a group destroyed while a DDP wrapper still holds it can hang as the wrapper goes (the group's threads joined
    while holding the GIL, one of them waiting for it)."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
