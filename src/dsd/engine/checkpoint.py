"""Checkpoints: atomic writes, weights-only loads, a checksum per tensor, and errors that name the file.

A checkpoint is written to a temporary file, flushed to disk and renamed, so a crash or a full disk never
leaves a half-written file under its name (the temporary file is removed on failure). Every tensor's CRC-32
is stored beside it and verified on load: a flipped or zeroed byte inside a readable file is caught, not
evaluated. A file that is not a checkpoint (empty, text, a git-LFS pointer, a truncated archive) is named as
such.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from dsd import paths
from dsd.errors import CheckpointError

FORMAT = "dsd-checkpoint"
ZIP_MAGIC = b"PK\x03\x04"
LFS_POINTER = b"version https://git-lfs"


def _tensors(value, prefix: str = ""):
    """(key path, tensor) for every tensor inside nested dicts and lists."""
    if torch.is_tensor(value):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def _crc(tensor: torch.Tensor) -> int:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy().data)


def save(state: dict, path: str | Path) -> None:
    """Write atomically; an I/O failure (no space, no permission) is one error naming the path and the cause."""
    path = Path(path)
    payload = {"format": FORMAT, **state}
    payload["checksums"] = {key: _crc(t) for key, t in _tensors(state)}
    buffer = io.BytesIO()  # serialised first: then a failed write is the OS's error, with its cause
    torch.save(payload, buffer)
    try:
        paths.write_atomically(path, buffer.getbuffer())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({err.strerror or err})") from None


def digest(path: str | Path) -> str:
    """16 hex digits of SHA-256 over the file's bytes: which checkpoint a phase started from."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_space(folder: str | Path, model: nn.Module) -> None:
    """Fail before a phase trains, not at its end, where the run folder's disk cannot hold even the model's
    weights (a checkpoint needs them and more: the optimizer's state, and room for the temporary copy)."""
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(
            f"{folder}: {_size(free)} free, less than the model's weights alone ({_size(need)}): "
            "its checkpoint cannot be written"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is instead, when its first bytes already say it is no checkpoint."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "is empty"
    if head.startswith(LFS_POINTER):
        return "is a git-LFS pointer, not the checkpoint it stands for (run git lfs pull)"
    if not head.startswith(ZIP_MAGIC):
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        return "is a text file, not a checkpoint" if text else "is not a torch checkpoint (no zip archive)"
    return None


def load(path: str | Path) -> dict:
    """Tensors and plain containers only (weights_only=True); checksums verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    what = _not_a_checkpoint(path)
    if what:
        raise CheckpointError(f"{path}: {what}")
    state = _read(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a DSD checkpoint (no '{FORMAT}' marker)")
    _verify(state, path)
    return state


def _read(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused, it needs pickled code to load ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt? {first})") from None


def load_weights(model: nn.Module, path: str | Path, key: str, unused: tuple[str, ...] = ()) -> None:
    """Pretrained weights from a plain state-dict file (torchvision's, or saved from DDP); `key`, the config key
    that names the file, goes into the one-line errors; entries under the `unused` prefixes are not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found ({key})")
    if what := _not_a_checkpoint(path):
        raise CheckpointError(f"{path}: {what.replace('checkpoint', 'weights file')} ({key})")
    state = _read(path, f"weights file ({key})")
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict ({key})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else state
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights of another model ({key}: {_misfit(model, state)})") from err


def _verify(state: dict, path: Path) -> None:
    expected = state.pop("checksums", None)
    if expected is None:
        return  # written before checkpoints carried checksums
    content = {k: v for k, v in state.items() if k != "format"}
    found = dict(_tensors(content))
    for key, crc in expected.items():
        if key not in found or _crc(found[key]) != crc:
            raise CheckpointError(f"{path}: corrupt, tensor {key.lstrip('/')} fails its checksum")


def load_model(model: nn.Module, state: dict, path: str | Path) -> None:
    """Strict load; a checkpoint of another architecture is named as such instead of a key dump."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        detail = _misfit(model, state.get("model", {}))
        arch = state.get("arch", "unknown")
        raise CheckpointError(
            f"{path}: checkpoint is for a different model (saved arch {arch!r}; {detail})"
        ) from err


def _misfit(model: nn.Module, state: dict) -> str:
    """Why a state dict does not load into `model`, in a few names rather than torch's key dump."""
    ours, theirs = set(model.state_dict()), set(state)
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    return (
        f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else "shape mismatch"
    )
