"""Preparing a data set once: generate it or check it, and name its content.

`<data_root>/<dataset>.prepared.json` is written last, so its presence means the data set is complete and
checked. It holds the data set's fingerprint: for a generated data set the hash of its generator settings
(generation is deterministic), for a real one the hash of every source file's path, size and modification
time. Caches derived from the data carry that fingerprint, and checkpoints record it, so nothing computed
from other data is ever taken for this data's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from dsd import paths, tracks
from dsd.errors import DataError
from dsd.spec import Experiment, differences, fingerprint


def marker(exp: Experiment) -> Path:
    return paths.prepared(exp.options.data_root, exp.dataset)


def read_marker(exp: Experiment) -> dict:
    path = marker(exp)
    if not path.is_file():
        raise DataError(
            f"{path}: data set {exp.dataset!r} is not prepared (run: dsd prepare --config ... --row {exp.row})"
        )
    record = paths.read_json(path)  # a damaged marker is named; `is_current` then prepares the data again
    wanted = json.loads(exp.data_spec().to_json())
    if record.get("spec") != wanted:  # another config's settings for the same folder (a shared data_root)
        why = "; ".join(differences(record.get("spec"), wanted)[:3])
        raise DataError(
            f"{path}: data set {exp.dataset!r} was prepared with other settings ({why}); "
            f"run: dsd prepare --config ... --row {exp.row}"
        )
    return record


def data_fingerprint(exp: Experiment) -> str:
    return read_marker(exp)["fingerprint"]


def is_current(exp: Experiment) -> bool:
    """Prepared with these settings, and (real data) no source file added, removed or changed since."""
    try:
        return data_fingerprint(exp) == content_fingerprint(exp)
    except DataError:
        return False


def content_fingerprint(exp: Experiment) -> str:
    """Generated data: its settings. Real data: every source file's relative path, size and mtime (hidden
    files and folders left out), and (speech) its transcripts as this code reads them."""
    spec = exp.data_spec()
    if exp.generated:
        return fingerprint({"generated": spec.fingerprint})
    digest = hashlib.sha256(spec.fingerprint.encode())
    track = tracks.get(exp.track).data
    for source in track.sources(exp):
        for entry in _listing(Path(source)):
            digest.update(entry.encode())
    # the text as read by this code's rules (WSJ's transcript normalisation): a rule changed, the same
    # files hold other transcripts
    if hasattr(track, "content_as_read"):
        digest.update(track.content_as_read(exp, digest.hexdigest()).encode())
    return digest.hexdigest()[:16]


def _listing(root: Path):
    if not root.exists():
        yield f"{root}\0missing\n"
        return
    if root.is_file():
        st = root.stat()
        yield f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}\n"
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):  # not data (the readers skip them): a Finder-rewritten .DS_Store
                continue  # or a Jupyter .ipynb_checkpoints/ made every run of the data set stale
            if entry.is_dir():
                stack.append(Path(entry.path))
            else:
                st = _stat(entry)
                yield f"{os.path.relpath(entry.path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n"


def _stat(entry: os.DirEntry) -> os.stat_result:
    """A listed file's status; a symbolic link whose target is gone (a disc not mounted, a link farm of an
    ImageNet subset after its source moved) is named as one: "No such file" named a file `ls` shows."""
    try:
        return entry.stat()
    except FileNotFoundError:
        if not entry.is_symlink():
            raise
        raise DataError(
            f"{entry.path}: broken symbolic link (its target {os.readlink(entry.path)} does not exist)"
        ) from None


@contextlib.contextmanager
def exclusive(exp: Experiment):
    """One process at a time prepares a data set: several `dsd run` started at once (a row per GPU, say) each
    generated the same folder, one deleting the images another was writing or reading, and a marker written by
    one could stand for images another left half rewritten."""
    path = marker(exp).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a")  # noqa: SIM115 - closing it releases the lock, also when the process dies
    except OSError:  # a read-only data_root: a prepared data set is only read there
        lock = None
    with lock or contextlib.nullcontext():
        # a file system without locks (Lustre mounted noflock): unlocked, as before
        with contextlib.suppress(OSError, TypeError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure(exp: Experiment) -> None:
    """The data set prepared with these settings and (real data) its current content: prepared here unless it
    is, or another process prepared it while this one waited for it."""
    with exclusive(exp):
        if not is_current(exp):
            _prepare(exp)


def prepare(exp: Experiment) -> dict:
    """Generate or check the data set, build its caches, and write the marker last."""
    with exclusive(exp):
        return _prepare(exp)


def _previous(path: Path) -> tuple[dict | None, int]:
    """The marker's record and time before it is rewritten (none if missing or unreadable)."""
    try:
        return paths.read_json(path), path.stat().st_mtime_ns
    except (OSError, DataError):
        return None, 0


def _prepare(exp: Experiment) -> dict:
    path = marker(exp)
    before, written = _previous(path)
    path.unlink(missing_ok=True)  # a data set being rewritten must not look prepared
    data_fp = content_fingerprint(exp)
    summary = tracks.get(exp.track).data.prepare(exp, data_fp)
    if not exp.generated:  # a real data set may have changed while it was checked
        data_fp = content_fingerprint(exp)
    record = {
        "dataset": exp.dataset,
        "path": exp.data_dir,
        "spec": json.loads(exp.data_spec().to_json()),
        "fingerprint": data_fp,
        "summary": summary,
    }
    paths.write_json(path, record)  # whole and flushed, or not at all (its presence means prepared)
    # the same record as before (a `dsd prepare` by hand of data nothing changed): its time too, as a newer
    # marker would make Snakemake train every phase of every row on this data set again
    if paths.read_json(path) == before:
        os.utime(path, ns=(written, written))
    return record
