"""Checkpoints: atomic writes, weights-only loads, and errors that name the file and what was expected."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from dsd.errors import CheckpointError

FORMAT = "dsd-checkpoint"


def save(state: dict, path: str | Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """Tensors and plain containers only (weights_only=True): a checkpoint that needs pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused, it needs pickled code to load ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt? {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a DSD checkpoint (no '{FORMAT}' marker)")
    return state


def load_model(model: nn.Module, state: dict, path: str | Path) -> None:
    """Strict load; a checkpoint of another architecture is named as such instead of a key dump."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        ours, theirs = set(model.state_dict()), set(state.get("model", {}))
        missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
        detail = (
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            if missing or unexpected
            else "shape mismatch"
        )
        arch = state.get("arch", "unknown")
        raise CheckpointError(
            f"{path}: checkpoint is for a different model (saved arch {arch!r}; {detail})"
        ) from err
