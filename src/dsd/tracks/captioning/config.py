"""Captioning track settings: NeuralTalk (a frozen CNN's image features + an LSTM), BLEU-1..4.

Plain Python (no torch): read when a config is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dsd.errors import ConfigError
from dsd.hparams import option

METRIC = "bleu4"
HIGHER_IS_BETTER = True
# the per-epoch validation decodes greedily, evaluation by beam search: named apart in logs and wandb
MONITOR_PREFIX = "greedy_"
FIXED_SHAPES = False  # caption lengths vary per batch
# every folder data set is a Karpathy split file (dataset_<name>.json by default) beside its images
DATASETS = {"scenes": "generated", "flickr8k": "folder", "flickr30k": "folder", "coco": "folder"}
SOURCE_KEYS = ("json", "images", "scenes_seed", "scenes_splits", "scenes_image_size")


def chance_level(model: dict) -> None:
    """BLEU has no fixed chance level: one caption given to every image scores what its n-grams share with the
    references."""
    return None


@dataclass(frozen=True)
class Model:
    embed_dim: int = option(512, "word embedding and image projection width", min=1)
    hidden_dim: int = option(512, "LSTM hidden units", min=1)
    dropout: float = option(0.5, "dropout on the LSTM's inputs and outputs", min=0, lt=1)


@dataclass(frozen=True)
class Data:
    MOVED = {
        "features": "a cache under data_root/cache/<dataset>, named by the encoder and images it encodes"
    }
    json: str | None = option(
        None, "Karpathy split file inside the data folder (default: dataset_<dataset>.json)"
    )
    images: str | None = option(
        None, "image folder inside the data folder (default: the first of the usual names)"
    )
    encoder_weights: str | None = option(
        None,
        "paper scale: a local torchvision VGG-16 state dict (relative: inside the data folder); never downloaded",
    )
    encoder_row: str | None = option(
        None, "embedded scale: the vision row whose dense CNN encodes the images"
    )
    encoder_seed: int = option(0, "the seed of that row's run", min=0)
    image_size: int = option(224, "encoder input: shorter side resized, centre-cropped to this", min=1)
    min_count: int = option(5, "vocabulary: words seen at least this often in the training captions", min=1)
    max_words: int = option(16, "training captions truncated to this many words", min=1)
    scenes_seed: int = option(0, "embedded scenes: generator seed", min=0)
    scenes_splits: tuple[int, int, int] = option(
        (1500, 250, 250), "embedded scenes: train / val / test images", min=1
    )
    scenes_image_size: int = option(64, "embedded scenes: image side in pixels", min=8)


@dataclass(frozen=True)
class Eval:
    batch_size: int = option(256, "images decoded at once", min=1)
    beam_size: int = option(3, "beam search width (1: greedy)", min=1)
    max_len: int = option(16, "longest caption decoded, in words", min=1)


def check(row, where: str) -> None:
    data = row.data
    if data.encoder_row and data.encoder_weights:
        raise ConfigError(
            f"{where}.data: give encoder_row (a trained vision row) or encoder_weights, not both"
        )
    if not data.encoder_row and not data.encoder_weights:
        raise ConfigError(
            f"{where}.data: needs an image encoder: encoder_row (embedded) or encoder_weights (paper)"
        )


def check_config(row, config, where: str) -> None:
    """The encoder row must be a vision row of the same config."""
    name = row.data.encoder_row
    if name is None:
        return
    encoder = config.experiments.get(name)
    if encoder is None or encoder.track != "vision":
        vision = [n for n, r in config.experiments.items() if r.track == "vision"]
        raise ConfigError(
            f"{where}.data.encoder_row: {name!r} is not a vision row (have: {', '.join(vision)})"
        )


def encoder_weights(row_or_exp) -> str | None:
    """`data.encoder_weights` as a path: a relative one is inside the data folder."""
    weights = row_or_exp.data.encoder_weights
    if weights is None or os.path.isabs(weights):
        return weights
    return os.path.join(row_or_exp.data_dir, weights)


def features_path(exp) -> Path:
    """The features cache for this data set, encoder and image size (its name changes with any of them)."""
    from dsd.spec import fingerprint

    key = {
        "data": exp.data_spec().fingerprint,
        "encoder": exp.upstream.get("encoder"),
        "image_size": exp.data.image_size,
    }
    return exp.cache_dir / f"features-{fingerprint(key)}.pt"


def content_inputs(exp) -> dict:
    """Files a phase reads whose content no spec holds (dsd.engine.trainer.input_digests): the image features,
    named by their encoder's spec (a dense run retrained under it encodes them again under the same name), and
    the encoder weights file they may come from, named by its path."""
    return {"data.encoder_weights": encoder_weights(exp), "the image features": str(features_path(exp))}


def eval_inputs(exp) -> list[str]:
    """Files an evaluation reads whose content no eval setting holds: none."""
    return []


def upstream(row) -> dict:
    """What the captions' features come from: a vision row's dense run, or a weights file."""
    data = row.data
    if data.encoder_row:
        return {"encoder": (data.encoder_row, data.encoder_seed, "dense")}
    return {"encoder": f"weights:{data.encoder_weights}"}
