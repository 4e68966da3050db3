"""Faults: signals at the end of a phase, full and read-only disks, bad images in DataLoader workers,
corrupted and foreign checkpoints. Each ends as one line naming the file, and leaves nothing half-written."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import killed_while_writing, parse, prepare_data, sigint_as, tiny_vision_config, train
from test_reliability import strip

from dsd import paths
from dsd.engine import checkpoint, prepare
from dsd.errors import CheckpointError, DataError, DSDError
from dsd.tracks.captioning import synthetic as scenes
from dsd.tracks.speech import synthetic
from dsd.tracks.vision import metric as vision_metric
from dsd.tracks.vision import synthetic as shapes


def dsd_train(config, phase, out, *extra, seed=0) -> subprocess.CompletedProcess:
    spec = config.phase("resnet18", seed, phase).to_json()
    cmd = [sys.executable, "-m", "dsd", "train", "--spec", spec, "--options", config.options.to_json()]
    return subprocess.run([*cmd, "--out", str(out), *extra], capture_output=True, text=True, timeout=300)


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("dsd: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@contextmanager
def tiny_filesystem(path, size="64k", read_only=False):
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode
    ):
        pytest.skip("needs root and mount to make a small or read-only file system")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_signal_in_the_last_epoch_finishes_the_phase_and_keeps_every_epoch(tmp_path, monkeypatch):
    """SIGTERM while the last epoch is validated: nothing is left to train, so the phase completes as if
    undisturbed (before, it stopped and lost that epoch). Earlier in the phase, it checkpoints and stops."""
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    reference = train(config, "resnet18", 0, "dense", out=tmp_path / "reference")
    original = vision_metric.monitor

    def monitor_then_signal(model, exp, device):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during validation
        return original(model, exp, device)

    monkeypatch.setattr(vision_metric, "monitor", monitor_then_signal)
    signalled = train(config, "resnet18", 0, "dense", out=tmp_path / "signalled")
    assert strip(signalled) == strip(reference) and paths.metrics(tmp_path / "signalled").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    with tiny_filesystem(tmp_path / "small", size="128k") as small:  # the weights fit, the checkpoints not
        result = dsd_train(config, "dense", small / "run")
        assert "cannot write the checkpoint (No space left on device)" in error_line(result)
        assert str(small / "run") in error_line(result)
        leftovers = [p.name for p in (small / "run").iterdir()]
        assert leftovers == [], leftovers  # no temporary file, nothing that looks finished


def test_a_full_disk_while_writing_audio_names_the_file(tmp_path):
    """libsndfile says "problem with initialization of the flac decoder" when the disk is full."""
    spec = synthetic.CorpusSpec(utterances_per_speaker={"train": 2, "dev": 1, "test": 1})
    full = r"^\S+\.flac: cannot write the audio \(No space left on device\)$"
    with tiny_filesystem(tmp_path / "small", size="16k") as small, pytest.raises(DataError, match=full):
        synthetic.write_corpus(small / "corpus", spec)


def test_a_full_disk_while_generating_images_names_the_file(tmp_path):
    """The JPEG and PNG encoders' failed write names no file; the error names the image being written."""
    full = r"\.(jpg|png): cannot write \(No space left on device\)$"
    with tiny_filesystem(tmp_path / "small", size="16k") as small:
        with pytest.raises(DSDError, match=full.replace("(jpg|png)", "jpg")):
            shapes.generate(small / "shapes", size=64, per_class={"train": 40})
        with pytest.raises(DSDError, match=full.replace("(jpg|png)", "png")):
            scenes.generate(small / "scenes", splits=(40, 1, 1))


def test_a_disk_too_small_for_the_weights_fails_before_training(tmp_path):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    with tiny_filesystem(tmp_path / "small", size="16k") as small:
        result = dsd_train(config, "dense", small / "run")
        assert re.search(
            r"run: \d+ KiB free, less than the model's weights alone \(79 KiB\)", error_line(result)
        )
        assert "epoch" not in result.stdout


def test_a_read_only_run_folder_fails_before_training(tmp_path):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    with tiny_filesystem(tmp_path / "ro", read_only=True) as ro:
        result = dsd_train(config, "dense", ro / "run")
        line = error_line(result)
        assert str(ro / "run") in line and "Read-only file system" in line
        assert "epoch" not in result.stdout


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_named_from_any_worker(tmp_path, workers):
    raw = tiny_vision_config(tmp_path, workers=workers)
    raw["experiments"]["resnet18"]["data"]["in_memory"] = False
    config = parse(raw)
    prepare_data(config, "resnet18")
    for image in (tmp_path / "data" / "shapes" / "train").rglob("*.jpg"):
        image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    line = error_line(dsd_train(config, "dense", tmp_path / "run"))
    assert ".jpg: cannot decode image" in line and "Caught" not in line


