"""Speech track: reader, synthesiser, CTC decoding, WER/CER, pruning patterns, errors, a short end-to-end."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from dsd.core.masks import Pruner
from dsd.engine import prepare
from dsd.errors import ConfigError, DataError
from dsd.spec import RunOptions, parse_row
from dsd.tracks.speech import config as speech_config
from dsd.tracks.speech import data as speech_data
from dsd.tracks.speech import metric as speech_metric
from dsd.tracks.speech import model as speech_model
from dsd.tracks.speech import synthetic as spoken

PRUNE_INCLUDE = ("fc*.weight", "rnn*.weight_ih_l*", "rnn*.weight_hh_l*", "out.weight")

torch.set_num_threads(1)


COUNTS = {"train": 6, "dev": 2, "test": 2}  # utterances per speaker of the tiny embedded corpus


def _exp(tmp_path, arch="deepspeech", decode=None, model=None, **data):
    """A speech row on the embedded corpus generated under `tmp_path`."""
    entry = {
        "track": "speech",
        "dataset": "spoken",
        "model": {
            "arch": arch,
            "hidden": 32,
            "rnn_hidden": 24,
            "rnn_layers": 2,
            "conv_channels": 4,
            **(model or {}),
        },
        "data": data,
        "eval": {"batch_size": 16, **(decode or {})},
        "train": {"batch_size": 8},
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}],
    }
    return parse_row(arch, entry, None).experiment(
        RunOptions(data_root=str(tmp_path), output_dir=str(tmp_path))
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded corpus at a tiny size, synthesised once (a few seconds) for the tests that read it."""
    base = tmp_path_factory.mktemp("tiny")
    return base, prepare.prepare(_exp(base, utterances_per_speaker=COUNTS))["summary"]


def _words(folder) -> set[str]:
    return {w for item in speech_data.read_librispeech(folder) for w in item["transcript"].split()}


def _write_librispeech(root, lines, sr=16000, seconds=0.3):
    folder = root / "19" / "198"
    folder.mkdir(parents=True)
    t = np.arange(int(sr * seconds)) / sr
    for i, (uid, _) in enumerate(lines):
        sf.write(folder / f"{uid}.flac", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), sr)
    (folder / "19-198.trans.txt").write_text("".join(f"{uid} {text}\n" for uid, text in lines))
    return folder


def test_librispeech_reader_and_features(tmp_path):
    _write_librispeech(tmp_path / "dev", [("19-198-0000", "HELLO WORLD"), ("19-198-0001", "IT'S A TEST")])
    items = speech_data.read_librispeech(tmp_path / "dev")
    assert [i["id"] for i in items] == ["19-198-0000", "19-198-0001"]
    assert [i["transcript"] for i in items] == ["hello world", "it's a test"]
    wav = speech_data.load_audio(items[0]["audio"])
    assert wav.shape == (4800,)
    feats = speech_data.features(wav, speech_config.Data())
    assert feats.shape == (31, 40)  # 0.3 s at a 10 ms hop (centred frames), 40 mel bins
    assert torch.allclose(feats.mean(0), torch.zeros(40), atol=1e-4)


