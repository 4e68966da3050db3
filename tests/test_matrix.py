"""The fault and bad-input matrix: every case through the command line a rule runs, each ending with exit status
2, one line `dsd: error: ...` naming the key or the file, and no output that looks finished.

Config cases run `dsd check-config`; data cases `dsd prepare` and `dsd train` on a small generated data set
damaged on purpose; checkpoint cases `dsd evaluate --out`; runtime cases `dsd train`. Kill -9, SIGTERM,
preemption at the last epoch, a dying warm interpreter, disk full and read-only folders have tests of their
own (test_reliability, test_faults, test_prefork, test_ddp); `test_random_kills_of_every_phase_kind` is below.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
from conftest import BIN, REPO, parse, prepare_data, snakemake, tiny_vision_config, train, write_config
from test_reliability import assert_same_run

from dsd import paths

WARM = os.environ | {
    "DSD_PREFORK": "1"
}  # the cases run in children of one warm interpreter: seconds, not minutes


def dsd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsd", *args], capture_output=True, text=True, timeout=300, env=WARM, cwd=cwd
    )


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("dsd: error:")]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ config

CONFIG_CASES = {
    "misspelt top-level key": ("sedds", [0], "config.sedds: unknown key (did you mean 'seeds'?"),
    "unknown experiment key": ("experiments.resnet18.trian", {}, "config.experiments.resnet18.trian: unknown key"),
    "unknown train key": ("experiments.resnet18.train.bach_size", 8, "train.bach_size: unknown key (did you mean 'batch_size'?"),
    "unknown model key": ("experiments.resnet18.model.wdith", 8, "model.wdith: unknown key (did you mean 'width'?"),
    "wrong type in train": ("experiments.resnet18.train.batch_size", "eight", "train.batch_size: expected an integer"),
    "wrong type in model": ("experiments.resnet18.model.width", "sixteen", "model.width: expected an integer"),
    "wrong type in data": ("experiments.resnet18.data.image_size", [32], "data.image_size: expected an integer"),
    "wrong type in eval": ("experiments.resnet18.eval.batch_size", "all", "eval.batch_size: expected an integer"),
    "sparsity 1.0": ("experiments.resnet18.phases.1.sparsity", 1.0, "phases[1].sparsity: must be < 1, got 1.0"),
    "sparsity -0.1": ("experiments.resnet18.phases.1.sparsity", -0.1, "phases[1].sparsity: must be >= 0, got -0.1"),
    "sparsity NaN": ("experiments.resnet18.phases.1.sparsity", float("nan"), "phases[1].sparsity: expected a finite number"),
    "sparse first": ("experiments.resnet18.phases", [{"kind": "sparse", "epochs": 1, "lr": 0.1, "sparsity": 0.5}], "phases[0]: a sparse phase needs a dense phase before it"),
    "empty phases": ("experiments.resnet18.phases", [], "experiments.resnet18.phases: must not be empty"),
    "unknown track": ("experiments.resnet18.track", "audio", "experiments.resnet18.track: expected one of vision, captioning, speech"),
    "unknown mini arch": ("experiments.resnet18.model.arch", "resnet19", "model.arch: size mini is one of resnet18"),
    "unknown torchvision model": ("experiments.resnet18.model", {"arch": "resnet19", "num_classes": 10}, "experiments.resnet18.model: arch 'resnet19' is not a torchvision classification model (closest: 'resnet18')"),
    "timm model without timm": ("experiments.resnet18.model", {"arch": "timm:resnet18", "num_classes": 10}, "experiments.resnet18.model: arch 'timm:resnet18' needs timm (pip install timm)"),
    "bad constructor argument": ("experiments.resnet18.model", {"arch": "squeezenet1_1", "num_classes": 10, "args": {"dropuot": 0.1}}, "experiments.resnet18.model: args: squeezenet1_1 does not take"),
    "unknown size": ("experiments.resnet18.model.size", "tiny", "model.size: expected one of full, mini"),
    "no seeds": ("seeds", [], "config.seeds: must not be empty"),
    "duplicate seeds": ("seeds", [0, 0], "config.seeds: 0 is listed twice"),
    "no rows": ("rows", [], "config.rows: must not be empty"),
    "unknown row": ("rows", ["resnet19"], "config.rows[0]: 'resnet19' is not an experiment"),
    "exclude matching nothing": ("experiments.resnet18.prune.exclude", ["conv1.wieght"], "prune.exclude[0]: 'conv1.wieght' matches no parameter"),
    "beam without lexicon": None,  # a speech row: below
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_case(tmp_path, case):
    from dsd.config import set_dotted

    config = tiny_vision_config(tmp_path)
    if case == "beam without lexicon":
        config["experiments"]["ds"] = {
            "track": "speech", "dataset": "spoken", "eval": {"decoder": "beam"},
            "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}],
        }  # fmt: skip
        key_message = "experiments.ds.eval.lexicon: required by decoder 'beam'"
    else:
        key, value, key_message = CONFIG_CASES[case]
        set_dotted(config, key, value)
    line = one_line(dsd("check-config", str(write_config(tmp_path, config))))
    assert key_message in line, line


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments:\n  r: {track: vision\n")
    assert f"{bad}:3:1: YAML syntax error" in one_line(dsd("check-config", str(bad)))
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in one_line(
        dsd("check-config", str(tmp_path / "nope.yaml"))
    )


# -------------------------------------------------------------------------------------------------- data


def _jobs(config, row="resnet18", seed=0, phase="dense"):
    spec = config.phase(row, seed, phase)
    return ["--spec", spec.to_json(), "--options", config.options.to_json()]


def _nothing_finished(folder) -> None:
    for name in ("metrics.json", "model.pt", "eval.json"):
        assert not (folder / name).exists(), name
    assert not list(folder.glob(".*tmp*")) if folder.exists() else True


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated shapes data set, prepared once; cases copy it before damaging it."""
    base = tmp_path_factory.mktemp("shapes")
    config = parse(tiny_vision_config(base))
    prepare_data(config, "resnet18")
    return base