def test_preparing_with_verify_lists_every_bad_image(tmp_path):
    from dsd.engine import prepare

    raw = tiny_vision_config(tmp_path, verify_data=True)
    raw["data"] = {"imagenet": str(tmp_path / "imagenet")}
    raw["experiments"]["resnet18"]["dataset"] = "imagenet"
    config = parse(raw)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            torch.manual_seed(0)
            from torchvision.io import write_jpeg

            for i in range(3):
                write_jpeg(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), str(folder / f"{i}.JPEG"))
    (tmp_path / "imagenet" / "train" / "a" / "1.JPEG").write_text("oops")
    (tmp_path / "imagenet" / "val" / "b" / "2.JPEG").write_bytes(b"")
    raw["experiments"]["resnet18"]["data"]["test_dir"] = "val"
    config = parse(raw)
    with pytest.raises(
        DataError, match=r"2 of 12 images cannot be decoded: .*train/a/1.JPEG, .*val/b/2.JPEG"
    ):
        prepare.prepare(config.experiment("resnet18"))


def test_verifying_images_keeps_a_bounded_number_of_decodes_pending(tmp_path, monkeypatch):
    """ThreadPoolExecutor.map makes a future for every image before the first is decoded, ~1.6 KB each: 2 GB
    for ImageNet's 1.33M images. The images go through in chunks; every bad one is still listed."""
    from concurrent.futures import ThreadPoolExecutor

    from dsd.tracks.vision import data as vision_data

    pending, most, submit = set(), [0], ThreadPoolExecutor.submit

    def counted(self, fn, *args, **kwargs):
        future = submit(self, fn, *args, **kwargs)
        pending.add(future)
        most[0] = max(most[0], len(pending))
        future.add_done_callback(pending.discard)
        return future

    def decode(path):
        if path.endswith("7.JPEG"):
            raise DataError(f"{path}: cannot decode image")

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counted)
    monkeypatch.setattr(vision_data, "decode", decode)
    monkeypatch.setattr(vision_data, "VERIFY_CHUNK", 5, raising=False)
    files = [tmp_path / f"{i}.JPEG" for i in range(40)]
    exp = parse(tiny_vision_config(tmp_path)).experiment("resnet18")
    with pytest.raises(DataError, match=r"4 of 40 images cannot be decoded: .*/7.JPEG, .*/17.JPEG, .*/27"):
        vision_data.verify_images(files, exp)
    assert most[0] <= 5