def test_manifest_reader(tmp_path):
    folder = _write_librispeech(tmp_path / "c", [("19-198-0000", "HELLO")])
    manifest = tmp_path / "m.jsonl"
    row = {"audio": str(folder / "19-198-0000.flac"), "transcript": "Hello", "duration": 0.3}
    manifest.write_text(json.dumps(row) + "\n")
    assert speech_data.read_manifest(manifest)[0]["transcript"] == "hello"
    manifest.write_text('{"audio": "x.flac"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1"):
        speech_data.read_manifest(manifest)


def test_bad_audio_and_transcripts_are_named(tmp_path):
    folder = _write_librispeech(tmp_path / "dev", [("19-198-0000", "HELLO")])
    bad = folder / "19-198-0000.flac"
    bad.write_bytes(b"not a flac file at all")
    with pytest.raises(DataError, match="19-198-0000.flac: unreadable"):
        speech_data.load_audio(bad)
    import numpy as np
    import soundfile as sf

    sf.write(str(bad), np.zeros(0, dtype="float32"), 16000, format="FLAC")  # a valid file with no samples
    with pytest.raises(DataError, match="19-198-0000.flac: (audio file has no samples|unreadable)"):
        speech_data.load_audio(bad)
    bad.unlink()
    with pytest.raises(DataError, match="19-198-0000.flac: audio file is missing"):
        speech_data.load_audio(bad)
    (folder / "19-198.trans.txt").write_text("19-198-0000 HELLO W0RLD\n")
    with pytest.raises(DataError, match=r"19-198\.trans\.txt:1 \(19-198-0000\).*'0'"):
        speech_data.read_librispeech(tmp_path / "dev")


def test_greedy_ctc_decoding():
    path = "_hh_e_ll_l_oo"
    ids = [speech_data.ALPHABET.index(c) for c in path]
    logits = torch.full((len(ids), len(speech_data.ALPHABET)), -5.0)
    logits[torch.arange(len(ids)), ids] = 5.0
    assert speech_metric.greedy_decode(logits.argmax(-1)) == "hello"
    assert speech_metric.greedy_decode([0, 0, 0]) == ""


def test_beam_search_with_a_lexicon_returns_lexicon_words(tmp_path):
    """torchaudio's flashlight decoder (flashlight-text, a core dependency): where greedy decoding misspells
    a word, the lexicon-constrained beam search returns the closest word of the lexicon."""
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("cat\tc a t |\ncap\tc a p |\ndog\td o g |\n")
    frames = [("c", 1.0), ("a", 1.0), ("x", 0.5), ("t", 0.4)]  # greedy: "cax"; t beats p
    logits = torch.full((len(frames) + 1, len(speech_data.ALPHABET)), -4.0)
    for i, (char, score) in enumerate(frames):
        logits[i, speech_data.ALPHABET.index(char)] = score
    logits[2, speech_data.ALPHABET.index("t")] = 0.4
    logits[2, speech_data.ALPHABET.index("p")] = 0.1
    logits[len(frames), 0] = 1.0  # blank
    log_probs = logits.log_softmax(-1)
    assert speech_metric.greedy_decode(log_probs.argmax(-1)) == "caxt"
    decoder = speech_metric._beam_decoder(
        speech_config.Eval(decoder="beam", lexicon=str(lexicon), beam_size=10)
    )
    best = decoder(log_probs[None], torch.tensor([len(frames) + 1], dtype=torch.int32))[0][0]
    assert list(best.words) == ["cat"]


def test_wer_cer_by_hand():
    refs, hyps = ["the cat sat", "on the mat"], ["the cat sit", "on mat"]
    rates = speech_metric.error_rates(refs, hyps)
    assert rates["wer_pct"] == pytest.approx(100 * 2 / 6)  # 1 substitution + 1 deletion over 6 words
    # characters: "sat"->"sit" 1 edit; "on the mat"->"on mat" deletes "the " (4); 21 reference chars
    assert rates["cer_pct"] == pytest.approx(100 * 5 / 21)


@pytest.mark.parametrize("arch", ["deepspeech", "deepspeech2"])
def test_pruning_patterns_leave_convolutions_dense(tmp_path, arch):
    model = speech_model.build(_exp(tmp_path, arch))
    include = PRUNE_INCLUDE if arch == "deepspeech" else PRUNE_INCLUDE[1:]  # Deep Speech 2 has no fc layer
    pruner = Pruner(model, 0.5, exclude=("conv.*",) if arch == "deepspeech2" else (), include=include)
    names = set(pruner.masks)
    params = dict(model.named_parameters())
    convs = [n for n, p in params.items() if n.startswith("conv.") and p.dim() == 4]
    assert (arch == "deepspeech2") == bool(convs)
    for n in convs:
        assert n not in names and (params[n] != 0).all()
    recurrent = [
        n for n in params if ".weight_ih_l" in n or ".weight_hh_l" in n or n.startswith("rnn.weight")
    ]
    linear = [n for n, p in params.items() if (n.startswith("fc") or n.startswith("out")) and p.dim() == 2]
    assert recurrent and linear and names == set(recurrent) | set(linear)
    assert all(abs(s - 0.5) < 0.01 for s in pruner.sparsity().values())


def test_unknown_model_key_and_beam_without_lexicon_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.layers: unknown key"):
        _exp(tmp_path, model={"layers": 3})
    with pytest.raises(ConfigError, match="eval.lexicon: required by decoder 'beam'"):
        _exp(tmp_path, decode={"decoder": "beam"})


def test_synthesiser_is_deterministic_for_a_seed():
    counts = {"train": 1, "dev": 1, "test": 2}
    a = spoken.speaker_audio(spoken.CorpusSpec(seed=7, utterances_per_speaker=counts), "test", 0)
    b = spoken.speaker_audio(spoken.CorpusSpec(seed=7, utterances_per_speaker=counts), "test", 0)
    c = spoken.speaker_audio(spoken.CorpusSpec(seed=8, utterances_per_speaker=counts), "test", 0)
    assert [t for t, _ in a] == [t for t, _ in b] != [t for t, _ in c]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == np.float32 and len(x) > 8000 and np.abs(x).max() <= 1.0
        assert np.array_equal(x, y)  # bit-identical samples, not merely similar


def test_end_to_end_tiny_corpus(tiny):
    base, summary = tiny
    assert summary["train"]["utterances"] == 6 * len(spoken.SPEAKERS["train"])
    assert (base / "spoken" / "test" / "201" / "1" / "201-1.trans.txt").is_file()
    # the same reader serves the embedded corpus
    assert len(speech_data.read_librispeech(base / "spoken" / "dev")) == 2 * len(spoken.SPEAKERS["dev"])
    for arch in ("deepspeech", "deepspeech2"):
        exp = _exp(base, arch, utterances_per_speaker=COUNTS)
        torch.manual_seed(0)
        model = speech_model.build(exp)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        batch = next(iter(speech_data.train_loader(exp, seed=0, epoch=0)))
        losses = []
        for _ in range(8):  # overfit one batch: the loss must go down
            value = speech_metric.loss(model, batch, "cpu")
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        rates, out = speech_metric.evaluate(model, exp, "test", "cpu", n_samples=3)
        assert 0 <= rates["wer_pct"] <= 500 and 0 <= rates["cer_pct"] <= 500
        assert [s["id"] for s in out] == ["201-1-0000", "201-1-0001", "202-1-0000"]
        assert set(speech_metric.monitor(model, exp, "cpu")) == {"wer_pct", "cer_pct"}
    ds2 = _exp(base, "deepspeech2", utterances_per_speaker=COUNTS)
    first = next(iter(speech_data.train_loader(ds2, seed=0, epoch=0)))["lengths"]
    assert first.tolist() == sorted(first.tolist())  # SortaGrad: epoch 0 shortest first
    assert first.max() <= speech_data.dataset(ds2, "train").lengths.sort().values[7]


def test_prepare_writes_a_lexicon_of_the_training_words(tiny, tmp_path):
    """Flashlight format, exactly the distinct words of the training transcripts, sorted; rewritten with the
    corpus when its spec changes."""
    base, summary = tiny
    words = _words(base / "spoken" / "train")
    lines = (base / "spoken" / "lexicon.txt").read_text().splitlines()
    assert lines == [f"{w}\t{' '.join(w)} |" for w in sorted(words)]
    assert summary["lexicon_words"] == len(words) > 10
    assert not list((base / "spoken").glob("lexicon.txt.*"))  # no temporary file left behind
    out = tmp_path / "words.txt"
    assert speech_data.write_lexicon(["stop can't", "can't  stop"], out) == 2
    assert out.read_text() == "can't\tc a n ' t |\nstop\ts t o p |\n"
    # data prepared before lexicons existed get one without being synthesised again
    shutil.copytree(base / "spoken", tmp_path / "spoken")
    (tmp_path / "spoken" / "lexicon.txt").unlink()
    assert prepare.prepare(_exp(tmp_path, utterances_per_speaker=COUNTS))["summary"] == summary
    assert (tmp_path / "spoken" / "lexicon.txt").read_text() == (base / "spoken" / "lexicon.txt").read_text()
    # another corpus seed regenerates the corpus in place, and its lexicon with it
    one = {"train": 1, "dev": 1, "test": 1}
    again = prepare.prepare(_exp(tmp_path, utterances_per_speaker=one, corpus_seed=99))["summary"]
    new_words = _words(tmp_path / "spoken" / "train")
    assert new_words != words and again["lexicon_words"] == len(new_words)
    lines = (tmp_path / "spoken" / "lexicon.txt").read_text().splitlines()
    assert lines == [f"{w}\t{' '.join(w)} |" for w in sorted(new_words)]


def test_lexicon_path_relative_to_the_data_folder_and_missing_is_data_error(tiny, tmp_path):
    base, _ = tiny
    exp = _exp(base, decode={"decoder": "beam", "lexicon": "lexicon.txt"}, utterances_per_speaker=COUNTS)
    assert speech_metric.eval_file(exp, "lexicon") == base / "spoken" / "lexicon.txt"
    absolute = tmp_path / "words.txt"
    absolute.write_text("cat\tc a t |\n")
    exp = _exp(base, decode={"decoder": "beam", "lexicon": str(absolute)}, utterances_per_speaker=COUNTS)
    assert speech_metric.eval_file(exp, "lexicon") == absolute
    missing = _exp(base, decode={"decoder": "beam", "lexicon": "nowhere.txt"}, utterances_per_speaker=COUNTS)
    model, calls = speech_model.build(missing), []
    model.register_forward_hook(lambda *_: calls.append(1))
    where = re.escape(str(base / "spoken" / "nowhere.txt"))
    with pytest.raises(DataError, match=f"^{where}: lexicon file is missing"):
        speech_metric.evaluate(model, missing, "test", "cpu")
    assert calls == []  # raised before the model ran on any batch
    with pytest.raises(DataError, match=f"^{where}: lexicon file is missing"):
        speech_metric.check(missing)  # what evaluating a checkpoint checks before loading it


def test_beam_evaluate_also_reports_greedy_from_the_same_pass(tiny):
    base, _ = tiny
    greedy = _exp(base, utterances_per_speaker=COUNTS)
    beam = _exp(
        base,
        decode={"decoder": "beam", "lexicon": "lexicon.txt", "beam_size": 10},
        utterances_per_speaker=COUNTS,
    )
    torch.manual_seed(0)
    model, calls = speech_model.build(beam), []
    model.register_forward_hook(lambda *_: calls.append(1))
    plain, _ = speech_metric.evaluate(model, greedy, "test", "cpu")
    assert set(plain) == {"wer_pct", "cer_pct"}
    calls.clear()
    both, shown = speech_metric.evaluate(model, beam, "test", "cpu", n_samples=10_000)
    assert set(both) == {"wer_pct", "cer_pct", "greedy_wer_pct", "greedy_cer_pct"}
    assert len(calls) == len(list(speech_data.eval_loader(beam, "test", 16)))  # one forward pass per batch
    assert both["greedy_wer_pct"] == plain["wer_pct"] and both["greedy_cer_pct"] == plain["cer_pct"]
    refs, hyps = [s["reference"] for s in shown], [s["hypothesis"] for s in shown]  # the beam's output
    assert speech_metric.error_rates(refs, hyps) == {k: both[k] for k in ("wer_pct", "cer_pct")}


def test_features_of_another_corpus_are_never_read(tmp_path):
    """Point a real-corpus row at another folder: prepare caches that corpus' features, not the first's."""
    lines = [("19-198-0000", "HELLO WORLD"), ("19-198-0001", "IT'S A TEST")]
    for corpus, seconds in (("a", 0.3), ("b", 0.6)):
        for split in ("train", "dev", "test"):
            _write_librispeech(tmp_path / corpus / split, lines, seconds=seconds)

    def row(folder):
        entry = {
            "track": "speech",
            "dataset": "librispeech",
            "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}],
        }
        options = RunOptions(data_root=str(tmp_path / "data"))
        return parse_row("ds", entry, str(tmp_path / folder)).experiment(options)

    first = prepare.prepare(row("a"))
    second = prepare.prepare(row("b"))
    assert first["fingerprint"] != second["fingerprint"]
    frames = speech_data.dataset(row("b"), "train").lengths.tolist()
    assert frames == [61, 61]  # 0.6 s at a 10 ms hop: corpus b's, not a's 31 frames
