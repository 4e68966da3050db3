"""Speech data: LibriSpeech-layout folders and JSON-lines manifests, checked transcripts, log spectra cached
once per split, SortaGrad, and the embedded corpus (synthesised with eSpeak NG, LibriSpeech layout).

A split's features are cached in a file named by the corpus' content fingerprint and the feature settings,
so features computed from another corpus or with other settings are never read as this one's.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dsd.engine import loaders
from dsd.engine import prepare as prepared
from dsd.errors import DataError
from dsd.spec import Experiment, fingerprint
from dsd.tracks.speech import synthetic
from dsd.tracks.speech.config import Data, n_features

BLANK = "_"
ALPHABET = BLANK + " '" + "abcdefghijklmnopqrstuvwxyz"  # index 0 is the CTC blank
CHAR_INDEX = {c: i for i, c in enumerate(ALPHABET)}
SAMPLE_RATE = 16_000
SPLITS = ("train", "val", "test")
LEXICON = "lexicon.txt"  # written beside the embedded corpus by prepare
FEATURES_FORMAT = "dsd-speech-features"


def encode(text: str, where: str) -> list[int]:
    """Character ids of a lower-cased transcript; a character outside the alphabet is a DataError."""
    text = " ".join(text.lower().split())
    if not text:
        raise DataError(f"{where}: empty transcript")
    for ch in text:
        if ch not in CHAR_INDEX or ch == BLANK:
            raise DataError(f"{where}: transcript has character {ch!r} outside the alphabet a-z, space, '")
    return [CHAR_INDEX[ch] for ch in text]


def load_audio(path: str | Path) -> torch.Tensor:
    """Mono float waveform at 16 kHz; a missing, unreadable or empty file is a DataError naming it."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file is missing")
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises its own error types for corrupt or unknown formats
        raise DataError(f"{path}: unreadable audio file ({err})") from None
    if wav.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    wav = torch.from_numpy(wav.mean(axis=1))
    if rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        wav = AF.resample(wav, rate, SAMPLE_RATE)
    return wav


def read_librispeech(folder: str | Path) -> list[dict]:
    """Utterances of a LibriSpeech-layout folder: <spk>/<chapter>/<spk>-<chapter>-<utt>.flac + .trans.txt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: LibriSpeech folder is missing")
    transcripts = sorted(folder.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise DataError(f"{folder}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files")
    items = []
    for trans in transcripts:
        for n, line in enumerate(trans.read_text().splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            encode(text, f"{trans}:{n} ({uid})")
            items.append({"id": uid, "audio": str(trans.parent / f"{uid}.flac"), "transcript": text.lower()})
    return items


def read_manifest(path: str | Path) -> list[dict]:
    """JSON lines {"audio": path (relative to the manifest), "transcript": text, "duration": seconds}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest is missing")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio, text = entry["audio"], entry["transcript"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{n}: expected JSON with 'audio' and 'transcript' ({err})") from None
        uid = str(entry.get("id", Path(audio).stem))
        encode(text, f"{path}:{n} ({uid})")
        items.append({"id": uid, "audio": str(path.parent / audio), "transcript": text.lower()})
    return items


@functools.cache
def _transform(feature: str, n_mels: int):
    import torchaudio.transforms as T

    window = dict(n_fft=320, win_length=320, hop_length=160)  # 20 ms window, 10 ms hop at 16 kHz
    if feature == "logmel":
        return T.MelSpectrogram(sample_rate=SAMPLE_RATE, n_mels=n_mels, **window)
    return T.Spectrogram(**window)


def features(wav: torch.Tensor, data: Data) -> torch.Tensor:
    """(frames, bins) log spectrum, mean/variance normalised per utterance and per bin."""
    with torch.no_grad():
        spec = torch.log(_transform(data.feature, data.n_mels)(wav) + 1e-6).T
        return (spec - spec.mean(0)) / (spec.std(0) + 1e-5)


def _sources(exp: Experiment, split: str) -> list[dict]:
    names = getattr(exp.data, split)
    items = []
    for name in [names] if isinstance(names, str) else names:
        path = Path(exp.data_dir) / name
        items += read_manifest(path) if path.suffix in (".jsonl", ".json") else read_librispeech(path)
    return items


def _cache_file(exp: Experiment, split: str, data_fingerprint: str) -> Path:
    """Beside generated data, under data_root for real data (a user's corpus is never written)."""
    data = exp.data
    key = {
        "data": data_fingerprint,
        "split": getattr(data, split),
        "feature": data.feature,
        "bins": n_features(data),
        "max_seconds": data.max_seconds if split == "train" else None,
    }
    return exp.cache_dir / "features" / f"{split}-{fingerprint(key)}.pt"


def build_features(exp: Experiment, split: str, out: Path) -> Path:
    """Read, check and featurise one split once; phases re-read the cached tensor file many times."""
    data = exp.data
    feats, lengths, ids, texts = [], [], [], []
    for item in _sources(exp, split):
        wav = load_audio(item["audio"])
        if split == "train" and data.max_seconds and len(wav) > data.max_seconds * SAMPLE_RATE:
            continue
        feats.append(features(wav, data))
        lengths.append(feats[-1].shape[0])
        ids.append(item["id"])
        texts.append(" ".join(item["transcript"].split()))
    if not feats:
        raise DataError(f"{exp.data_dir}: split {split!r} has no utterances")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # parallel phases may build the same split
    blob = {"format": FEATURES_FORMAT, "feats": torch.cat(feats), "lengths": torch.tensor(lengths)}
    torch.save(blob | {"ids": ids, "texts": texts}, tmp)
    tmp.replace(out)
    return out


