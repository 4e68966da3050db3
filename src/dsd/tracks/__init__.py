"""The three tracks of the paper. Every track module has the same shape, so the trainer needs no branches:

METRIC: str                     primary metric key, as in the paper's table (e.g. "top1_error_pct")
HIGHER_IS_BETTER: bool
DATASETS: dict[str, Callable[[Experiment], dict]]
    dataset name -> prepare(exp): generate the embedded data set under exp.data_dir, or check a real
    one there; returns a small JSON-able summary. Raises DataError (one line naming the file) if bad.
CONFIGS: dict[str, type]        typed hparams of the experiment's "model", "data", "eval" sections
build_model(exp) -> nn.Module
train_loader(exp, seed, epoch, skip_batches=0) -> DataLoader   (built with dsd.data.loader)
eval_loader(exp, split: str) -> DataLoader               split in {"val", "test"}
loss(model, batch, device) -> Tensor                     forward + loss on one training batch
evaluate(model, exp, split, device) -> dict[str, float]  includes METRIC
samples(model, exp, device, n) -> list[dict]             a few test predictions (may return [])
check(exp) -> None                                       before training: raise what evaluation would
                                                         fail on at the end of the first epoch
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dsd.errors import DataError

__all__ = ["TRACKS", "DataError", "get"]

TRACKS = ("vision", "captioning", "speech")


def get(name: str) -> ModuleType:
    if name not in TRACKS:
        raise ValueError(f"unknown track {name!r} (expected one of {', '.join(TRACKS)})")
    return importlib.import_module(f"dsd.tracks.{name}")
