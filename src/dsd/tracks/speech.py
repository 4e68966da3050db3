"""Speech track: DeepSpeech 1 and DeepSpeech 2 style CTC models, scored by WER (the paper's Table 1 rows).

Layout of this file: model, data, loss, metric. Parameter names are chosen so that "prune only fully
connected and recurrent weights, never convolutions" is a Pruner include/exclude pattern pair:

    include: ["fc*.weight", "rnn*.weight_ih_l*", "rnn*.weight_hh_l*", "out.weight"]
    exclude: ["conv.*"]

Convolutions live under `conv.*`, fully connected layers under `fc*` and `out`, recurrent layers under `rnn*`
(batch-norm parameters are 1-D and never pruned).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import Dataset

from dsd.config import ConfigError, Experiment, parse_dataclass
from dsd.data import loader
from dsd.tracks import DataError

METRIC = "wer_pct"
HIGHER_IS_BETTER = False

BLANK = "_"
ALPHABET = BLANK + " '" + "abcdefghijklmnopqrstuvwxyz"  # index 0 is the CTC blank
CHAR_INDEX = {c: i for i, c in enumerate(ALPHABET)}
SAMPLE_RATE = 16_000
PRUNE_INCLUDE = ("fc*.weight", "rnn*.weight_ih_l*", "rnn*.weight_hh_l*", "out.weight")
PRUNE_EXCLUDE = ("conv.*",)
SPLITS = ("train", "val", "test")
LEXICON = "lexicon.txt"  # written beside the embedded corpus by prepare_spoken


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "deepspeech"  # deepspeech | deepspeech2
    hidden: int = 256  # fully connected width (DeepSpeech 1)
    rnn_hidden: int = 128  # per direction; the two directions are summed, as in both papers
    rnn_type: str = "gru"  # gru | lstm | rnn (DeepSpeech 1's single recurrent layer)
    rnn_layers: int = 3  # DeepSpeech 2 stack depth
    context: int = 5  # DeepSpeech 1: frames each side stacked into one input
    stride: int = 2  # time stride: DeepSpeech 1 keeps every stride-th window, DeepSpeech 2's first conv
    conv_channels: int = 16  # DeepSpeech 2
    conv_kernels: tuple = ((11, 11), (11, 7))  # (frequency, time) per conv layer
    dropout: float = 0.0
    relu_clip: float = 20.0


@dataclass(frozen=True)
class DataConfig:
    feature: str = "logmel"  # logmel | logspec (161 linear bins of a 20 ms window)
    n_mels: int = 40
    # each split: LibriSpeech subset folder(s) or JSON-lines manifest(s), relative to the data set folder
    train: str | list = "train"
    val: str | list = "dev"
    test: str | list = "test"
    sortagrad: bool | None = None  # first epoch of a phase sorted by length; default: on for deepspeech2
    max_seconds: float | None = None  # drop longer training utterances (memory on real data)
    # embedded corpus (dataset "spoken") only
    corpus_seed: int = 1234
    vocabulary: int = 200
    utterances_per_speaker: dict = field(default_factory=lambda: {"train": 120, "dev": 25, "test": 25})
    snr_db: tuple = (20.0, 35.0)
    rate: tuple = (130, 180)


@dataclass(frozen=True)
class EvalConfig:
    decoder: str = "greedy"  # greedy | beam (torchaudio's flashlight ctc_decoder)
    beam_size: int = 50
    lexicon: str | None = None  # flashlight lexicon; relative paths (here and lm): inside the data folder
    lm: str | None = None  # KenLM file
    lm_weight: float = 2.0
    word_score: float = 0.0


CONFIGS = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}  # checked by Experiment.from_config


def model_config(exp: Experiment) -> ModelConfig:
    cfg = parse_dataclass(ModelConfig, exp.model, f"config.experiments.{exp.row}.model")
    if cfg.arch not in ("deepspeech", "deepspeech2"):
        raise ConfigError(f"config.experiments.{exp.row}.model.arch: expected deepspeech or deepspeech2")
    if cfg.rnn_type not in ("gru", "lstm", "rnn"):
        raise ConfigError(f"config.experiments.{exp.row}.model.rnn_type: expected gru, lstm or rnn")
    return cfg


def data_config(exp: Experiment) -> DataConfig:
    cfg = parse_dataclass(DataConfig, exp.data, f"config.experiments.{exp.row}.data")
    if cfg.feature not in ("logmel", "logspec"):
        raise ConfigError(f"config.experiments.{exp.row}.data.feature: expected logmel or logspec")
    return cfg


def eval_config(exp: Experiment) -> EvalConfig:
    cfg = parse_dataclass(EvalConfig, exp.eval, f"config.experiments.{exp.row}.eval")
    if cfg.decoder not in ("greedy", "beam"):
        raise ConfigError(f"config.experiments.{exp.row}.eval.decoder: expected greedy or beam")
    return cfg


def n_features(data: DataConfig) -> int:
    return data.n_mels if data.feature == "logmel" else 161


# ------------------------------------------------------------------------------------------------ model


def _rnn(kind: str, n_in: int, hidden: int) -> nn.RNNBase:
    if kind == "rnn":  # DeepSpeech 1's plain recurrence, with a ReLU as in the paper (unclipped here)
        return nn.RNN(n_in, hidden, nonlinearity="relu", batch_first=True, bidirectional=True)
    cls = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
    return cls(n_in, hidden, batch_first=True, bidirectional=True)


def _bidirectional(rnn: nn.RNNBase, packed) -> torch.nn.utils.rnn.PackedSequence:
    """Run a bidirectional layer on a packed batch and sum the directions (both DeepSpeech papers do)."""
    out, _ = rnn(packed)
    half = out.data.shape[-1] // 2
    return out._replace(data=out.data[:, :half] + out.data[:, half:])


class DeepSpeech(nn.Module):
    """DeepSpeech 1: context window -> 3 FC (clipped ReLU) -> 1 bidirectional RNN -> FC -> characters."""

    def __init__(self, n_in: int, cfg: ModelConfig, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.context, self.stride, self.clip = cfg.context, cfg.stride, cfg.relu_clip
        width = n_in * (2 * cfg.context + 1)
        self.fc = nn.ModuleList([nn.Linear(width, cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden)])
        self.fc.append(nn.Linear(cfg.hidden, cfg.rnn_hidden))
        self.rnn = _rnn(cfg.rnn_type, cfg.rnn_hidden, cfg.rnn_hidden)
        self.fc4 = nn.Linear(cfg.rnn_hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, n_classes)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F) -> log-probabilities (B, T', classes) and output lengths T'."""
        c = self.context
        x = F.pad(x, (0, 0, c, c)).unfold(1, 2 * c + 1, self.stride).flatten(2)  # (B, T', F*(2c+1))
        lengths = torch.div(lengths - 1, self.stride, rounding_mode="floor") + 1
        for layer in self.fc:
            x = self.dropout(F.hardtanh(layer(x), 0.0, self.clip))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        x, _ = pad_packed_sequence(
            _bidirectional(self.rnn, packed), batch_first=True, total_length=x.shape[1]
        )
        x = self.dropout(F.hardtanh(self.fc4(x), 0.0, self.clip))
        return self.out(x).log_softmax(-1), lengths


