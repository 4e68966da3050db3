"""One function per artifact path, shared by the Snakefile and the CLI so the two never disagree.

Arguments may be Snakemake wildcard strings such as "{row}"; the functions only join text.
"""

from __future__ import annotations

from pathlib import Path


def dataset_dir(data_root: str, dataset: str) -> Path:
    return Path(data_root) / dataset


def prepared(data_root: str, dataset: str) -> Path:
    """Written last by `dsd prepare`: its presence means the data set is complete and checked."""
    return Path(data_root) / f"{dataset}.prepared.json"


def run_dir(output_dir: str, row: str, seed: int | str, phase: str) -> Path:
    return Path(output_dir) / "runs" / str(row) / f"seed{seed}" / str(phase)


def checkpoint(run: Path) -> Path:
    """The phase's final model (+ optimizer and masks): the next phase starts from it."""
    return Path(run) / "model.pt"


def metrics(run: Path) -> Path:
    """Per-epoch history of one phase (training loss, validation monitor); written after the checkpoint."""
    return Path(run) / "metrics.json"


def resume(run: Path) -> Path:
    """Rolling mid-phase checkpoint; not a Snakemake output, so it survives a failed or killed job."""
    return Path(run) / "resume.pt"


def evaluation(run: Path) -> Path:
    """Validation and test metrics of the phase's checkpoint, with a few test predictions (captions,
    transcripts); written by the evaluation step."""
    return Path(run) / "eval.json"


def read_text(path: Path) -> str:
    """A text file from a data set; one that is not UTF-8 is named (a bare decode error names no file). A
    byte-order mark (the file saved again by Notepad or a spreadsheet) is dropped: it would become part of the
    first line's first word (an utterance id, a column name)."""
    try:
        return Path(path).read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        from dsd.errors import DataError

        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json(path: Path) -> dict:
    """A record this project wrote (metrics.json, eval.json): one that cannot be read is named."""
    import json

    try:
        return json.loads(read_text(path))
    except ValueError as err:
        from dsd.errors import DataError

        raise DataError(f"{path}: not readable JSON ({err}); rerun the step that writes it") from None


def recorded(path: Path, key: str):
    """A key of a finished step's JSON record; None where there is none (or it cannot be read)."""
    from dsd.errors import DataError

    try:
        return read_json(path).get(key)
    except (OSError, DataError, AttributeError):
        return None


def stale_flag(output_dir: str, output: Path) -> Path:
    """A flag the pipeline makes when `output` exists but records another identity than the config's: an
    input of the job that writes `output`, so Snakemake reruns it (workflow/rules/common.smk). Named after
    the output's modification time, so each stale version gets a new flag, newer than it."""
    output = Path(output)
    try:
        where = output.relative_to(output_dir)
    except ValueError:  # a data set's marker, under data_root: its name is unique
        where = Path(output.name)
    return Path(output_dir) / "stale" / f"{where}.{output.stat().st_mtime_ns}"


def tables_dir(output_dir: str) -> Path:
    return Path(output_dir) / "tables"


def plots_dir(output_dir: str) -> Path:
    return Path(output_dir) / "plots"


def logs_dir(output_dir: str) -> Path:
    return Path(output_dir) / "logs"


def benchmarks_dir(output_dir: str) -> Path:
    return Path(output_dir) / "benchmarks"


def wandb_dir(output_dir: str) -> Path:
    return Path(output_dir) / "wandb"


def write_json(path: Path, payload: dict) -> None:
    """Whole or not at all (temporary file, then rename); an I/O failure names the path and the cause."""
    import json

    from dsd.errors import DSDError

    path = Path(path)
    try:
        write_atomically(path, json.dumps(payload, indent=1, sort_keys=True).encode())
    except OSError as err:
        raise DSDError(f"{path}: cannot write ({err.strerror or err})") from None


def write_atomically(path: Path, data) -> None:
    """`data` (bytes-like) at `path`, whole or not at all, and durably: a temporary file flushed to the disk,
    renamed, and the rename itself flushed (the folder), so that after a crash of the machine a file whose
    presence means "finished" is not there empty. On an OSError the temporary file is removed."""
    import os

    tmp = temporary_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def temporary_for(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `.NAME.tmp<writer>`, which names the writer, so
    that `remove_stale_temporaries` can tell a killed writer's file from a live one's."""
    return Path(path).with_name(f".{Path(path).name}.tmp{writer_tag()}")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (`temporary_for`, of `write_json` and checkpoints) that a writer killed
    mid-write left in `folder`: a checkpoint's is as large as the checkpoint. Those of a live writer stay."""
    import re

    for tmp in Path(folder).glob(".*.tmp*"):
        match = re.fullmatch(r"\..+\.tmp(\d+(?:@.+)?)", tmp.name)
        if match and writer_gone(match.group(1), tmp):
            tmp.unlink(missing_ok=True)


# Another machine's writer (a shared file system) cannot be asked whether it runs; a temporary file it has not
# touched for this long is taken as left by a writer that died.
OTHER_MACHINES_WRITER_STALE_SECONDS = 24 * 3600


def writer_tag() -> str:
    """PID@host: process ids are per machine, and on a shared file system (a cluster's results or cache folder)
    another node's live writer may have a pid that is free here."""
    import os

    return f"{os.getpid()}@{_host()}"


def _host() -> str:
    """This machine's short name: a cluster's fully qualified names can be long enough to push a temporary
    file's name past the file system's 255 bytes."""
    import socket

    return socket.gethostname().split(".")[0][:64]


def writer_gone(tag: str, path: Path) -> bool:
    """Whether the writer of `path`, named by `tag` (`writer_tag`; a bare pid: this machine), has ended: here,
    its process is gone; on another machine, `path` has not changed for OTHER_MACHINES_WRITER_STALE_SECONDS."""
    import time

    pid, _, host = tag.partition("@")
    if not pid.isdigit():
        return False
    if not host or host == _host():
        return not _alive(int(pid))
    try:
        changed = max(entry.stat().st_mtime for entry in (path, *(path.iterdir() if path.is_dir() else ())))
    except FileNotFoundError:  # removed meanwhile
        return False
    return time.time() - changed > OTHER_MACHINES_WRITER_STALE_SECONDS


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_image(image, path: Path, **options) -> None:
    """`image.save(path, **options)` (a PIL image); an I/O failure names the path (a full disk's error from the
    encoder's write names no file)."""
    from dsd.errors import DSDError

    try:
        image.save(path, **options)
    except OSError as err:
        raise DSDError(f"{path}: cannot write ({err.strerror or err})") from None


def check_writable(folder: Path) -> None:
    """Fail before hours of work, not after them, when a run folder cannot be written."""
    import os

    from dsd.errors import DSDError

    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DSDError(f"{folder}: cannot write here ({err.strerror or err})") from None


def remove_row_files(folder: Path, patterns: tuple[str, ...]) -> None:
    """Before a table or figures of some rows are written into `folder`: the per-row files of an earlier one
    (`sweep_*.csv`, say) go, so that a row or sweep since left out of the config leaves nothing behind for
    the report, or `make publish`, to pass off as this run's."""
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            path.unlink(missing_ok=True)