def _damaged_shapes(tmp_path, shapes, workers=0):
    shutil.copytree(shapes / "data", tmp_path / "data")
    raw = tiny_vision_config(tmp_path, workers=workers)
    raw["experiments"]["resnet18"]["data"]["in_memory"] = False
    return raw


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "missing split",
        "empty class folder",
        "corrupt JPEG, 0 workers",
        "corrupt JPEG, 2 workers",
    ],
)
def test_image_data_case(tmp_path, shapes, case):
    raw = _damaged_shapes(tmp_path, shapes, workers=2 if "2 workers" in case else 0)
    root = tmp_path / "data" / "shapes"
    if case == "missing folder":
        raw["data"] = {"imagenet": str(tmp_path / "no_imagenet")}
        raw["experiments"]["resnet18"]["dataset"] = "imagenet"
        expected = f"{tmp_path / 'no_imagenet'}: data folder not found"
        line = one_line(
            dsd(
                "prepare",
                "--spec",
                parse(raw).row("resnet18").data_spec().to_json(),
                "--options",
                parse(raw).options.to_json(),
            )
        )
        assert expected in line and not (tmp_path / "data" / "imagenet.prepared.json").exists()
        return
    if case == "missing split":
        shutil.rmtree(root / "val")
        expected = f"{root / 'val'}: image folder not found"
    elif case == "empty class folder":
        for image in (root / "train" / "star").iterdir():
            image.unlink()
        expected = f"{root / 'train' / 'star'}: class folder is empty"
    else:
        for image in (root / "train").rglob("*.jpg"):
            image.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        expected = ".jpg: cannot decode image"
    out = tmp_path / "run"
    line = one_line(dsd("train", *_jobs(parse(raw)), "--out", str(out)))
    assert expected in line, line
    _nothing_finished(out)