class DeepSpeech2(nn.Module):
    """DeepSpeech 2: 2-D convs + BN over the spectrogram -> bidirectional GRUs with sequence-wise BN -> FC."""

    def __init__(self, n_in: int, cfg: ModelConfig, n_classes: int = len(ALPHABET)):
        super().__init__()
        self.clip = cfg.relu_clip
        layers, channels, freq = [], 1, n_in
        self.time_geometry = []  # (kernel, stride) in time, for the output lengths
        for i, (kf, kt) in enumerate(cfg.conv_kernels):
            stride = (2, cfg.stride) if i == 0 else (2, 1)  # time is strided once, in the first conv
            self.time_geometry.append((kt, stride[1]))
            layers += [
                nn.Conv2d(channels, cfg.conv_channels, (kf, kt), stride, (kf // 2, kt // 2), bias=False),
                nn.BatchNorm2d(cfg.conv_channels),
                nn.Hardtanh(0.0, cfg.relu_clip),
            ]
            channels, freq = cfg.conv_channels, (freq + 2 * (kf // 2) - kf) // 2 + 1
        self.conv = nn.Sequential(*layers)
        sizes = [channels * freq] + [cfg.rnn_hidden] * cfg.rnn_layers
        self.rnn = nn.ModuleList(_rnn(cfg.rnn_type, sizes[i], cfg.rnn_hidden) for i in range(cfg.rnn_layers))
        # sequence-wise BN: statistics over every (utterance, frame) of the batch, padding excluded
        self.rnn_bn = nn.ModuleList(nn.BatchNorm1d(cfg.rnn_hidden) for _ in range(cfg.rnn_layers - 1))
        self.out = nn.Linear(cfg.rnn_hidden, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.transpose(1, 2).unsqueeze(1))  # (B, C, F', T')
        x = x.flatten(1, 2).transpose(1, 2)  # (B, T', C*F')
        for kt, st in self.time_geometry:
            lengths = torch.div(lengths + 2 * (kt // 2) - kt, st, rounding_mode="floor") + 1
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        for i, rnn in enumerate(self.rnn):
            if i > 0:
                packed = packed._replace(data=self.rnn_bn[i - 1](packed.data))
            packed = _bidirectional(rnn, packed)
        x, _ = pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])
        return self.out(x).log_softmax(-1), lengths


def build_model(exp: Experiment) -> nn.Module:
    cfg, data = model_config(exp), data_config(exp)
    cls = DeepSpeech if cfg.arch == "deepspeech" else DeepSpeech2
    return cls(n_features(data), cfg)


# ------------------------------------------------------------------------------------------------- data


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


def features(wav: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """(frames, bins) log spectrum, mean/variance normalised per utterance and per bin."""
    with torch.no_grad():
        spec = torch.log(_transform(data.feature, data.n_mels)(wav) + 1e-6).T
        return (spec - spec.mean(0)) / (spec.std(0) + 1e-5)


def _sources(exp: Experiment, split: str) -> list[dict]:
    data = data_config(exp)
    names = getattr(data, split)
    items = []
    for name in [names] if isinstance(names, str) else names:
        path = Path(exp.data_dir) / name
        items += read_manifest(path) if path.suffix in (".jsonl", ".json") else read_librispeech(path)
    return items


def _cache_file(exp: Experiment, split: str) -> Path:
    """Embedded data: beside the corpus. Real data: under data_root, so the user's corpus is never written."""
    data = data_config(exp)
    base = Path(exp.data_dir) if exp.dataset == "spoken" else Path(exp.data_root) / "cache" / exp.dataset
    names = getattr(data, split)
    tag = "+".join([names] if isinstance(names, str) else names).replace("/", "_")
    return base / "features" / f"{split}-{tag}-{data.feature}{n_features(data)}.pt"


def build_features(exp: Experiment, split: str) -> Path:
    """Read, check and featurise one split once; phases re-read the cached tensor file many times."""
    data, out = data_config(exp), _cache_file(exp, split)
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
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # parallel phases may build the same split
    torch.save({"feats": torch.cat(feats), "lengths": torch.tensor(lengths), "ids": ids, "texts": texts}, tmp)
    tmp.replace(out)
    return out


class SpeechSet(Dataset):
    """Cached features of one split: item i -> (features (T, F), character ids, id, transcript)."""

    def __init__(self, path: Path):
        blob = torch.load(path, weights_only=True)
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


def dataset(exp: Experiment, split: str) -> SpeechSet:
    """The cached split (built on first use if `prepare` has not run yet)."""
    path = _cache_file(exp, split)
    if not path.is_file():
        build_features(exp, split)
    return _dataset_at(str(path))


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0):
    """SortaGrad: epoch 0 of a phase goes shortest utterance first; later epochs are shuffled."""
    ds, cfg = dataset(exp, "train"), data_config(exp)
    sortagrad = cfg.sortagrad if cfg.sortagrad is not None else model_config(exp).arch == "deepspeech2"
    order = torch.argsort(ds.lengths, stable=True).tolist() if sortagrad and epoch == 0 else None
    return loader(
        ds,
        exp.train.batch_size,
        train=True,
        seed=seed,
        epoch=epoch,
        collate_fn=collate,
        workers=exp.train.workers,
        order=order,
        skip_batches=skip_batches,
    )


def eval_loader(exp: Experiment, split: str):
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return loader(
        dataset(exp, split),
        exp.train.eval_batch_size,
        train=False,
        collate_fn=collate,
        workers=exp.train.workers,
    )


def _prepare(exp: Experiment) -> dict:
    summary = {}
    for split in SPLITS:
        ds = dataset(exp, split)
        summary[split] = {"utterances": len(ds), "hours": round(float(ds.lengths.sum()) / 100 / 3600, 4)}
    return summary


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


def prepare_spoken(exp: Experiment) -> dict:
    """Synthesise the embedded corpus under exp.data_dir (once per spec), then write the lexicon of its
    training words (the default beam decoder's vocabulary) and cache its features."""
    from dsd import spoken

    data = data_config(exp)
    spec = spoken.CorpusSpec(
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
        spoken.write_corpus(root, spec)
    # rewritten every time (it is cheap), so it always matches the training transcripts
    words = write_lexicon([item["transcript"] for item in _sources(exp, "train")], root / LEXICON)
    if not fresh:
        stamp.write_text(wanted)  # last: the corpus and its lexicon are complete
        _dataset_at.cache_clear()
    return {"dataset": "spoken", "lexicon_words": words, **_prepare(exp)}


def prepare_librispeech(exp: Experiment) -> dict:
    """Check the real corpus (LibriSpeech folders or manifests) and cache its features under data_root."""
    return {"dataset": exp.dataset, **_prepare(exp)}


DATASETS = {"spoken": prepare_spoken, "librispeech": prepare_librispeech}


# ------------------------------------------------------------------------------------------------- loss


def loss(model: nn.Module, batch: dict, device) -> torch.Tensor:
    """CTC (blank = 0), averaged over utterances after dividing by target length (torch's 'mean')."""
    log_probs, out_lengths = model(batch["features"].to(device), batch["lengths"].to(device))
    return F.ctc_loss(
        log_probs.float().transpose(0, 1),
        batch["targets"].to(device),
        out_lengths,
        batch["target_lengths"].to(device),
        blank=0,
        zero_infinity=True,
    )


# ----------------------------------------------------------------------------------------------- metric


def greedy_decode(ids) -> str:
    """Best path: collapse repeated symbols, then drop blanks (so "_hh_e_ll_l_oo" -> "hello")."""
    chars, previous = [], None
    for i in (int(x) for x in ids):
        if i != previous and i != 0:
            chars.append(ALPHABET[i])
        previous = i
    return " ".join("".join(chars).split())


def eval_file(exp: Experiment, key: str) -> Path | None:
    """eval.lexicon or eval.lm as a file; a relative path is inside the data set folder, where prepare writes
    the embedded corpus' lexicon.txt. A missing file is a DataError naming it."""
    value = getattr(eval_config(exp), key)
    if value is None:
        return None
    path = Path(value)
    path = path if path.is_absolute() else Path(exp.data_dir) / path
    if not path.is_file():
        raise DataError(f"{path}: {key} file is missing (config.experiments.{exp.row}.eval.{key})")
    return path


def _ctc_decoder():
    try:
        from torchaudio.models.decoder import ctc_decoder
    except (ImportError, RuntimeError) as err:  # torchaudio reports a missing flashlight-text as RuntimeError
        raise ConfigError(
            f"eval.decoder 'beam' needs flashlight-text (pip install flashlight-text): {err}"
        ) from None
    return ctc_decoder


def check(exp: Experiment) -> None:
    """The beam decoder's files and package, before an epoch of training is spent finding out."""
    if eval_config(exp).decoder == "beam":
        for key in ("lexicon", "lm"):
            eval_file(exp, key)
        _ctc_decoder()


def _beam_decoder(cfg: EvalConfig):
    """torchaudio's flashlight decoder with an optional lexicon and KenLM (flashlight-text package)."""
    ctc_decoder = _ctc_decoder()
    try:
        return ctc_decoder(
            lexicon=cfg.lexicon,
            tokens=["_", "|", "'", *"abcdefghijklmnopqrstuvwxyz"],  # "|" is the word boundary (our space)
            lm=cfg.lm,
            beam_size=cfg.beam_size,
            lm_weight=cfg.lm_weight,
            word_score=cfg.word_score,
            blank_token="_",
            sil_token="|",
        )
    except (RuntimeError, ValueError) as err:  # e.g. a lexicon spelling with a token outside the alphabet
        files = ", ".join(f for f in (cfg.lexicon, cfg.lm) if f) or "eval"
        raise DataError(f"{files}: cannot build the beam decoder ({err})") from None


@torch.no_grad()
def _decode(model: nn.Module, exp: Experiment, split: str, device, limit: int | None = None) -> dict:
    """One forward pass per batch, decoded by the configured decoder ("hyps") and greedily ("greedy").

    Both from the same log-probabilities, so the greedy numbers show the acoustic model alone at no cost
    of a second pass. With the greedy decoder the two lists are the same.
    """
    cfg, was_training = eval_config(exp), model.training
    beam = None
    if cfg.decoder == "beam":  # checked and built before any batch runs
        files = {key: eval_file(exp, key) for key in ("lexicon", "lm")}
        beam = _beam_decoder(replace(cfg, **{k: None if f is None else str(f) for k, f in files.items()}))
    model.eval()
    out = {"ids": [], "refs": [], "hyps": [], "greedy": []}
    try:
        for batch in eval_loader(exp, split):
            log_probs, lengths = model(batch["features"].to(device), batch["lengths"].to(device))
            log_probs, lengths = log_probs.float().cpu(), lengths.cpu()
            best = log_probs.argmax(-1)
            greedy = [greedy_decode(best[b, : lengths[b]]) for b in range(len(lengths))]
            out["greedy"] += greedy
            if beam is None:
                out["hyps"] += greedy
            else:
                results = beam(log_probs, lengths.int())
                out["hyps"] += [" ".join(r[0].words) if r and r[0].words else "" for r in results]
            out["ids"] += batch["ids"]
            out["refs"] += batch["texts"]
            if limit is not None and len(out["ids"]) >= limit:
                break
    finally:
        model.train(was_training)
    return out


def transcribe(model: nn.Module, exp: Experiment, split: str, device, limit: int | None = None):
    """(ids, references, hypotheses) for a split, in file order."""
    out = _decode(model, exp, split, device, limit)
    return out["ids"], out["refs"], out["hyps"]


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER in percent: total edits / total reference words (characters)."""
    import jiwer

    return {
        "wer_pct": 100.0 * float(jiwer.wer(references, hypotheses)),
        "cer_pct": 100.0 * float(jiwer.cer(references, hypotheses)),
    }


def evaluate(model: nn.Module, exp: Experiment, split: str, device) -> dict[str, float]:
    """WER/CER of the configured decoder; with the beam decoder also greedy_wer_pct and greedy_cer_pct."""
    out = _decode(model, exp, split, device)
    rates = error_rates(out["refs"], out["hyps"])
    if eval_config(exp).decoder == "beam":
        rates |= {f"greedy_{k}": v for k, v in error_rates(out["refs"], out["greedy"]).items()}
    return rates


def samples(model: nn.Module, exp: Experiment, device, n: int) -> list[dict]:
    ids, refs, hyps = transcribe(model, exp, "test", device, limit=n)
    return [
        {"id": i, "reference": r, "hypothesis": h} for i, r, h in list(zip(ids, refs, hyps, strict=True))[:n]
    ]


__all__ = [
    "ALPHABET",
    "CONFIGS",
    "DATASETS",
    "HIGHER_IS_BETTER",
    "METRIC",
    "PRUNE_EXCLUDE",
    "PRUNE_INCLUDE",
    "build_model",
    "check",
    "error_rates",
    "eval_loader",
    "eval_file",
    "evaluate",
    "greedy_decode",
    "loss",
    "read_librispeech",
    "read_manifest",
    "samples",
    "train_loader",
    "write_lexicon",
]