def test_corrupted_and_foreign_checkpoints_are_named(tmp_path):
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    train(config, "resnet18", 0, "sparse1")
    good = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "sparse1"))
    state = torch.load(good, weights_only=True)

    # a mask byte flipped inside a readable file: the checksum, not a wrong evaluation
    name = next(iter(state["pruner"]["masks"]))
    state["pruner"]["masks"][name][0] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    torch.save(state, flipped)
    with pytest.raises(CheckpointError, match=f"flipped.pt: corrupt, tensor pruner/masks/{name} fails"):
        checkpoint.load(flipped)

    for name, content, message in [
        ("empty.pt", b"", "is empty"),
        ("notes.pt", b"weights live elsewhere\n", "is a text file"),
        (
            "lfs.pt",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n",
            "is a git-LFS pointer",
        ),
        ("truncated.pt", good.read_bytes()[: len(good.read_bytes()) // 2], "not a readable checkpoint"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}: {message}"):
            checkpoint.load(tmp_path / name)

    result = subprocess.run(
        [sys.executable, "-m", "dsd", "evaluate", "--spec", config.phase("resnet18", 0, "sparse1").to_json(),
         "--eval", json.dumps({"batch_size": 8}), "--options", config.options.to_json(), "--checkpoint", str(flipped),
         "--out", str(tmp_path / "eval.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "fails its checksum" in error_line(result) and not (tmp_path / "eval.json").exists()


def test_unreadable_text_and_records_name_their_file(tmp_path):
    """A decode error alone names no file: the user's Latin-1 transcript or a truncated eval.json must be named."""
    from dsd.report import tables
    from dsd.tracks.speech import data as speech_data

    folder = tmp_path / "dev" / "19" / "198"
    folder.mkdir(parents=True)
    (folder / "19-198.trans.txt").write_bytes("19-198-0000 CAF\xc9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"19-198\.trans\.txt: not UTF-8 text"):
        speech_data.read_librispeech(tmp_path / "dev")
    manifest, index = tmp_path / "train.jsonl", tmp_path / "si_tr_s.ndx"
    manifest.write_bytes('{"audio": "caf\xe9.flac", "transcript": "a cat"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.jsonl: not UTF-8 text"):
        speech_data.read_manifest(manifest)
    index.write_bytes(";\xa9 1993\n11_1_1:/wsj0/si_tr_s/011/011c0201.wv1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"si_tr_s\.ndx: not UTF-8 text"):
        speech_data.read_wsj_index(index, tmp_path)
    record = paths.evaluation(paths.run_dir(str(tmp_path), "resnet18", 0, "dense"))
    record.parent.mkdir(parents=True)
    record.write_text('{"val": ')
    with pytest.raises(DataError, match=r"eval\.json: not readable JSON .*rerun the step that writes it"):
        tables.read_eval(str(tmp_path), "resnet18", 0, "dense")


def test_a_phase_removes_the_temporary_files_of_a_writer_killed_mid_write(tmp_path):
    """kill -9 between a checkpoint's write and its rename leaves `.resume.pt.tmp<pid>`, as large as the
    checkpoint: the phase's next job deletes it, and keeps a live writer's."""
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    out = tmp_path / "run"
    out.mkdir()
    killed_mid_write = (
        "import os, signal; open(f'.resume.pt.tmp{os.getpid()}', 'wb').write(bytes(4096)); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", killed_mid_write], cwd=out).returncode == -signal.SIGKILL
    live = out / f".eval.json.tmp{os.getpid()}"  # a name this phase does not write itself
    live.write_text("{}")
    train(config, "resnet18", 0, "dense", out=out)
    assert [p.name for p in out.glob(".*.tmp*")] == [live.name]


def test_a_temporary_file_of_another_machine_is_removed_only_once_it_is_a_day_old(tmp_path):
    """On a shared file system (a cluster's results or cache folder) another node's live writer has a pid that
    may be free here: its temporary file stays until it has not changed for a day. This machine's dead
    writer's goes at once, as do the files and folders (speech's half-built caches) of both sweeps."""
    import socket

    from dsd.tracks.speech import data as speech_data

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, here = int(done.stdout), socket.gethostname().split(".")[0]
    day_old = time.time() - paths.OTHER_MACHINES_WRITER_STALE_SECONDS - 60
    names = {"here": f"{dead}@{here}", "other": f"{dead}@other-node", "old": f"{dead + 1}@other-node"}
    for tag in names.values():
        (tmp_path / f".eval.json.tmp{tag}").write_text("{}")
        (tmp_path / f".train.feats.{tag}.tmp").mkdir()
        (tmp_path / f".train.feats.{tag}.tmp" / "frames").write_bytes(b"")
    for old in (tmp_path / f".eval.json.tmp{names['old']}", tmp_path / f".train.feats.{names['old']}.tmp"):
        for entry in (old, *(old.iterdir() if old.is_dir() else ())):
            os.utime(entry, (day_old, day_old))
    paths.remove_stale_temporaries(tmp_path)
    speech_data.remove_dead_builds(tmp_path / "train.feats")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".eval.json.tmp{names['other']}",
        f".train.feats.{names['other']}.tmp",
    ]
    assert paths.temporary_for(tmp_path / "x.pt").name == f".x.pt.tmp{os.getpid()}@{here}"


def test_a_damaged_prepared_marker_is_named_and_prepared_again(tmp_path):
    """`<dataset>.prepared.json` cut short (a copy or a crash): the error names it, and `dsd run` prepares the
    data set again instead of stopping on a JSON message that names no file."""
    from dsd.engine import prepare

    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    exp = config.row("resnet18").data_spec().experiment(config.options)
    marker = prepare.marker(exp)
    marker.write_text(marker.read_text()[:40])
    with pytest.raises(DataError, match=rf"{re.escape(str(marker))}: not readable JSON"):
        prepare.read_marker(exp)
    assert not prepare.is_current(exp)
    prepare_data(config, "resnet18")
    assert prepare.is_current(exp) and not list(marker.parent.glob(".*tmp*"))


def test_preparing_an_unchanged_data_set_again_keeps_its_marker_time(tmp_path):
    """`dsd prepare` by hand of a data set nothing has changed rewrote its marker, newer than every run: the
    next `snakemake` trained every phase of every row on it again (the marker is their input). The same record
    keeps the marker's time; another one (here another setting) makes it newer."""
    raw = tiny_vision_config(tmp_path)
    config = parse(raw)
    prepare_data(config, "resnet18")
    marker = prepare.marker(config.row("resnet18").data_spec().experiment(config.options))
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(marker, ns=(an_hour_ago, an_hour_ago))
    prepare_data(config, "resnet18")
    assert marker.stat().st_mtime_ns == an_hour_ago and prepare.is_current(
        config.row("resnet18").data_spec().experiment(config.options)
    )
    raw["experiments"]["resnet18"]["data"]["generate"]["per_class"]["test"] = 3
    prepare_data(parse(raw), "resnet18")
    assert marker.stat().st_mtime_ns > an_hour_ago


def test_dsd_run_evaluates_again_where_eval_json_cannot_be_read(tmp_path):
    """A damaged eval.json (cut short, or not an object) is evaluated again, as a damaged metrics.json is
    trained again; it stopped `dsd run` with a JSON message naming no file, or a traceback."""
    from conftest import dsd_cli, write_config

    raw = tiny_vision_config(tmp_path, seeds=[0])
    raw["experiments"]["resnet18"]["phases"] = raw["experiments"]["resnet18"]["phases"][:1]
    command = ["run", "--config", str(write_config(tmp_path, raw)), "--row", "resnet18"]
    assert dsd_cli(*command).returncode == 0
    record = paths.evaluation(paths.run_dir(str(tmp_path / "results"), "resnet18", 0, "dense"))
    for damaged in ('{"val": ', "[]"):
        record.write_text(damaged)
        again = dsd_cli(*command)
        assert again.returncode == 0 and "trained;" not in again.stdout, again.stderr[-2000:]
        assert json.loads(record.read_text())["phase"] == "dense"


def test_featurising_workers_die_with_a_job_killed_while_they_work(tmp_path):
    """kill -9 (or SIGTERM) of a job featurising speech in parallel: its workers die too; they waited forever."""
    import psutil

    script = (
        "import os, signal, time, psutil\n"
        "from dsd.tracks.speech.data import feature_pool\n"
        "pool = feature_pool(2)\n"
        "pool.submit(time.sleep, 60)\n"
        "print(*(child.pid for child in psutil.Process().children()), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    printed = tmp_path / "workers.txt"
    with open(printed, "w") as out:  # a file, not a pipe: workers left running would hold a pipe open
        job = subprocess.run([sys.executable, "-c", script], stdout=out, timeout=60)
    workers = [psutil.Process(int(pid)) for pid in printed.read_text().split()]
    assert job.returncode == -signal.SIGKILL and len(workers) == 2
    try:
        _, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"workers left running: {alive}"
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def test_featurising_workers_compute_after_the_job_ran_a_parallel_op(tmp_path):
    """A forked worker has none of its job's OpenMP threads: after a parallel op in the job (prepare sums a
    split's utterance lengths, over 32k of them for WSJ's si284), the workers' first parallel op (a long
    utterance's spectrum) waited for those threads forever, and so did the job."""
    script = (
        "import torch\n"
        "from dsd.tracks.speech import data\n"
        "from dsd.tracks.speech.config import Data\n"
        "torch.set_num_threads(2)\n"
        "torch.zeros(40_000, dtype=torch.long).sum()  # large enough for torch to run it on OpenMP's threads\n"
        "with data.feature_pool(2) as pool:\n"
        "    print(*pool.submit(data.features, torch.rand(16_000 * 5), Data()).result().shape)\n"
    )
    try:
        job = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the featurising worker hung in its first parallel op")
    assert job.returncode == 0, job.stderr
    assert job.stdout.split()[0] == "501"  # 5 s of 10 ms frames


@pytest.mark.parametrize(
    "persistent, late",
    [(True, True), (False, True), (True, False)],
    ids=["training loader, late start", "evaluation loader, late start", "training loader, after batches"],
)
def test_loader_workers_die_with_a_job_that_exits_and_leave_no_temporary_folder(tmp_path, persistent, late):
    """A job failing on its first batch exits at once (os._exit): a worker that started late under load, when
    its parent was already gone, waited forever for work and held the job's stdout pipe open (a hung CI test).
    Workers that die with their job leave nothing in the temporary folder (a batch's shared memory needs a
    folder there: killed outright, each worker left one)."""
    import psutil

    script = (
        "import os, time, psutil, torch\n"
        "from torch.utils.data._utils import worker\n"
        "from dsd.engine import loaders\n"
        "start = worker.ManagerWatchdog.__init__\n"
        "def late(self):\n"
        "    time.sleep(1.0)  # scheduled late: the parent has exited when the worker notes its pid\n"
        "    start(self)\n"
        f"if {late}:\n"
        "    worker.ManagerWatchdog.__init__ = late\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, key): return torch.zeros(1000)\n"
        f"if {persistent}:\n"
        "    loader = loaders.persistent_loader(Items(), 2, seed=0, workers=2)\n"
        "    loader.sampler.set_epoch(0)\n"
        "else:\n"
        "    loader = loaders.loader(Items(), 2, train=False, workers=2)\n"
        "batches = iter(loader)\n"
        f"if not {late}:\n"
        "    next(batches), next(batches)\n"
        "print(*(child.pid for child in psutil.Process().children()), flush=True)\n"
        "os._exit(2)\n"
    )
    printed, tmp = tmp_path / "workers.txt", tmp_path / "tmp"
    tmp.mkdir()
    with open(printed, "w") as out:  # a file, not a pipe: workers left running would hold a pipe open
        job = subprocess.run(
            [sys.executable, "-c", script], stdout=out, timeout=60, env=os.environ | {"TMPDIR": str(tmp)}
        )
    workers = [psutil.Process(int(pid)) for pid in printed.read_text().split()]
    assert job.returncode == 2 and len(workers) == 2
    try:
        _, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"workers left running: {alive}"
        assert not list(tmp.iterdir())
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@pytest.mark.parametrize("started", ["from a terminal", "with SIGINT ignored (nohup, &)"])
def test_loader_workers_keep_working_through_a_ctrl_c_to_the_process_group(started):
    """A terminal's Ctrl-C reaches the job's whole process group, loader workers included. The job announces
    once that it checkpoints at its next step (the workers, forked with its handler, each announced it too)
    and its workers go on loading the batches it may still need. A job started with SIGINT ignored ignores
    it."""
    script = (
        "import os, signal, time, torch\n"
        "from dsd.engine import loaders, resume\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, key):\n"
        "        time.sleep(0.3)  # a worker is decoding when the signal lands\n"
        "        return torch.zeros(1)\n"
        "loader = loaders.persistent_loader(Slow(), 2, seed=0, workers=2)\n"
        "loader.sampler.set_epoch(0)\n"
        "with resume.StopSignal() as stop:\n"
        "    batches = iter(loader)\n"
        "    first = next(batches)\n"
        "    os.killpg(0, signal.SIGINT)\n"
        "    rest = list(batches)\n"
        "print(1 + len(rest), stop.received)\n"
    )
    terminal = started == "from a terminal"
    disposition = signal.SIG_DFL if terminal else signal.SIG_IGN
    job = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         start_new_session=True, preexec_fn=sigint_as(disposition))  # fmt: skip
    expected = ["4", "SIGINT"] if terminal else ["4", "None"]
    assert job.returncode == 0 and job.stdout.split() == expected, job.stderr[-2000:]
    assert job.stderr.count("dsd: Ctrl-C: checkpointing at the next step") == terminal, job.stderr[-2000:]


def test_a_split_cache_half_built_by_a_killed_job_is_removed(tmp_path):
    """kill -9 while a split's speech features are built leaves `.NAME.PID.tmp`, up to the split's features in
    size: the next build of that cache deletes it, and keeps a live builder's."""
    from test_matrix import _librispeech, _speech_row

    from dsd.engine import prepare
    from dsd.tracks.speech import data as speech_data

    config = _speech_row(tmp_path, _librispeech(tmp_path / "LibriSpeech"))
    exp = config.row("ds").data_spec().experiment(config.options)
    out = speech_data._cache_dir(exp, "train", prepare.content_fingerprint(exp))
    out.parent.mkdir(parents=True)
    build = "tmp = f'.{sys.argv[1]}.{os.getpid()}.tmp'; os.mkdir(tmp); open(f'{tmp}/frames.f32', 'wb').write(bytes(4096))"
    killed_while_writing(out.parent, build, out.name)
    assert list(out.parent.glob(".*.tmp"))
    live = out.parent / f".{out.name}.{os.getppid()}.tmp"  # a live process, not this builder
    live.mkdir()
    prepare.prepare(exp)
    assert out.is_dir() and [p.name for p in out.parent.glob(".*.tmp")] == [live.name]


def test_a_speech_features_cache_cut_short_is_named_not_read_as_empty_utterances(tmp_path):
    """A split's frames file shorter than its index (an interrupted copy of data_root; a machine crash before its
    blocks reached the disk, which the build now flushes): the utterances past its end were read as zero frames
    (CTC: no loss; decoding: every word missed), silently. The cache is named, with what to do."""
    from test_matrix import _librispeech, _speech_row

    from dsd.tracks.speech import data as speech_data

    config = _speech_row(tmp_path, _librispeech(tmp_path / "LibriSpeech"))
    exp = config.row("ds").data_spec().experiment(config.options)
    prepare.prepare(exp)
    ds = speech_data.dataset(exp, "test")
    os.truncate(ds.frames, int(ds.offsets[-2]) * ds.bins * 4)  # the last utterance's frames are gone
    speech_data._dataset_at.cache_clear()  # a later job's process
    with pytest.raises(
        DataError, match=r"frames.f32: \d+ bytes, its index needs \d+: a damaged features cache"
    ):
        speech_data.dataset(exp, "test")
    (ds.frames.parent / "index.json").write_text('{"format": "dsd-speech-feat')  # an index cut short
    with pytest.raises(DataError, match=r"index.json: not readable JSON"):
        speech_data.dataset(exp, "test")


def test_a_file_where_a_folder_belongs_is_one_line_naming_it(tmp_path):
    """output_dir or data_root set to a file (a config file's path, say): one line naming the path, not a
    NotADirectoryError traceback."""
    from conftest import dsd_cli, write_config

    configfile = write_config(tmp_path, tiny_vision_config(tmp_path))
    source = ["--config", str(configfile), "--row", "resnet18"]
    for key, command in (
        ("output_dir", ["train", "--seed", "0", "--phase", "dense"]),
        ("data_root", ["prepare"]),
    ):
        result = dsd_cli(*command, *source, "--set", f"{key}={configfile}")
        assert "Not a directory" in error_line(result) and str(configfile) in error_line(result)
        assert "Traceback" not in result.stderr


def test_evaluating_the_validation_split_alone_into_a_file(tmp_path):
    """`dsd evaluate --split val --out FILE` wrote the file, then ended with a KeyError traceback (status 1)."""
    from conftest import dsd_cli, write_config

    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    checkpoint_path = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    out = tmp_path / "val.json"
    result = dsd_cli(
        "evaluate", "--config", str(write_config(tmp_path, tiny_vision_config(tmp_path))), "--row", "resnet18",
        "--checkpoint", str(checkpoint_path), "--split", "val", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0 and "resnet18 seed 0 dense: val top1_error_pct =" in result.stdout, (
        result.stderr
    )
    assert "val" in json.loads(out.read_text()) and "test" not in json.loads(out.read_text())


def test_init_for_a_recipe_first_phase_is_one_line(tmp_path):
    """`dsd train --phase dense --init model.pt` (a start from a checkpoint): one line, not an AttributeError
    traceback from looking up the previous phase there is none of."""
    config = parse(tiny_vision_config(tmp_path))
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    dense = paths.checkpoint(paths.run_dir(config.options.output_dir, "resnet18", 0, "dense"))
    result = dsd_train(config, "dense", tmp_path / "again", "--init", str(dense))
    assert "phase 'dense' is its recipe's first and starts from no checkpoint" in error_line(result)
    assert not list((tmp_path / "again").iterdir())


def test_image_features_of_a_row_that_is_not_captioning_is_one_line(tmp_path):
    from conftest import dsd_cli, write_config

    configfile = write_config(tmp_path, tiny_vision_config(tmp_path))
    result = dsd_cli("features", "--config", str(configfile), "--row", "resnet18")
    assert "dsd features encodes a captioning row's images; resnet18 is a vision row" in error_line(result)


def test_a_full_disk_while_caching_speech_features_names_the_cache(tmp_path):
    """A write to a full disk names no file: the error names the split's features cache, and none is left."""
    from test_matrix import _librispeech, _speech_row

    config = _speech_row(tmp_path, _librispeech(tmp_path / "LibriSpeech"))
    with tiny_filesystem(tmp_path / "small", size="64k") as small:
        raw = json.loads(config.options.to_json()) | {"data_root": str(small)}
        options = type(config.options).from_json(json.dumps(raw))
        frames = small / "fill"
        with contextlib.suppress(OSError):
            frames.write_bytes(bytes(64 * 1024))  # the disk full but for a little
        exp = config.row("ds").data_spec().experiment(options)
        with pytest.raises(
            DataError, match=r"features/train-\w+: cannot write the features cache \(No space"
        ):
            prepare.prepare(exp)
        assert not list((small / "cache").rglob("*train*"))


def test_a_spec_of_another_shape_is_one_line_naming_the_flag(tmp_path):
    """`dsd spec`'s output (the spec under "spec", with its fingerprint) passed back as --spec, or a phase's spec
    where a data set's belongs: one line naming --spec, not a KeyError or TypeError traceback."""
    from conftest import dsd_cli, write_config

    configfile = write_config(tmp_path, tiny_vision_config(tmp_path))
    printed = dsd_cli(
        "spec", "--config", str(configfile), "--row", "resnet18", "--seed", "0", "--phase", "dense"
    )
    for command in (["train", "--out", str(tmp_path / "run")], ["prepare"]):
        result = dsd_cli(*command, "--spec", printed.stdout)
        assert error_line(result).startswith("dsd: error: --spec: not a "), result.stderr
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    """paper.yaml's `device: cuda` where no GPU is visible: one line, not a RuntimeError traceback."""
    from conftest import write_config

    raw = tiny_vision_config(tmp_path, device="cuda")
    prepare_data(parse(raw), "resnet18")
    source = [
        "--config",
        str(write_config(tmp_path, raw)),
        "--row",
        "resnet18",
        "--seed",
        "0",
        "--phase",
        "dense",
    ]
    no_gpu = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "dsd", "train", *source],
        capture_output=True,
        text=True,
        env=no_gpu,
        timeout=300,
    )
    assert "config.device is 'cuda' but no CUDA device is available" in error_line(result)


def test_an_audio_file_shorter_than_a_spectrum_window_is_one_line_naming_it(tmp_path):
    """A clipped utterance of under 10 ms (100 samples) stopped `dsd prepare` with torch's padding error from a
    featurising worker, a traceback naming no file."""
    import numpy as np
    import soundfile as sf
    from test_matrix import _librispeech, _speech_row

    corpus = _librispeech(tmp_path / "LibriSpeech")
    clipped = corpus / "train" / "19" / "198" / "19-198-0001.flac"
    sf.write(clipped, np.zeros(100), 16000)
    config = _speech_row(tmp_path, corpus)
    spec, options = config.row("ds").data_spec().to_json(), config.options.to_json()
    result = subprocess.run(
        [sys.executable, "-m", "dsd", "prepare", "--spec", spec, "--options", options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"{clipped}: audio file has 100 samples at 16 kHz, too short" in error_line(result)


def test_more_class_folders_than_model_outputs_stops_before_training(tmp_path):
    """A folder left in train/ by the extraction made a third class for a two-output model: Snakemake's
    `dsd train --spec` (the config check sees the count only once prepared) stopped mid-epoch with
    cross_entropy's `IndexError: Target 2 is out of bounds` (on a GPU a device-side assert)."""
    import shutil

    from test_paper_layouts import WNIDS, fake_imagenet

    root = fake_imagenet(tmp_path / "imagenet")
    stray = root / "train" / "ILSVRC2012_img_train"
    stray.mkdir()
    shutil.copy(root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG", stray)
    raw = tiny_vision_config(tmp_path) | {"data": {"imagenet": str(root)}}
    row = raw["experiments"]["resnet18"]
    row["dataset"], row["model"]["num_classes"] = "imagenet", 2
    row["data"] = {"image_size": 32, "resize": 32, "val_dir": "val", "test_dir": "val", "in_memory": False}
    config = parse(raw)
    prepare.prepare(config.experiment("resnet18"))
    line = error_line(dsd_train(config, "dense", tmp_path / "run"))
    assert (
        f"{root / 'train'}: 3 class folders, more than model.num_classes 2 (e.g. 'ILSVRC2012_img_train')"
        in line
    )


def test_fewer_class_folders_than_a_pretrained_models_outputs_are_said(tmp_path):
    """A synset folder lost in extraction: with pretrained weights every later folder's images are labelled as
    the previous class, and the dense model scored as wrong on them without a word. Said (once), not refused: a
    subset may be meant."""
    import shutil

    from test_paper_layouts import WNIDS, fake_imagenet

    from dsd.tracks.vision import model as vision_model

    root = fake_imagenet(tmp_path / "imagenet")
    shutil.rmtree(root / "train" / WNIDS[0])  # and its validation images and labels: a consistent subset
    labels = root / "LOC_val_solution.csv"
    kept = [line for line in labels.read_text().splitlines() if WNIDS[0] not in line]
    for image in root.glob("val/*.JPEG"):
        if f"{image.stem}," not in "\n".join(kept):
            image.unlink()
    labels.write_text("\n".join(kept) + "\n")
    weights = tmp_path / "resnet18.pt"
    raw = tiny_vision_config(tmp_path) | {"data": {"imagenet": str(root)}}
    row = raw["experiments"]["resnet18"]
    row["dataset"], row["model"]["num_classes"], row["model"]["weights"] = "imagenet", 2, str(weights)
    row["data"] = {"image_size": 32, "resize": 32, "val_dir": "val", "test_dir": "val", "in_memory": False}
    config = parse(raw)
    exp = config.experiment("resnet18")
    torch.save(vision_model.build(exp, pretrained=False).state_dict(), weights)
    prepare.prepare(exp)
    job = dsd_train(config, "dense", tmp_path / "run")
    said = f"{root / 'train'}: 1 class folders, fewer than the 2 outputs of the pretrained model.weights"
    assert job.returncode == 0 and job.stderr.count(said) == 1, job.stderr[-3000:]


def test_training_utterances_left_out_as_too_long_are_counted(tmp_path, capsys):
    """data.max_seconds drops longer training utterances without a word: all of them (a limit in another unit)
    ended as "split 'train' has no utterances", a corpus that has them."""
    import numpy as np
    import soundfile as sf
    from test_matrix import _librispeech

    corpus = _librispeech(tmp_path / "LibriSpeech")  # 0.3 s utterances
    sf.write(corpus / "train" / "19" / "198" / "19-198-0001.flac", np.zeros(16000), 16000)

    def prepared(limit):
        raw = {"data": {"librispeech": str(corpus)}, "data_root": str(tmp_path / f"data{limit}"),
               "experiments": {"ds": {"track": "speech", "dataset": "librispeech",
                                      "data": {"train": "train", "val": "dev", "test": "test", "max_seconds": limit},
                                      "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01}]}}}  # fmt: skip
        prepare.prepare(parse(raw).experiment("ds"))

    prepared(0.5)
    assert (
        "split 'train': 1 of 2 utterances longer than data.max_seconds 0.5 left out"
        in capsys.readouterr().err
    )
    with pytest.raises(
        DataError, match=r"'train' has no utterances \(2 of 2 utterances longer than data.max_"
    ):
        prepared(0.2)


def test_an_audio_file_with_a_nan_sample_is_named(tmp_path):
    """A float WAV with one NaN sample (a broken conversion) made every feature of its utterance NaN, cached as
    they were: training stopped at a non-finite loss naming no file, evaluation decoded garbage without a word."""
    import numpy as np
    import soundfile as sf

    from dsd.tracks.speech import data as speech_data

    audio = 0.3 * np.sin(np.arange(4800) / 10.0)
    audio[1000] = np.nan
    sf.write(tmp_path / "u.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"u.wav: audio file has non-finite samples"):
        speech_data.load_audio(tmp_path / "u.wav")


def test_images_deleted_after_preparing_stop_training_with_one_line_naming_the_folder(tmp_path):
    """A prepared image data set some of whose files went afterwards (a clean-up, an rsync cut short) trained
    and scored silently on the rest: the marker, and so Snakemake, still called it prepared."""
    config = parse(tiny_vision_config(tmp_path, seeds=[0]))
    prepare_data(config, "resnet18")
    for image in sorted((tmp_path / "data" / "shapes" / "train").rglob("*.jpg"))[:3]:
        image.unlink()
    with pytest.raises(
        DataError, match=r"train: 57 images, 60 when data set 'shapes' was prepared .*dsd prepare"
    ):
        train(config, "resnet18", 0, "dense")
    prepare_data(config, "resnet18")  # as the message says: the images written again
    assert train(config, "resnet18", 0, "dense")["epochs"] == 1