def _speech_row(tmp_path, corpus):
    raw = {
        "data": {"librispeech": str(corpus)}, "data_root": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
        "wandb": {"mode": "disabled"},
        "experiments": {"ds": {"track": "speech", "dataset": "librispeech",
                               "model": {"arch": "deepspeech", "hidden": 16, "rnn_hidden": 8, "context": 1},
                               "data": {"train": "train", "val": "dev", "test": "test"},
                               "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01}]}},
    }  # fmt: skip
    return parse(raw)


def _librispeech(root):
    t = np.arange(4800) / 16000
    for split in ("train", "dev", "test"):
        folder = root / split / "19" / "198"
        folder.mkdir(parents=True)
        for i in range(2):
            sf.write(folder / f"19-198-{i:04d}.flac", 0.3 * np.sin(2 * np.pi * 300 * t), 16000)
        (folder / "19-198.trans.txt").write_text("19-198-0000 A CAT\n19-198-0001 A DOG\n")
    return root


@pytest.mark.parametrize(
    "case",
    [
        "truncated FLAC",
        "zero-length FLAC",
        "missing FLAC",
        "transcript outside the alphabet",
        "corpus changed under its cache",
    ],
)
def test_speech_data_case(tmp_path, case):
    corpus = _librispeech(tmp_path / "LibriSpeech")
    audio = corpus / "train" / "19" / "198" / "19-198-0001.flac"
    if case == "corpus changed under its cache":
        config = _speech_row(tmp_path, corpus)
        dsd(
            "prepare", "--spec", config.row("ds").data_spec().to_json(), "--options", config.options.to_json()
        )
        old = json.loads(paths.prepared(config.options.data_root, "librispeech").read_text())["fingerprint"]
        sf.write(audio, np.zeros(9600), 16000)  # same corpus folder, new content
        result = dsd(
            "prepare", "--spec", config.row("ds").data_spec().to_json(), "--options", config.options.to_json()
        )
        new = json.loads(paths.prepared(config.options.data_root, "librispeech").read_text())["fingerprint"]
        assert result.returncode == 0 and new != old  # a new cache, never the old one
        caches = sorted(p.name for p in (tmp_path / "data" / "cache" / "librispeech" / "features").iterdir())
        assert len([c for c in caches if c.startswith("train-")]) == 2
        return
    if case == "truncated FLAC":
        audio.write_bytes(audio.read_bytes()[:60])
        expected = f"{audio}: unreadable audio file"
    elif case == "zero-length FLAC":
        audio.write_bytes(b"")
        expected = f"{audio}: unreadable audio file"
    elif case == "missing FLAC":
        audio.unlink()
        expected = f"{audio}: audio file is missing"
    else:
        trans = corpus / "train" / "19" / "198" / "19-198.trans.txt"
        trans.write_text("19-198-0000 A CAT\n19-198-0001 A D0G\n")
        expected = f"{trans}:2 (19-198-0001): transcript has character '0'"
    config = _speech_row(tmp_path, corpus)
    line = one_line(
        dsd(
            "prepare", "--spec", config.row("ds").data_spec().to_json(), "--options", config.options.to_json()
        )
    )
    assert expected in line, line
    assert not paths.prepared(config.options.data_root, "librispeech").exists()


@pytest.mark.parametrize("case", ["caption JSON without sentences", "caption tokens as a string"])
def test_caption_data_case(tmp_path, case):
    root = tmp_path / "flickr8k"
    (root / "images").mkdir(parents=True)
    sentence = {"tokens": "a dog runs"} if "string" in case else {"raw": "a dog"}
    image = {"filename": "a.jpg", "split": "train", "sentences": [sentence]}
    if "without" in case:
        del image["sentences"]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": [image]}))
    raw = {
        "data": {"flickr8k": str(root)}, "data_root": str(tmp_path / "data"), "wandb": {"mode": "disabled"},
        "experiments": {"nt": {"track": "captioning", "dataset": "flickr8k", "data": {"encoder_weights": "w.pth"},
                               "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}},
    }  # fmt: skip
    config = parse(raw)
    line = one_line(
        dsd(
            "prepare", "--spec", config.row("nt").data_spec().to_json(), "--options", config.options.to_json()
        )
    )
    expected = (
        "missing field 'sentences'"
        if "without" in case
        else "sentences[0].tokens is str, expected a list of words"
    )
    assert f"{root / 'dataset_flickr8k.json'}: images[0] (a.jpg)" in line and expected in line, line


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    config = parse(tiny_vision_config(base))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    train(config, "resnet18", 0, "sparse1")
    return base, config


CHECKPOINT_CASES = {
    "truncated": "not a readable checkpoint (truncated or corrupt?",
    "empty": "is empty",
    "text file": "is a text file, not a checkpoint",
    "LFS pointer": "is a git-LFS pointer",
    "other row's": "trained for another spec",
    "pickle needing code": "refused, it needs pickled code",
    "mask shape edited": "fails its checksum",
    "mask payload corrupted": "fails its checksum",
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_case(tmp_path, trained, case):
    base, config = trained
    good = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "sparse1"))
    bad = tmp_path / "model.pt"
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "text file":
        bad.write_text("see the shared drive\n")
    elif case == "LFS pointer":
        bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n")
    elif case == "other row's":
        bad = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    elif case == "pickle needing code":
        torch.save({"format": "dsd-checkpoint", "note": argparse_namespace()}, bad)
    else:
        state = torch.load(good, weights_only=True)
        name = next(iter(state["pruner"]["masks"]))
        if case == "mask shape edited":
            state["pruner"]["shapes"][name] = [1, *state["pruner"]["shapes"][name]]
            state["pruner"]["masks"][name] = state["pruner"]["masks"][name][:-1]
        else:
            state["pruner"]["masks"][name].zero_()
        torch.save(state, bad)
    out = tmp_path / "eval.json"
    spec = config.phase("resnet18", 0, "sparse1")
    line = one_line(dsd("evaluate", "--spec", spec.to_json(), "--eval", "{}", "--options", config.options.to_json(),
                        "--checkpoint", str(bad), "--out", str(out)))  # fmt: skip
    assert str(bad) in line and CHECKPOINT_CASES[case] in line, line
    assert not out.exists()


def argparse_namespace():
    import argparse

    return argparse.Namespace(code="runs on load")


def test_the_readme_counts_the_config_and_checkpoint_cases_here():
    """The README's fault-matrix paragraph counts the cases: the config ones are CONFIG_CASES plus the YAML
    syntax error and the missing file, the checkpoint ones CHECKPOINT_CASES, and the total is the parts' sum."""
    readme = " ".join((REPO / "README.md").read_text().split())
    total = int(re.search(r"\(`tests/test_matrix.py` and the files it names\), (\d+) cases", readme).group(1))
    parts = {k: int(n) for k, n in re.findall(r"(config|Data|Checkpoints|Runtime) \((\d+)\):", readme)}
    assert parts["config"] == len(CONFIG_CASES) + 2, parts
    assert parts["Checkpoints"] == len(CHECKPOINT_CASES), parts
    assert total == sum(parts.values()), (total, parts)


# ----------------------------------------------------------------------------------------------- runtime


def test_a_non_finite_loss_is_one_line_with_the_step(tmp_path, shapes):
    raw = _damaged_shapes(tmp_path, shapes)
    raw["experiments"]["resnet18"]["phases"][0]["lr"] = 1e30
    out = tmp_path / "run"
    line = one_line(dsd("train", *_jobs(parse(raw)), "--out", str(out)))
    assert "non-finite loss" in line and "at epoch 0, step" in line
    _nothing_finished(out)


def _snakemake_cmd(tmp_path) -> list[str]:
    configfile = write_config(tmp_path, tiny_vision_config(tmp_path, seeds=[0]))
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", str(configfile),
            "--cores", "1"]  # fmt: skip


def _metrics_of(tmp_path, phase: str) -> str:
    return str(paths.metrics(paths.run_dir(str(tmp_path / "results"), "resnet18", 0, phase)))


def test_two_snakemake_runs_at_once_one_waits_out_the_lock(tmp_path):
    """The second run on the same folder is refused by Snakemake's lock (its own message), and the first
    completes untouched."""
    cmd = [*_snakemake_cmd(tmp_path), _metrics_of(tmp_path, "redense1")]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    locks, deadline = tmp_path / ".snakemake" / "locks", time.time() + 60
    while not locks.is_dir() or not any(locks.iterdir()):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=WARM, timeout=120)
    assert second.returncode != 0 and "LockException" in second.stdout + second.stderr
    assert first.wait(timeout=300) == 0 and os.path.exists(_metrics_of(tmp_path, "redense1"))


def test_snakemake_killed_then_rerun_finishes(tmp_path):
    """kill -9 of Snakemake itself (and so of its jobs): the README's plain rerun, after --unlock, completes."""
    cmd = [*_snakemake_cmd(tmp_path), _metrics_of(tmp_path, "sparse1")]
    run = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=WARM,
    )
    deadline = time.time() + 120
    while not os.path.exists(_metrics_of(tmp_path, "dense")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert subprocess.run([*cmd, "--unlock"], cwd=tmp_path, capture_output=True).returncode == 0
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=WARM, timeout=300)
    assert rerun.returncode == 0 and os.path.exists(_metrics_of(tmp_path, "sparse1")), rerun.stderr[-3000:]


