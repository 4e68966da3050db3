"""Speech track settings: Deep Speech 1 and 2 style CTC models on LibriSpeech-layout corpora; WER / CER.

Plain Python (no torch): read when a config is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from dsd.errors import ConfigError
from dsd.hparams import option

METRIC = "wer_pct"
HIGHER_IS_BETTER = False
# the per-epoch validation decodes greedily, evaluation with the configured decoder: named apart in logs and wandb
MONITOR_PREFIX = "greedy_"
FIXED_SHAPES = False  # utterance lengths vary per batch
# every folder data set reads LibriSpeech folders, JSON-lines manifests or WSJ index files per split;
# `manifests` names a corpus of your own
DATASETS = {"spoken": "generated", "librispeech": "folder", "wsj": "folder", "manifests": "folder"}
# What preparing the corpus reads and writes: its splits (or how it is synthesised) and the features it caches.
# Rows sharing a corpus therefore share feature settings.
SOURCE_KEYS = (
    "train", "val", "test", "feature", "n_mels", "max_seconds",
    "corpus_seed", "vocabulary", "utterances_per_speaker", "snr_db", "rate",
)  # fmt: skip


def chance_level(model: dict) -> float:
    """METRIC of a model that has learned nothing: a CTC model stuck on blanks transcribes nothing, and deleting
    every reference word is a WER of 100%."""
    return 100.0


@dataclass(frozen=True)
class Model:
    arch: Literal["deepspeech", "deepspeech2"] = option("deepspeech", "Deep Speech 1 or 2")
    hidden: int = option(256, "fully connected width (Deep Speech 1)", min=1)
    rnn_hidden: int = option(
        128, "recurrent units per direction (directions are summed, as in both papers)", min=1
    )
    rnn_type: Literal["gru", "lstm", "rnn"] = option("gru", "rnn: Deep Speech 1's plain ReLU recurrence")
    rnn_layers: int = option(3, "recurrent layers (Deep Speech 2)", min=1)
    context: int = option(5, "Deep Speech 1: frames each side stacked into one input", min=0)
    stride: int = option(2, "time stride (Deep Speech 1's windows, Deep Speech 2's first conv)", min=1)
    conv_channels: int = option(16, "Deep Speech 2: channels of each conv layer", min=1)
    conv_kernels: tuple[tuple[int, int], ...] = option(
        ((11, 11), (11, 7)), "Deep Speech 2: (frequency, time) kernel per conv layer", nonempty=True
    )
    dropout: float = option(0.0, "dropout between layers", min=0, lt=1)
    relu_clip: float = option(20.0, "clipped-ReLU ceiling", gt=0)


@dataclass(frozen=True)
class Data:
    feature: Literal["logmel", "logspec"] = option("logmel", "logspec: 161 linear bins of a 20 ms window")
    n_mels: int = option(40, "logmel bins", min=1)
    train: str | tuple[str, ...] = option(
        "train",
        "LibriSpeech subset folder(s), JSON-lines manifest(s), or WSJ index files (.ndx), in the data folder",
    )
    val: str | tuple[str, ...] = option("dev", "validation split (per-epoch monitor, sweep choice)")
    test: str | tuple[str, ...] = option("test", "test split")
    sortagrad: bool | None = option(
        None, "the first epoch of training (the dense phase's) shortest first; default: on for deepspeech2"
    )
    length_buckets: int = option(
        50,
        "other epochs: batches of similar lengths from windows of this many batches (0: plain shuffle)",
        min=0,
    )
    max_seconds: float | None = option(None, "drop longer training utterances (memory on real data)", gt=0)
    corpus_seed: int = option(1234, "embedded corpus: generator seed", min=0)
    vocabulary: int = option(200, "embedded corpus: words used", min=1)
    utterances_per_speaker: dict[str, int] = option(
        factory=lambda: {"train": 120, "dev": 25, "test": 25},
        help="embedded corpus: utterances per voice and split",
    )
    snr_db: tuple[float, float] = option((20.0, 35.0), "embedded corpus: noise level range")
    rate: tuple[int, int] = option((130, 180), "embedded corpus: speaking rate range, words per minute")


@dataclass(frozen=True)
class Eval:
    batch_size: int = option(256, "utterances decoded at once", min=1)
    decoder: Literal["greedy", "beam"] = option(
        "greedy", "greedy: best path; beam: lexicon beam search (flashlight)"
    )
    beam_size: int = option(50, "beam width", min=1)
    lexicon: str | None = option(
        None, "flashlight lexicon (relative: inside the data folder); needed by beam"
    )
    lm: str | None = option(None, "KenLM file for the beam search (relative: inside the data folder)")
    lm_weight: float = option(2.0, "language model weight")
    word_score: float = option(0.0, "word insertion score")


def check(row, where: str) -> None:
    if row.eval.decoder == "beam" and row.eval.lexicon is None:
        raise ConfigError(
            f"{where}.eval.lexicon: required by decoder 'beam' (without it no word is ever emitted)"
        )
    if row.dataset == "spoken":
        missing = [s for s in ("train", "dev", "test") if s not in row.data.utterances_per_speaker]
        if missing:
            raise ConfigError(f"{where}.data.utterances_per_speaker: missing split {missing[0]!r}")


def check_config(row, config, where: str) -> None:
    pass


def upstream(row) -> dict:
    return {}


def content_inputs(exp) -> dict:
    """Files a phase reads whose content no spec holds (dsd.engine.trainer.input_digests): none, the features
    cache is named by the corpus' content."""
    return {}


def eval_inputs(exp) -> list[str]:
    """Files an evaluation reads whose content no eval setting holds: a beam search's lexicon and language
    model (relative: inside the data folder). A newer one reruns the evaluations (Snakemake, dsd run)."""
    if exp.eval.decoder != "beam":
        return []
    return [os.path.join(exp.data_dir, name) for name in (exp.eval.lexicon, exp.eval.lm) if name]


def n_features(data: Data) -> int:
    return data.n_mels if data.feature == "logmel" else 161