class SpeechSet(Dataset):
    """Cached features of one split: item i -> (features (T, F), character ids, id, transcript)."""

    def __init__(self, path: Path):
        blob = torch.load(path, weights_only=True)
        if blob.get("format") != FEATURES_FORMAT:
            raise DataError(f"{path}: not a features cache of this version (delete it)")
        self.lengths = blob["lengths"]
        self.feats = list(torch.split(blob["feats"], self.lengths.tolist()))
        self.ids, self.texts = blob["ids"], blob["texts"]
        self.targets = [
            torch.tensor(encode(t, f"{path} ({u})")) for u, t in zip(self.ids, self.texts, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int):
        return self.feats[i], self.targets[i], self.ids[i], self.texts[i]


def collate(batch):
    feats, targets, ids, texts = zip(*batch, strict=True)
    lengths = torch.tensor([f.shape[0] for f in feats])
    padded = nn.utils.rnn.pad_sequence(list(feats), batch_first=True)
    return {
        "features": padded,
        "lengths": lengths,
        "targets": torch.cat(targets),
        "target_lengths": torch.tensor([len(t) for t in targets]),
        "ids": list(ids),
        "texts": list(texts),
    }


@functools.cache
def _dataset_at(path: str) -> SpeechSet:
    return SpeechSet(Path(path))


def dataset(exp: Experiment, split: str, data_fingerprint: str | None = None) -> SpeechSet:
    """The split's cached features, built on first use (another row's feature settings, say)."""
    path = _cache_file(exp, split, data_fingerprint or prepared.data_fingerprint(exp))
    if not path.is_file():
        build_features(exp, split, path)
    return _dataset_at(str(path))


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0):
    """SortaGrad: epoch 0 of a phase goes shortest utterance first; later epochs are shuffled."""
    ds, cfg = dataset(exp, "train"), exp.data
    sortagrad = cfg.sortagrad if cfg.sortagrad is not None else exp.model.arch == "deepspeech2"
    order = torch.argsort(ds.lengths, stable=True).tolist() if sortagrad and epoch == 0 else None
    return loaders.loader(
        ds,
        exp.train.batch_size,
        train=True,
        seed=seed,
        epoch=epoch,
        collate_fn=collate,
        workers=exp.options.workers,
        order=order,
        skip_batches=skip_batches,
    )


def eval_loader(exp: Experiment, split: str, batch_size: int):
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return loaders.loader(
        dataset(exp, split), batch_size, train=False, collate_fn=collate, workers=exp.options.workers
    )


def write_lexicon(transcripts, path: str | Path) -> int:
    """Flashlight lexicon, one sorted line per distinct word: `word<TAB>w o r d |` ("|" ends a word).

    Written to a temporary file and renamed, so a reader never sees half a lexicon. Returns the word count.
    """
    words = sorted({w for text in transcripts for w in text.split()})
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in words))
    tmp.replace(path)
    return len(words)


def sources(exp: Experiment) -> list[Path]:
    """What the corpus is read from: the split folders or manifests."""
    out = []
    for split in SPLITS:
        names = getattr(exp.data, split)
        out += [Path(exp.data_dir) / n for n in ([names] if isinstance(names, str) else names)]
    return out


def prepare(exp: Experiment, data_fingerprint: str) -> dict:
    """Synthesise the embedded corpus (once per its settings) and write the lexicon of its training words (the
    embedded beam decoder's vocabulary); for every corpus, check each utterance and cache the features."""
    summary = {"dataset": exp.dataset}
    if exp.generated:
        summary["lexicon_words"] = _synthesise(exp)
    for split in SPLITS:
        ds = dataset(exp, split, data_fingerprint)
        summary[split] = {"utterances": len(ds), "hours": round(float(ds.lengths.sum()) / 100 / 3600, 4)}
    return summary


def _synthesise(exp: Experiment) -> int:
    data = exp.data
    spec = synthetic.CorpusSpec(
        seed=data.corpus_seed,
        vocabulary=data.vocabulary,
        utterances_per_speaker=dict(data.utterances_per_speaker),
        snr_db=tuple(data.snr_db),
        rate=tuple(data.rate),
    )
    root, stamp = Path(exp.data_dir), Path(exp.data_dir) / "corpus.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    fresh = stamp.is_file() and stamp.read_text() == wanted
    if not fresh:
        stamp.unlink(missing_ok=True)  # an interrupted rewrite must not pass for a finished one
        for old in [*root.glob("features/*.pt"), root / LEXICON]:
            old.unlink(missing_ok=True)
        synthetic.write_corpus(root, spec)
    # rewritten every time (it is cheap), so it always matches the training transcripts
    words = write_lexicon([item["transcript"] for item in _sources(exp, "train")], root / LEXICON)
    if not fresh:
        stamp.write_text(wanted)  # last: the corpus and its lexicon are complete
        _dataset_at.cache_clear()
    return words