def _trains(process, phase: str) -> bool:
    try:
        args = process.cmdline()
    except psutil.Error:  # gone, or a zombie by now
        return False
    return "train" in args and any(a.endswith(f"/seed0/{phase}") for a in args)


def _run_of(folder, phase: str):
    return paths.run_dir(str(folder / "results"), "resnet18", 0, phase)


def _epochs_checkpointed(resume_file, seen: dict) -> int:
    """Epochs in the phase's mid-phase checkpoint now (0: none yet); read again only when it was replaced."""
    with contextlib.suppress(FileNotFoundError):
        stat = resume_file.stat()
        key = (stat.st_ino, stat.st_mtime_ns)
        if key not in seen:  # written atomically: a name that exists holds a whole checkpoint
            seen[key] = len(torch.load(resume_file, weights_only=True)["history"])
        return seen[key]
    return 0


def _kill_mid_phase(job, run, epochs: int, after: int, delay: float) -> int:
    """kill -9 of `job` `delay` seconds after its phase's checkpoint of epoch `after` (of `epochs`), asserting
    that it still trained then; the epochs its last checkpoint holds, which the rerun resumes after."""
    resume_file, seen = paths.resume(run), {}
    while _epochs_checkpointed(resume_file, seen) < after:
        assert job.is_running(), f"{run}: the job ended before its checkpoint of epoch {after}"
        time.sleep(0.01)
    time.sleep(delay)
    assert not paths.metrics(run).exists(), f"{run}: the phase had ended before the kill"
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    done = _epochs_checkpointed(resume_file, seen)  # killed mid-phase, after a mid-phase checkpoint:
    assert after <= done < epochs, f"{run}: killed after {done} of {epochs} epochs"
    return done


