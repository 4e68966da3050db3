"""The paper's three tracks, one subpackage each, with the same files:

    config.py     typed model / data / eval sections, METRIC, HIGHER_IS_BETTER, MONITOR_PREFIX (of the
                  per-epoch validation's names in logs and wandb), FIXED_SHAPES, DATASETS,
                  chance_level(model section) (plain Python)
    model.py      build(exp, pretrained=True) -> nn.Module (pretrained=False: no pretrained weights read,
                  for a checkpoint to load); meta_model(model section): the model on the meta device
    data.py       prepare(exp), sources(exp), train_loader(exp, seed, epoch, skip_batches), eval_loader(exp, split)
    metric.py     loss(model, batch, device); evaluate(model, exp, split, device, samples) -> (metrics, samples);
                  monitor(model, exp, device) -> the per-epoch validation metrics; check(exp)
    synthetic.py  the embedded data set, generated from a seed

`get(name).config` imports no torch; the other modules load on first use, so the config path stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from dsd.errors import ConfigError

NAMES = ("vision", "captioning", "speech")


class Track:
    """One track's modules, each imported when first used."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, module: str) -> ModuleType:
        if module not in ("config", "model", "data", "metric", "synthetic"):
            raise AttributeError(module)
        loaded = importlib.import_module(f"dsd.tracks.{self.name}.{module}")
        setattr(self, module, loaded)
        return loaded


_TRACKS: dict[str, Track] = {}


def get(name: str) -> Track:
    if name not in NAMES:
        raise ConfigError(f"unknown track {name!r} (expected one of {', '.join(NAMES)})")
    return _TRACKS.setdefault(name, Track(name))


# ------------------------------------------------------------------ parameter names, for config checks


def cache_dir() -> Path:
    """Per-user cache: $DSD_CACHE_DIR, else $XDG_CACHE_HOME/dsd, else ~/.cache/dsd."""
    explicit = os.environ.get("DSD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsd"


def _code_stamp(track: str) -> str:
    """Changes with the track's model code and with the packages that build the models (torchvision, timm:
    an install or upgrade changes its site-packages folder), so cached parameter names never outlive them."""
    import hashlib
    import site

    stamp = hashlib.sha256(f"{sys.executable}\0{sys.prefix}".encode())
    for source in (
        Path(__file__).parent / track / "model.py",
        Path(__file__).parents[1] / "core" / "masks.py",
    ):
        st = source.stat()
        stamp.update(f"{source}:{st.st_mtime_ns}:{st.st_size}".encode())
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            stamp.update(f"{folder}:{os.stat(folder).st_mtime_ns}".encode())
    return stamp.hexdigest()[:20]


def parameter_names(requests) -> dict[tuple[str, str], dict]:
    """(track, model section) -> {"names": [...], "aliases": {...}} or {"error": why the model cannot be
    built}, keyed by (track, section fingerprint).

    Building a model needs torch, which the config path does not import: names come from a per-user cache,
    and the missing ones from one `python -m dsd.tracks.names` that builds the models on the meta device (no
    memory, no weights). Where torch cannot be imported, the names are missing and the check is skipped.
    """
    from dsd import hparams
    from dsd.spec import fingerprint

    out, todo = {}, []
    for track, model in requests:
        section = hparams.as_dict(model)
        key = (track, fingerprint(section))
        path = cache_dir() / "model-names" / f"{track}-{_code_stamp(track)}-{key[1]}.json"
        if key in out:
            continue
        cached = json.loads(path.read_text()) if path.is_file() else {"error": None}
        if "error" not in cached:  # an error is found again each time: an install may have cured it (timm)
            out[key] = cached
        else:
            todo.append((key, {"track": track, "model": section, "path": str(path)}))
    if todo:
        done = subprocess.run(
            [sys.executable, "-m", "dsd.tracks.names"],
            input=json.dumps([request for _, request in todo]),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"dsd: warning: prune patterns not checked here ({reason})", file=sys.stderr)
        for key, request in todo:
            path = Path(request["path"])
            if path.is_file():
                out[key] = json.loads(path.read_text())
    return out
