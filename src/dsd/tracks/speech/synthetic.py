"""The embedded speech corpus: sentences synthesised offline with eSpeak NG, written in the LibriSpeech layout.

eSpeak NG is driven through ctypes on the `libespeak-ng.so` that the `espeakng_loader` wheel ships, so no
system package and no download is needed. Speakers are (voice, variant) pairs; train, dev and test speakers
are disjoint, so the test WER measures generalisation to unseen voices, as LibriSpeech's held-out speakers do.
Rates, pitches and additive noise at a random SNR keep the task from being trivial.

Determinism: eSpeak NG keeps static state between calls (pitch-flutter phase, AGC) and its "breath" variants
use an unseeded rand(). So variants with breath are not used, and each speaker is synthesised in a fresh
worker process (this file run as a script), whose output then depends only on that speaker's requests. Every
random choice comes from a generator seeded by (seed, split, speaker): a fixed seed gives identical samples.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsd.errors import DataError

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050  # eSpeak NG's native output rate

# A few hundred common English words (lower-case letters and apostrophes only: the track's alphabet).
WORDS = """
a about above across after again against air all almost alone along already also always am among an and
animal another answer any anything are around as ask at away back bad be because bed been before began begin
behind being below best better between big bird black blue boat body book both box boy bring brother brown
build but by call came can can't car care carry cat change child children city clean close cold color come
could country cut dark day did didn't different do does dog don't done door down draw dream drink drive dry
during each early earth east eat end enough even evening ever every eye face fall family far fast father feel
few field find fire first fish five floor fly follow food foot for found four free friend from front full game
gave get girl give glass go gold good got grass great green ground group grow had hair half hand happy hard has
have he head hear heart heavy help her here high hill him his hold home horse hot hour house how i i'm idea if
in inside into is it it's just keep kind king know land large last late laugh learn leave left less letter
light like line listen little live long look love low made make man many may me mean men might mile milk mind
minute money moon more morning most mother mountain move much music must my name near need never new next
night nine no north nothing now number of off often old on once one only open or other our out over own page
paper park part people picture place plant play please point poor quick quiet rain ran read ready red remember
rest ride right river road rock room round run said same sat saw say school sea second see seem seven shall
she ship short should show side sing sister sit six sleep slow small snow so some something song soon sound
south speak stand star start stay still stone stop story street strong sun sure table take talk tall teacher
tell ten than that the their them then there these they thing think this three through time to today together
told too took tree try turn two under until up us very voice walk wall want warm was watch water way we week
well went were west what when where which while white who why will wind window winter with without woman
wood word work world would write wrong year yellow yes yet you young your
""".split()

# (eSpeak voice, variant) per speaker; splits never share a variant. No "breath" variants (f2, f3, f5, ...):
# their noise comes from an unseeded rand(), which would make the audio irreproducible.
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "aunty", "linda", "Andy", "ian", "john", "max")
SPEAKERS = {
    "train": [("en-us", v) for v in TRAIN_VARIANTS],
    "dev": [("en-us", v) for v in ("m6", "f4", "paul", "travis")],
    "test": [("en-us", v) for v in ("m7", "belinda", "robert", "m8")],
}

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes and difficulty knobs of the embedded corpus (all from the experiment's `data` section)."""

    seed: int = 1234
    utterances_per_speaker: dict | None = None  # split -> count; default below
    vocabulary: int = 200  # words used, spread evenly over WORDS (the full list has 425)
    min_words: int = 2
    max_words: int = 5
    rate: tuple[int, int] = (130, 180)  # words per minute, uniform per utterance
    pitch: tuple[int, int] = (30, 70)  # eSpeak pitch 0-100
    snr_db: tuple[float, float] = (20.0, 35.0)

    def words(self) -> list[str]:
        return WORDS[:: max(1, len(WORDS) // self.vocabulary)][: self.vocabulary]

    def count(self, split: str) -> int:
        default = {"train": 120, "dev": 25, "test": 25}
        return int((self.utterances_per_speaker or default)[split])


class _Espeak:
    """One eSpeak NG instance per process (the library keeps global state), used under a lock."""

    _instance: _Espeak | None = None
    _lock = threading.Lock()

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path().encode()
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data path {data.decode()!r}")
        self.sample_rate = rate
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: the C side holds only the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> _Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def say(self, text: str, voice: str, variant: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at `self.sample_rate` (22050 Hz for eSpeak NG)."""
        with self._lock:
            name = f"{voice}+{variant}".encode()
            if self.lib.espeak_SetVoiceByName(name) != 0:
                raise RuntimeError(f"eSpeak NG has no voice {name.decode()!r}")
            self.lib.espeak_SetParameter(_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_RANGE, 50, 0)
            self._chunks = []
            raw = text.encode() + b"\0"
            err = self.lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
            self.lib.espeak_Synchronize()
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def speak(requests: list[tuple[str, str, str, int, int]]) -> list[np.ndarray]:
    """int16 audio at eSpeak's rate for (text, voice, variant, rate, pitch) requests, in a fresh process.

    A fresh process starts eSpeak from its initial state, so the result depends only on `requests`. Requests
    and audio go through its pipes: a temporary folder was left behind by a job killed meanwhile.
    """
    # run as a plain script (-P: no script folder on sys.path), so the worker never imports torch
    worker = [sys.executable, "-P", __file__]
    done = subprocess.run(worker, input=json.dumps(requests).encode(), stdout=subprocess.PIPE, check=True)
    with np.load(io.BytesIO(done.stdout)) as audio:
        return [audio[f"a{i}"] for i in range(len(requests))]


def _trim(wav: np.ndarray, threshold: float = 1e-3, margin: int = 1600) -> np.ndarray:
    """Cut eSpeak's long leading/trailing silence (keeps 0.1 s), so frames are spent on speech."""
    loud = np.flatnonzero(np.abs(wav) > threshold)
    if loud.size == 0:
        return wav
    return wav[max(0, loud[0] - margin) : loud[-1] + margin]


def plan(rng: np.random.Generator, spec: CorpusSpec) -> dict:
    """Every random choice of one utterance: sentence, speaking rate, pitch, SNR and the noise seed."""
    n, words = int(rng.integers(spec.min_words, spec.max_words + 1)), spec.words()
    return {
        "text": " ".join(words[i] for i in rng.integers(0, len(words), n)),
        "rate": int(rng.integers(spec.rate[0], spec.rate[1] + 1)),
        "pitch": int(rng.integers(spec.pitch[0], spec.pitch[1] + 1)),
        "snr_db": float(rng.uniform(*spec.snr_db)),
        "noise_seed": int(rng.integers(0, 2**31)),
    }


def finish(raw: np.ndarray, rate: int, plan: dict) -> np.ndarray:
    """eSpeak int16 -> float32 at 16 kHz (torchaudio resampling), trimmed, plus white noise at the SNR."""
    import torch
    import torchaudio.functional as AF

    wav = torch.from_numpy(raw.astype(np.float32) / 32768.0)
    wav = _trim(AF.resample(wav, rate, SAMPLE_RATE).numpy())
    power = float(np.mean(wav**2)) + 1e-10
    noise = np.random.default_rng(plan["noise_seed"]).standard_normal(wav.shape).astype(np.float32)
    return np.clip(wav + noise * np.sqrt(power / 10 ** (plan["snr_db"] / 10)), -1.0, 1.0).astype(np.float32)


def speaker_audio(spec: CorpusSpec, split: str, index: int) -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz waveform) for every utterance of one speaker."""
    s = list(SPEAKERS).index(split)
    voice, variant = SPEAKERS[split][index]
    rng = np.random.default_rng([spec.seed, s, index])
    plans = [plan(rng, spec) for _ in range(spec.count(split))]
    raw = speak([(p["text"], voice, variant, p["rate"], p["pitch"]) for p in plans])
    return [(p["text"], finish(r, ESPEAK_RATE, p)) for p, r in zip(plans, raw, strict=True)]


def write_corpus(root: str | Path, spec: CorpusSpec, workers: int = 2) -> dict:
    """Write <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac + .trans.txt per chapter.

    Speaker ids are 1-based positions in SPEAKERS offset by 100 per split (1.., 101.., 201..); one chapter
    each. Speakers are synthesised `workers` at a time. Returns {split: number of utterances}.
    """
    root = Path(root)
    jobs = [(split, k) for split, speakers in SPEAKERS.items() for k in range(len(speakers))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: speaker_audio(spec, *job), jobs))
    counts = dict.fromkeys(SPEAKERS, 0)
    for (split, k), utterances in zip(jobs, results, strict=True):
        speaker, chapter = 100 * list(SPEAKERS).index(split) + k + 1, 1
        folder = root / split / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for u, (text, wav) in enumerate(utterances):
            uid = f"{speaker}-{chapter}-{u:04d}"
            write_flac(folder / f"{uid}.flac", wav)
            lines.append(f"{uid} {text.upper()}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
        counts[split] += len(lines)
    return counts


def write_flac(path: Path, wav: np.ndarray) -> None:
    """libsndfile reports a full disk as a failure to start its FLAC encoder: name the file and the space left."""
    import soundfile as sf

    try:
        sf.write(path, wav, SAMPLE_RATE, subtype="PCM_16")
    except sf.LibsndfileError as err:
        free = shutil.disk_usage(path.parent).free
        said = err.error_string.removeprefix("Error : ").strip() or f"libsndfile error {err.code}"
        reason = (
            "No space left on device" if free < 2**20 else f"{said}; {free // 2**20} MiB free on its disk"
        )
        raise DataError(f"{path}: cannot write the audio ({reason})") from None


def _worker() -> None:
    """`speak`'s requests from stdin, their audio (npz) to stdout; whatever else writes to fd 1 (eSpeak's C
    code, say) goes to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    engine = _Espeak.get()
    if engine.sample_rate != ESPEAK_RATE:
        raise RuntimeError(f"eSpeak NG reports {engine.sample_rate} Hz, expected {ESPEAK_RATE}")
    audio = io.BytesIO()
    np.savez(audio, **{f"a{i}": engine.say(*r) for i, r in enumerate(json.loads(sys.stdin.buffer.read()))})
    with out:
        out.write(audio.getbuffer())


if __name__ == "__main__":
    _worker()