def test_random_kills_of_every_phase_kind(tmp_path):
    """kill -9 of the training job at a random moment of a dense, a sparse, a re-dense and a control phase, after
    a random number of its epochs (each phase's rerun resumes from a mid-phase checkpoint), rerunning after
    each: every phase's final weights and metrics equal an undisturbed run's, bitwise."""

    def config_in(folder):
        raw = tiny_vision_config(folder, seeds=[0])
        row = raw["experiments"]["resnet18"]
        row["data"]["generate"] = {"per_class": {"train": 13, "val": 3, "test": 3}}
        row["train"]["max_steps_per_epoch"] = 8
        # 6 epochs (~0.1 s each): training is a small part of each job, and a kill has epochs to land in
        row["phases"] = [{"kind": "dense", "epochs": 6, "lr": 0.05},
                         {"kind": "sparse", "epochs": 6, "lr": 0.005, "sparsity": 0.3},
                         {"kind": "redense", "epochs": 6}]  # fmt: skip
        return raw

    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for folder in (reference, crashed):
        folder.mkdir()
    ref = config_in(reference)
    assert snakemake(reference, write_config(reference, ref), env=WARM).returncode == 0
    config = config_in(crashed)
    configfile = write_config(crashed, config)
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(crashed),
        "--configfile",
        str(configfile),
        "--cores",
        "1",
    ]
    rng = random.Random(7)
    remaining, resumed_after = ["dense", "sparse1", "redense1", "control"], {}
    for _ in range(len(remaining)):  # a rerun after each kill, until every phase kind has been killed
        run = subprocess.Popen(
            cmd, cwd=crashed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        while run.poll() is None:
            children = psutil.Process(run.pid).children(recursive=True)
            jobs = [(p, phase) for p in children for phase in remaining if _trains(p, phase)]
            if jobs:
                job, phase = jobs[0]
                history = json.loads(paths.metrics(_run_of(reference, phase)).read_text())["history"]
                # after a random epoch's checkpoint but the last three's: killed less than an epoch later, the
                # phase has two epochs left (a cold job spends its first ~3 s starting, not training)
                after = rng.randint(1, len(history) - 3)
                delay = rng.uniform(0, 0.8) * history[after]["seconds"]
                resumed_after[phase] = _kill_mid_phase(
                    job, _run_of(crashed, phase), len(history), after, delay
                )
                remaining.remove(phase)
                break
            time.sleep(0.02)
        run.wait(timeout=300)
    assert not remaining, f"never killed: {remaining}"
    # the kills above need cold jobs (a warm job's client SIGTERMs its child when killed); the rest may be warm
    final = subprocess.run(cmd, cwd=crashed, capture_output=True, text=True, timeout=600, env=WARM)
    assert final.returncode == 0, final.stderr[-3000:]
    for phase, epochs in resumed_after.items():  # each phase continued from its checkpoint, not afresh
        log = (paths.logs_dir(config["output_dir"]) / "resnet18" / "seed0" / f"{phase}.log").read_text()
        assert f"resuming from {paths.resume(_run_of(crashed, phase))} after {epochs} epoch" in log, log
    assert_same_run(
        ref["output_dir"], config["output_dir"], "resnet18", 0, ["dense", "sparse1", "redense1", "control"]
    )
