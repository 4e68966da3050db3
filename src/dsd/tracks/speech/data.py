"""Speech data: LibriSpeech-layout folders and JSON-lines manifests, checked transcripts, log spectra cached
once per split, SortaGrad, and the embedded corpus (synthesised with eSpeak NG, LibriSpeech layout).

A split's features are cached in a folder named by the corpus' content fingerprint, the feature settings and
the utterances as this code reads them (transcripts by the current normalisation rules), so features or
transcripts from another corpus, other settings or older rules are never read as this one's.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dsd import gpus, paths
from dsd.engine import distributed, loaders
from dsd.engine import prepare as prepared
from dsd.errors import DataError
from dsd.spec import Experiment, fingerprint
from dsd.tracks.speech import synthetic
from dsd.tracks.speech.config import Data, n_features

BLANK = "_"
ALPHABET = BLANK + " '" + "abcdefghijklmnopqrstuvwxyz"  # index 0 is the CTC blank
CHAR_INDEX = {c: i for i, c in enumerate(ALPHABET)}
SAMPLE_RATE = 16_000
WINDOW, HOP = 320, 160  # 20 ms spectrum window, 10 ms hop at 16 kHz
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
        with open(path, "rb") as f:
            header = f.read(1024)
        if header.startswith(b"NIST_1A") and b"shorten" in header:
            raise DataError(f"{path}: shorten-compressed SPHERE (as on the WSJ discs): convert it first, "
                            f"e.g. sph2pipe -f rif {path.name} {path.stem}.wav (read in its place)") from None  # fmt: skip
        raise DataError(f"{path}: unreadable audio file ({err})") from None
    if wav.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    wav = torch.from_numpy(wav.mean(axis=1))
    if not torch.isfinite(wav).all():  # one NaN made every feature of its utterance NaN, cached silently
        raise DataError(f"{path}: audio file has non-finite samples (NaN or infinity)")
    if rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        wav = AF.resample(wav, rate, SAMPLE_RATE)
    # the centred window's reflection padding needs more samples; torch's error for it names no file
    if len(wav) <= WINDOW // 2:
        raise DataError(
            f"{path}: audio file has {len(wav)} samples at 16 kHz, too short for a spectrum (over {WINDOW // 2})"
        )
    return wav


def read_librispeech(folder: str | Path) -> list[dict]:
    """Utterances of a LibriSpeech-layout folder: <spk>/<chapter>/<spk>-<chapter>-<utt>.flac + .trans.txt; an
    utterance's `.wav` (a converted copy) is read where its `.flac` is not there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: LibriSpeech folder is missing")
    transcripts = sorted(folder.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise DataError(f"{folder}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files")
    items = []
    for trans in transcripts:
        for n, line in enumerate(paths.read_text(trans).splitlines(), 1):
            if not line.strip():
                continue
            uid, text = (*line.split(maxsplit=1), "")[:2]  # a tab after the id, as in Kaldi's text files
            encode(text, f"{trans}:{n} ({uid})")
            audio = str(librispeech_audio(trans.parent, uid))
            items.append({"id": uid, "audio": audio, "transcript": text.lower(), "where": f"{trans}:{n}"})
    say_untranscribed(folder, items)
    return items


def say_untranscribed(folder: Path, items: list[dict]) -> None:
    """Count the audio files no trans.txt line names (a chapter whose trans.txt was lost, or cut short, in a
    copy): left out, as WSJ's untranscribed utterances are, but no longer without a word."""
    listed = {Path(item["audio"]).with_suffix("") for item in items}
    audio = (p for p in folder.glob("*/*/*") if p.suffix in (".flac", ".wav") and not p.name.startswith("."))
    left_out = sorted(p for p in audio if p.with_suffix("") not in listed)
    if left_out:
        print(
            f"{folder}: {len(left_out)} audio files without a line in their chapter's trans.txt left out "
            f"(e.g. {left_out[0].relative_to(folder)})",
            file=sys.stderr,
        )


def librispeech_audio(chapter: Path, uid: str) -> Path:
    flac = chapter / f"{uid}.flac"
    wav = flac.with_suffix(".wav")
    return wav if not flac.exists() and wav.exists() else flac


def read_manifest(path: str | Path) -> list[dict]:
    """JSON lines {"audio": path (relative to the manifest), "transcript": text, "duration": seconds}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest is missing")
    items = []
    for n, line in enumerate(paths.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio, text = entry["audio"], entry["transcript"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{n}: expected JSON with 'audio' and 'transcript' ({err})") from None
        if not isinstance(audio, str) or not isinstance(text, str):
            raise DataError(f"{path}:{n}: 'audio' and 'transcript' must be text")
        uid = str(entry.get("id", Path(audio).stem))
        encode(text, f"{path}:{n} ({uid})")
        items.append({"id": uid, "audio": str(path.parent / audio), "transcript": text.lower()})
    return items


@functools.cache
def _transform(feature: str, n_mels: int):
    import torchaudio.transforms as T

    window = dict(n_fft=WINDOW, win_length=WINDOW, hop_length=HOP)
    if feature == "logmel":
        return T.MelSpectrogram(sample_rate=SAMPLE_RATE, n_mels=n_mels, **window)
    return T.Spectrogram(**window)


def features(wav: torch.Tensor, data: Data) -> torch.Tensor:
    """(frames, bins) log spectrum, mean/variance normalised per utterance and per bin."""
    with torch.no_grad():
        spec = torch.log(_transform(data.feature, data.n_mels)(wav) + 1e-6).T
        return (spec - spec.mean(0)) / (spec.std(0) + 1e-5)


def _sources(exp: Experiment, split: str) -> list[dict]:
    """A split's utterances: LibriSpeech folders, JSON-lines manifests, or WSJ index files (.ndx) of the LDC
    discs, each relative to the data folder."""
    names = getattr(exp.data, split)
    items = []
    for name in [names] if isinstance(names, str) else names:
        path = Path(exp.data_dir) / name
        if path.suffix in (".jsonl", ".json"):
            items += read_manifest(path)
        elif path.suffix == ".ndx":
            items += read_wsj_index(path, Path(exp.data_dir), "skip" if split == "train" else "error")
        else:
            items += read_librispeech(path)
    check_listed_once(items, split)
    return items


def check_listed_once(items: list[dict], split: str) -> None:
    """An utterance of a LibriSpeech or WSJ layout (with `where` it is listed) in a split once: a line
    repeated in an index or transcript file, or an index named twice in data.<split>, trained on it twice
    per epoch or counted its errors twice in the WER, silently. A manifest may repeat an utterance."""
    first: dict[str, str] = {}
    for item in items:
        if "where" not in item:
            continue
        if item["audio"] in first:
            raise DataError(
                f"{item['where']}: {item['id']} is listed again in split {split!r} (first at {first[item['audio']]})"
            )
        first[item["audio"]] = item["where"]


# ---------------------------------------------------------------------------------------------------- WSJ


# the mark before a verbalised punctuation word (",comma", "?question-mark", "...ellipsis"): not spoken
VERBALISED_MARKS = "%&,.;:?!(){}/+#"


def normalise_wsj(text: str, where: str) -> str:
    """A WSJ transcript (.dot) in the alphabet, by these rules, in order:

    1. lower case, and the backslashes that quote marks inside words removed ("isn\\'t", "i\\. b\\. m\\.": the
       LDC's dot_spec, as Kaldi's normalize_transcript.pl reads it);
    2. noise markers in square brackets ("[loud_breath]", "[door_slam]") are dropped;
    3. angle brackets and asterisks around words ("<is>", "*mispronounced*") are removed, the word kept;
    4. verbalised punctuation and symbols keep their spoken word (".period" -> "period", ",comma" -> "comma",
       "(left-paren" -> "left paren", "%percent" -> "percent", "--dash" -> "dash", "'single-quote" -> "single
       quote"; a leading apostrophe of other words is kept: "'em");
    5. word fragments (a hyphen at a word's start or end: "wo-", "-tend") are dropped;
    6. dots ("u.s.") and "~", ":", "!" marks are removed; a hyphen inside a word is a space.
    Anything still outside a-z, space and ' is a DataError naming the line.
    """
    words = []
    for token in text.lower().replace("\\", "").split():
        if token.startswith("[") and token.endswith("]"):
            continue
        token = token.strip("<>*").lstrip(VERBALISED_MARKS).replace('"', "")
        if re.fullmatch(r"'[a-z-]*quote", token):  # "'single-quote": the mark is not spoken
            token = token[1:]
        if re.fullmatch(r"-+(dash|hyphen)", token):  # the CMU dictionary's "-dash", "-hyphen"
            token = token.lstrip("-")
        elif token.startswith("-") or token.endswith("-"):
            continue
        token = re.sub(r"[.~:!]", "", token).replace("-", " ").replace("_", " ")
        words += token.split()
    out = " ".join(words)
    encode(out, where)  # raises on anything left outside the alphabet
    return out


def read_wsj_dots(root: Path) -> dict[str, str]:
    """utterance id -> transcript line of every .dot file below `root` ("text (011c0201)" per line)."""
    out = {}
    for dot in sorted(dot_files(root)):
        for n, line in enumerate(dot.read_text(errors="replace").splitlines(), 1):
            match = re.fullmatch(r"\s*(.*?)\s*\((\w+)\)\s*", line)
            if match:
                out[match.group(2).lower()] = (match.group(1), f"{dot}:{n}")
    return out


def dot_files(root: Path) -> list[Path]:
    """The .dot files below `root`, through symbolic links to folders (each disc mounted elsewhere and linked
    in, as Kaldi's wsj_data_prep links them): `rglob` does not follow those, so every utterance of a linked
    disc had no transcript, and training left them all out with one line on stderr. A folder reached twice
    (a link to a parent) is read once; hidden files are skipped, as the data set's fingerprint skips them."""
    out, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        out += [Path(folder) / f for f in files if f.endswith(".dot") and not f.startswith(".")]
    return out


@functools.cache
def _wsj_dots(root: str) -> dict[str, str]:
    return read_wsj_dots(Path(root))


def read_wsj_index(index: Path, root: Path, untranscribed: str = "error") -> list[dict]:
    """An LDC index file (si284's tr_s_wv1.ndx and friends, dev93, eval92, eval93): one `disc:/path/utt.wv1`
    per line (";" comments; the evaluation indices leave out the `.wv1`); audio paths relative to the data
    folder, transcripts from the .dot files below it. An utterance without a transcript is an error, or with
    `untranscribed="skip"` (training) left out and counted on stderr. The lines that list an utterance on a
    disc that does not hold it (`listed_on_the_wrong_disc`) are left out and counted too."""
    if not index.is_file():
        raise DataError(f"{index}: WSJ index file is missing")
    dots, items, skipped, misplaced = _wsj_dots(str(root)), [], [], 0
    for n, line in enumerate(paths.read_text(index).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if listed_on_the_wrong_disc(line):
            misplaced += 1
            continue
        audio = wsj_audio(root, line.split(":", 1)[-1].strip().lstrip("/"))
        uid = audio.stem.lower()
        if uid not in dots and untranscribed == "skip":
            skipped.append(uid)
            continue
        if uid not in dots:
            raise DataError(f"{index}:{n}: no transcript for {uid} in the .dot files below {root}")
        text, where = dots[uid]
        transcript = normalise_wsj(text, where)
        items.append({"id": uid, "audio": str(audio), "transcript": transcript, "where": f"{index}:{n}"})
    if skipped:
        print(
            f"{index}: {len(skipped)} utterances without a transcript left out (e.g. {skipped[0]})",
            file=sys.stderr,
        )
    if misplaced:
        print(
            f"{index}: {misplaced} lines of {WRONG_DISC[0].rstrip('/')} left out (a disc that does not hold "
            f"them; the index lists them again on the one that does, as Kaldi's wsj_data_prep.sh reads it)",
            file=sys.stderr,
        )
    return items


# si84's tr_s_wv1.ndx lists speaker 401's utterances twice: on disc 11-2.1, which does not hold them, and on
# 11-3.1, which does. With the discs merged into wsj0/ both lines name one file, so si284 was refused as
# listing it twice. Kaldi's wsj_data_prep.sh drops the 11-2.1 lines (7138 si84, 37416 si284 utterances left).
WRONG_DISC = ("11_2_1:wsj0/si_tr_s/401/",)


def listed_on_the_wrong_disc(line: str) -> bool:
    disc, _, path = line.partition(":")
    return f"{disc.strip()}:{path.strip().lstrip('/')}".lower().startswith(WRONG_DISC)


def wsj_audio(root: Path, relative: str) -> Path:
    """An index entry's audio file: `.wv1` added where the index leaves it out, the disc's case or lower
    case, and a converted `utt.wav` beside the shorten-compressed `utt.wv1` read in its place."""
    name = relative if Path(relative).suffix else f"{relative}.wv1"
    for path in (root / name, root / name.lower()):
        for candidate in (path.with_suffix(".wav"), path):
            if candidate.exists():
                return candidate
    return root / name


def _cache_dir(exp: Experiment, split: str, data_fingerprint: str) -> Path:
    """Beside generated data, under data_root for real data (a user's corpus is never written)."""
    data = exp.data
    key = {
        "data": data_fingerprint,
        "split": getattr(data, split),
        "feature": data.feature,
        "bins": n_features(data),
        "max_seconds": data.max_seconds if split == "train" else None,
        "utterances": utterances_read_now(exp, split, data_fingerprint),
    }
    return exp.cache_dir / "features" / f"{split}-{fingerprint(key)}"


_UTTERANCES: dict[tuple, str] = {}


def utterances_read_now(exp: Experiment, split: str, files: str) -> str:
    """Fingerprint of the split's utterances as this code reads them: ids, audio files (relative to the data
    folder) and transcripts by the current normalisation rules. A fingerprint of the files alone missed a
    changed rule: a cache built before `normalise_wsj` changed kept the old transcripts, and training and the
    WER read them. Read once per process and state of the files (`files`, a fingerprint of them): a
    LibriSpeech-size split takes seconds, and every check that the data set is current asks."""
    names = getattr(exp.data, split)
    memo = (exp.data_dir, split, json.dumps(names), files)
    if memo not in _UTTERANCES:
        _UTTERANCES[memo] = fingerprint(_as_read(exp, split))
    return _UTTERANCES[memo]


def _as_read(exp: Experiment, split: str) -> list[list[str]]:
    return [
        [i["id"], os.path.relpath(i["audio"], exp.data_dir), i["transcript"]] for i in _sources(exp, split)
    ]


def content_as_read(exp: Experiment, files: str) -> str:
    """The corpus' every split as this code reads it, for a real corpus' fingerprint (prepare.content_fingerprint,
    `files` the fingerprint of its files): the transcript files are the same after a normalisation rule changed,
    the transcripts trained and scored on are not, so the runs trained on the old ones are not this corpus'."""
    return fingerprint({split: utterances_read_now(exp, split, files) for split in SPLITS})


def _featurise(job: tuple[dict, Data, float | None]):
    item, data, max_seconds = job
    wav = load_audio(item["audio"])
    if max_seconds and len(wav) > max_seconds * SAMPLE_RATE:
        return None
    return item["id"], " ".join(item["transcript"].split()), features(wav, data).numpy()


def feature_workers(options) -> int:
    """The run option `workers`, else every core this job may use: a SLURM job's allocation, a taskset's
    cores, not the node's (os.cpu_count: 1 allocated CPU ran as many processes as the node has cores)."""
    return options.workers or gpus.job_cores()


def build_features(exp: Experiment, split: str, out: Path) -> Path:
    """Featurise a split once, in parallel (`feature_workers`), into one raw float32 file of frames and an
    index; utterances stream through in order, so memory does not grow with the corpus."""
    items = _sources(exp, split)
    max_seconds = exp.data.max_seconds if split == "train" else None
    jobs = [(item, exp.data, max_seconds) for item in items]
    workers = feature_workers(exp.options)
    remove_dead_builds(out)
    tmp = out.with_name(f".{out.name}.{paths.writer_tag()}.tmp")  # parallel jobs may build the same split
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _write_features(jobs, workers, tmp, exp, split)
    except OSError as err:  # a full disk's failed write names no file (unreadable audio is a DataError)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: cannot write the features cache ({err.strerror or err})") from None
    except BaseException:  # a bad file, a full disk, a signal: no half-written cache left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, out)
    return out


def move_into_place(tmp: Path, out: Path) -> None:
    """A finished cache folder becomes `out`, unless another job (a DDP job's other rank, say) finished the
    same one first: a folder holding files is not replaced, so the later build is dropped."""
    try:
        tmp.replace(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp)


def remove_dead_builds(out: Path) -> None:
    """Delete the half-built caches of `out` (`.NAME.PID@HOST.tmp`) whose job was killed (SIGTERM, kill -9: no
    cleanup ran); each is up to a split's features in size. A live job's stays, on this machine or another."""
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        if paths.writer_gone(tmp.name[len(out.name) + 2 : -len(".tmp")], tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def feature_pool(workers: int):
    """The featurising processes, each killed when the job's process dies: one ended by SIGTERM or kill -9 (a
    scheduler, the OOM killer) left them waiting forever, each holding a copy of its memory, on a queue whose
    other end they hold themselves."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(
        workers, mp_context=get_context("fork"), initializer=_feature_worker, initargs=(os.getpid(),)
    )


def _feature_worker(parent: int) -> None:
    """A featurising worker dies with its job and computes on one thread (the workers are the parallelism).
    A forked process has none of its parent's OpenMP threads: once the job had run a parallel op (summing a
    split of 40k utterance lengths, loading weights), a worker's first parallel op waited for them forever.
    With one thread torch runs no OpenMP region; the features are the same bits."""
    from dsd import gpus

    gpus._die_with(parent)
    torch.set_num_threads(1)


def _write_features(jobs: list, workers: int, tmp: Path, exp: Experiment, split: str) -> None:
    from tqdm import tqdm

    index = {"format": FEATURES_FORMAT, "bins": n_features(exp.data), "ids": [], "texts": [], "lengths": []}
    too_long = 0
    with open(tmp / "frames.f32", "wb") as frames, feature_pool(workers) as pool:
        done = pool.map(_featurise, jobs, chunksize=16) if workers > 1 else map(_featurise, jobs)
        # shown also where stderr is a job's log file, not a terminal: minutes of work at a corpus's size
        for result in tqdm(done, total=len(jobs), desc=f"features {split}", unit="utt", mininterval=2.0):
            if result is None:
                too_long += 1
                continue
            uid, text, feats = result
            frames.write(feats.astype("float32").tobytes())
            index["ids"].append(uid)
            index["texts"].append(text)
            index["lengths"].append(int(feats.shape[0]))
    # counted, as the untranscribed are: a max_seconds in another unit left out every utterance without a word
    dropped = f"{too_long} of {len(jobs)} utterances longer than data.max_seconds {exp.data.max_seconds}"
    if not index["ids"]:
        raise DataError(
            f"{exp.data_dir}: split {split!r} has no utterances" + (f" ({dropped})" if too_long else "")
        )
    if too_long:
        print(f"{exp.data_dir}: split {split!r}: {dropped} left out", file=sys.stderr)
    paths.write_atomically(tmp / "index.json", json.dumps(index).encode())
    _flush_to_disk(tmp / "frames.f32")  # before the folder's rename: after a machine crash it is whole


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class SpeechSet(Dataset):
    """A split's cached features, read utterance by utterance from disk (nothing held in memory but the index):
    item i -> (features (T, F), character ids, id, transcript).

    The index is held in arrays, no object per utterance: a tensor of character ids per utterance cost ~1.7 KB
    (~500 MB for LibriSpeech's 281k training utterances, in every process), and lists of ids and transcripts
    were copied into each loader worker as it read them (loaders.PackedStrings)."""

    def __init__(self, folder: Path):
        index = paths.read_json(folder / "index.json")  # one cut short is named
        if index.get("format") != FEATURES_FORMAT:
            raise DataError(f"{folder}: not a features cache of this version (delete it)")
        self.frames, self.bins = folder / "frames.f32", index["bins"]
        expected = sum(index["lengths"]) * self.bins * 4
        size = self.frames.stat().st_size if self.frames.is_file() else 0
        if size != expected:  # a short file reads as utterances cut short or empty, silently
            raise DataError(
                f"{self.frames}: {size} bytes, its index needs {expected}: a damaged features cache "
                f"(a copy cut short, a machine crash while it was written); delete {folder} and run dsd prepare"
            )
        self.lengths = torch.tensor(index["lengths"])
        self.offsets = np.zeros(len(index["lengths"]) + 1, dtype=np.int64)
        np.cumsum(index["lengths"], out=self.offsets[1:])
        encoded = [
            bytes(encode(t, f"{folder} ({u})")) for u, t in zip(index["ids"], index["texts"], strict=True)
        ]
        self.characters = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)  # ids < 256
        self.target_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.target_offsets[1:])
        self.ids, self.texts = loaders.PackedStrings(index["ids"]), loaders.PackedStrings(index["texts"])

    def __len__(self) -> int:
        return len(self.ids)

    def features(self, i: int) -> torch.Tensor:
        count, offset = int(self.lengths[i]) * self.bins, int(self.offsets[i]) * self.bins * 4
        return torch.from_numpy(np.fromfile(self.frames, dtype=np.float32, count=count, offset=offset)).view(
            -1, self.bins
        )

    def target(self, i: int) -> torch.Tensor:
        """Utterance i's character ids (int64, as CTC's targets have always been)."""
        start, end = int(self.target_offsets[i]), int(self.target_offsets[i + 1])
        return self.characters[start:end].long()

    def __getitem__(self, i: int):
        return self.features(i), self.target(i), self.ids[i], self.texts[i]


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
    path = _cache_dir(exp, split, data_fingerprint or prepared.data_fingerprint(exp))
    if not path.is_dir():
        build_features(exp, split, path)
    return _dataset_at(str(path))


def bucketed_order(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator, window: int
) -> list[int]:
    """A shuffled order whose consecutive `batch_size` indices have similar lengths: shuffle, sort each
    window of `window` batches by length, then shuffle the batches. Less padding, still random. The one short
    batch (the last window's remainder) stays last: shuffled in, it shifted every later batch of the loader
    across two of these, each of other lengths (and DDP drops the epoch's incomplete last batch)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: int(lengths[i]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < batch_size else []
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]] + short


def train_loader(exp: Experiment, seed: int, epoch: int, skip_batches: int = 0, first: bool = False):
    """SortaGrad: the first epoch of training (the dense phase's first) goes shortest utterance first; every
    other epoch is shuffled in length buckets."""
    ds, cfg = dataset(exp, "train"), exp.data
    sortagrad = cfg.sortagrad if cfg.sortagrad is not None else exp.model.arch == "deepspeech2"
    if sortagrad and first:
        order = torch.argsort(ds.lengths, stable=True).tolist()
    elif cfg.length_buckets:
        generator = torch.Generator().manual_seed(loaders.epoch_seed(seed, epoch, 1))
        order = bucketed_order(ds.lengths, exp.train.batch_size, generator, cfg.length_buckets)
    else:
        order = None
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


def eval_loader(exp: Experiment, split: str, batch_size: int, shard: bool = False):
    """The split by length in batches; with `shard`, under torch.distributed, this rank's share of them."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    ds = dataset(exp, split)
    order = loaders.rank_batches(by_length(ds), batch_size) if shard else by_length(ds)
    return loaders.loader(
        ds, batch_size, train=False, collate_fn=collate, workers=exp.options.workers, order=order
    )


def by_length(ds: SpeechSet) -> list[int]:
    """The evaluation order, shortest first: in the corpus' order a batch of 64 LibriSpeech-like utterances was
    padded to ~3.5x its frames, which every layer but the packed RNN computes on. An utterance's output does not
    depend on its batch's padding, and the decoder puts the results back in the split's order."""
    return torch.argsort(ds.lengths, stable=True).tolist()


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
    """What the corpus is read from, for its fingerprint (prepare.content_fingerprint): LibriSpeech's split
    folders; a JSON-lines manifest and every audio file it names; for WSJ's indices the whole data folder (the
    .dot transcripts below it, the audio, a `.wav` converted beside a `.wv1`). A transcript edited or an audio
    file replaced under an unchanged manifest or index is another corpus: features cached from the old one
    must not be read."""
    out = []
    for split in SPLITS:
        names = getattr(exp.data, split)
        for path in (Path(exp.data_dir) / n for n in ([names] if isinstance(names, str) else names)):
            if path.suffix == ".ndx":
                out.append(Path(exp.data_dir))
            elif path.suffix in (".jsonl", ".json") and path.is_file():
                out += [path, *(Path(item["audio"]) for item in read_manifest(path))]
            else:
                out.append(path)
    return list(dict.fromkeys(out))


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
        shutil.rmtree(root / "features", ignore_errors=True)  # every cache there is of the old corpus
        (root / LEXICON).unlink(missing_ok=True)
        synthetic.write_corpus(root, spec)
    # rewritten every time (it is cheap), so it always matches the training transcripts
    words = write_lexicon([item["transcript"] for item in _sources(exp, "train")], root / LEXICON)
    if not fresh:
        stamp.write_text(wanted)  # last: the corpus and its lexicon are complete
        _dataset_at.cache_clear()
    return words


def check(exp: Experiment) -> None:
    """Before training: the training and validation features (built now if another row's settings differ), and
    a word on training utterances that CTC cannot align."""
    for split in ("train", "val"):
        dataset(exp, split)
    ds = dataset(exp, "train")
    if short := unalignable(exp, ds):
        distributed.say(
            f"dsd: {exp.row}: {short} of {len(ds)} training utterances have more characters than the model's output "
            f"frames (model.stride {exp.model.stride}): CTC gives them no loss (zero_infinity), so they train nothing"
        )


def unalignable(exp: Experiment, ds: SpeechSet) -> int:
    """Utterances whose transcript needs more output frames than the model gives them: CTC emits a frame per
    character and a blank between two equal ones."""
    from dsd.tracks.speech.model import output_lengths  # the model's module imports this one

    chars, offsets = ds.characters.long(), torch.as_tensor(ds.target_offsets)
    same = torch.zeros(len(chars), dtype=torch.long)
    same[1:] = (chars[1:] == chars[:-1]).long()
    same[offsets[:-1][offsets[:-1] < len(chars)]] = 0  # an utterance's first character repeats nothing
    counts = torch.cat([torch.zeros(1, dtype=torch.long), same.cumsum(0)])
    needed = offsets[1:] - offsets[:-1] + counts[offsets[1:]] - counts[offsets[:-1]]
    return int((output_lengths(exp.model, ds.lengths) < needed).sum())


def same_folder(exp: Experiment, a: str, b: str) -> bool:
    return getattr(exp.data, a) == getattr(exp.data, b)
