"""Speech track: reader, synthesiser, CTC decoding, WER/CER, pruning patterns, errors, a short end-to-end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import leave_process_group, reachable_objects
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dsd.core.masks import Pruner
from dsd.engine import prepare
from dsd.errors import ConfigError, DataError
from dsd.report.tables import item_shares
from dsd.spec import RunOptions, parse_row
from dsd.tracks.speech import config as speech_config
from dsd.tracks.speech import data as speech_data
from dsd.tracks.speech import metric as speech_metric
from dsd.tracks.speech import model as speech_model
from dsd.tracks.speech import synthetic as spoken

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
    manifest.write_text(json.dumps(row | {"transcript": 5}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'audio' and 'transcript' must be text"):
        speech_data.read_manifest(manifest)


def test_a_failed_feature_build_leaves_no_partial_cache(tmp_path, tiny):
    root = tmp_path / "corpus"
    shutil.copytree(tiny[0], root)
    exp = _exp(root, utterances_per_speaker=COUNTS)
    bad = Path(speech_data._sources(exp, "val")[0]["audio"])
    bad.write_bytes(b"not audio")
    out = tmp_path / "cache" / "val"
    with pytest.raises(DataError, match=bad.name):
        speech_data.build_features(exp, "val", out)
    assert list(out.parent.iterdir()) == []  # not even the half-written temporary folder


def test_featurising_shows_its_progress_in_a_job_log(tmp_path, tiny, capfd):
    """A pipeline job's stderr is its log file, not a terminal: featurising a corpus (minutes for LibriSpeech's
    28k utterances) still says how far it got there."""
    exp = _exp(tiny[0], utterances_per_speaker=COUNTS)
    capfd.readouterr()
    speech_data.build_features(exp, "val", tmp_path / "cache" / "val")
    assert re.search(r"features val: 100%.*\| (\d+)/\1 ", capfd.readouterr().err)


def test_every_batch_of_a_bucketed_order_is_one_bucket_also_when_the_last_is_short():
    """70 utterances of distinct lengths, batches of 16, one window: the buckets are runs of 16 consecutive
    lengths and the loader's batches must be those. The short remainder shuffled into the middle shifted every
    later batch across two buckets (up to twice the padding)."""
    lengths = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    for seed in range(10):
        order = speech_data.bucketed_order(lengths, 16, torch.Generator().manual_seed(seed), window=5)
        assert sorted(order) == list(range(70))
        spans = [
            int(lengths[order[b : b + 16]].max() - lengths[order[b : b + 16]].min()) for b in range(0, 64, 16)
        ]
        assert spans == [15] * 4 and sorted(lengths[order[64:]].tolist()) == list(range(64, 70)), seed


@pytest.mark.parametrize("arch", ["deepspeech", "deepspeech2"])
def test_training_utterances_ctc_cannot_align_are_counted_and_named_before_training(tiny, arch, capfd):
    """CTC needs an output frame per character and a blank between two equal ones; with too large a stride an
    utterance has fewer frames, its loss is zeroed (zero_infinity) and it trains nothing, which nothing said."""
    exp = _exp(tiny[0], arch, model={"stride": 8}, utterances_per_speaker=COUNTS)
    ds = speech_data.dataset(exp, "train")
    needed = []
    for i in range(len(ds)):
        text = ds.characters[ds.target_offsets[i] : ds.target_offsets[i + 1]].tolist()
        needed.append(len(text) + sum(a == b for a, b in zip(text, text[1:], strict=False)))
    frames = speech_model.output_lengths(exp.model, ds.lengths)
    short = sum(f < n for f, n in zip(frames.tolist(), needed, strict=True))
    assert 0 < short < len(ds) and speech_data.unalignable(exp, ds) == short
    speech_data.check(exp)
    assert f"{short} of {len(ds)} training utterances have more characters than" in capfd.readouterr().err
    assert speech_data.unalignable(_exp(tiny[0], arch, utterances_per_speaker=COUNTS), ds) == 0


def test_a_cache_another_job_finished_first_is_kept_and_the_later_build_dropped(tmp_path, tiny):
    """Two builds of one split at once (a DDP job's ranks, two jobs sharing a cache): the second to finish found
    the folder in place between its check and its rename, and failed on the non-empty folder (OSError)."""
    exp = _exp(tiny[0], utterances_per_speaker=COUNTS)
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        speech_data.build_features(exp, "val", out)
    second.rename(tmp_path / "cache")  # a finished build ready to move, and a cache already in place
    first.rename(second)
    speech_data.move_into_place(tmp_path / "cache", second)
    assert list(tmp_path.iterdir()) == [second] and sorted(p.name for p in second.iterdir())


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


# The DSD paper's Table 6 (Deep Speech 1) and Table 8 (Deep Speech 2): parameters per layer.
TABLE_6 = [1_814_528, 1_049_600, 1_049_600, 3_146_752, 1_049_600, 29_725]  # total 8,139,805
TABLE_8 = [19_616, 239_168, 8_507_840, *[9_296_320] * 6, 3_101_120, 95_054]  # total 67,740,718
PAPER_DS1 = {"arch": "deepspeech", "hidden": 1024, "rnn_hidden": 1024, "rnn_type": "rnn", "context": 5}
PAPER_DS2 = {"arch": "deepspeech2", "conv_channels": 32, "conv_kernels": [[41, 11], [21, 11]], "rnn_hidden": 1760,
             "rnn_layers": 7, "rnn_type": "rnn"}  # fmt: skip


@pytest.mark.parametrize(("paper", "table"), [(PAPER_DS1, TABLE_6), (PAPER_DS2, TABLE_8)])
def test_the_paper_models_match_the_tables_layer_by_layer(tmp_path, paper, table):
    exp = _exp(tmp_path, paper["arch"], model=paper, feature="logspec")
    with torch.device("meta"):
        layers = speech_model.layer_counts(speech_model.build(exp))
    assert len(layers) == len(table)
    for (name, ours), theirs in zip(layers[:-1], table[:-1], strict=True):
        assert abs(ours - theirs) <= 0.01 * theirs, (
            name,
            ours,
            theirs,
        )  # every layer within 1% (here: exact)
    if paper["arch"] == "deepspeech":
        assert layers[-1][1] == table[-1] and sum(n for _, n in layers) == 8_139_805
    else:  # the output layer predicts 29 characters; the table's 95,054 fit no 29-symbol layer (a stated deviation)
        assert layers[-1][1] == 1760 * 29 + 29
        assert abs(sum(n for _, n in layers) - 67_740_718) <= 0.001 * 67_740_718


@pytest.mark.parametrize(
    ("arch", "include", "dense"),
    [
        ("deepspeech", ("fc*.weight", "rnn.*weight*"), {"layer0.weight", "out.weight"}),
        ("deepspeech2", ("rnn.*weight*", "fc.weight"), {"conv.0.weight", "conv.1.weight", "out.weight"}),
    ],
)
def test_the_paper_pruning_patterns(tmp_path, arch, include, dense):
    """Deep Speech 1: layers 1-4 pruned, layer 0 and the output dense; Deep Speech 2: recurrent and FC layers
    pruned, convolutions and output dense. The shared input matrix of a plain RNN layer is pruned with it."""
    model = speech_model.build(_exp(tmp_path, arch, model={"rnn_type": "rnn"}))
    pruner = Pruner(model, 0.5, include=include)
    weights = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert weights - set(pruner.masks) == dense
    assert all(abs(s - 0.5) < 0.01 for s in pruner.sparsity().values())
    assert "rnn.rnn.weight_ih_l0" not in dict(model.named_parameters())  # the identity input is a buffer


def test_deep_speech_2_output_does_not_depend_on_the_padding_of_its_batch(tmp_path):
    """The convolutions' batch norm counts an utterance's frames only: alone or padded beside a longer one, its
    output is the same in evaluation, and in training the padding's values change nothing."""
    exp = _exp(tmp_path, "deepspeech2", model={"conv_channels": 4, "conv_kernels": [[5, 5], [5, 5]], "stride": 3,
                                              "rnn_hidden": 16, "rnn_layers": 2, "rnn_type": "gru"})  # fmt: skip
    torch.manual_seed(0)
    model = speech_model.build(exp)
    short, long = torch.randn(1, 30, 40), torch.randn(1, 60, 40)
    padded = torch.cat([torch.nn.functional.pad(short, (0, 0, 0, 30)), long])
    lengths = torch.tensor([30, 60])
    model.eval()
    alone, n = model(short, torch.tensor([30]))
    batched, _ = model(padded, lengths)
    assert torch.allclose(batched[0, : n[0]], alone[0, : n[0]], atol=1e-5)
    model.train()
    garbage = padded.clone()
    garbage[0, 30:] = 1e3  # what the padding holds must not reach the statistics
    assert torch.allclose(
        model(padded, lengths)[0][0, : n[0]], model(garbage, lengths)[0][0, : n[0]], atol=1e-5
    )


def test_ctc_is_summed_per_utterance_and_averaged_over_the_batch(tiny):
    base, _ = tiny
    exp = _exp(base, utterances_per_speaker=COUNTS)
    torch.manual_seed(0)
    model = speech_model.build(exp).eval()
    ds = speech_data.dataset(exp, "train")
    batch = speech_data.collate([ds[i] for i in range(4)])
    with torch.no_grad():
        per_utterance = [
            float(speech_metric.loss(model, speech_data.collate([ds[i]]), "cpu")) for i in range(4)
        ]
        together = float(speech_metric.loss(model, batch, "cpu"))
    assert together == pytest.approx(sum(per_utterance) / 4, rel=1e-4)  # not divided by transcript lengths
    assert len({round(v, 3) for v in per_utterance}) > 1


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


def test_a_job_killed_while_a_speaker_is_synthesised_leaves_no_temporary_files(tmp_path):
    """kill -9 of a prepare job while eSpeak's worker runs (it synthesises a speaker at a time): its requests
    and up to a speaker's audio (6 MB) were left in a folder of the machine's tmp, which nothing removes."""
    script = (
        "import os, signal, subprocess\n"
        "from dsd.tracks.speech import synthetic\n"
        "subprocess.run = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # while the worker runs\n"
        "synthetic.speak([('one two', 'en-us', 'm3', 150, 50)])\n"
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    killed = subprocess.run([sys.executable, "-c", script], env=os.environ | {"TMPDIR": str(tmp)}, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not list(tmp.iterdir())


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
        rates, out, items = speech_metric.evaluate(model, exp, "test", "cpu", n_samples=3)
        assert 0 <= rates["wer_pct"] <= 500 and 0 <= rates["cer_pct"] <= 500
        # per-utterance word errors: the report's interval resamples them; their shares average to the WER
        assert np.mean(item_shares(items)) == pytest.approx(rates["wer_pct"], rel=1e-9)
        assert [s["id"] for s in out] == ["201-1-0000", "201-1-0001", "202-1-0000"]
        assert set(speech_metric.monitor(model, exp, "cpu")) == {"wer_pct", "cer_pct"}
    ds2 = _exp(base, "deepspeech2", utterances_per_speaker=COUNTS)
    first = next(iter(speech_data.train_loader(ds2, seed=0, epoch=0, first=True)))["lengths"]
    assert first.tolist() == sorted(first.tolist())  # SortaGrad: training's first epoch, shortest first
    assert first.max() <= speech_data.dataset(ds2, "train").lengths.sort().values[7]
    later = [b["lengths"] for b in speech_data.train_loader(ds2, seed=0, epoch=0)]  # any other epoch: buckets
    assert later[0].tolist() != first.tolist()
    spread = [float(b.max() - b.min()) for b in later]
    shuffled = [
        b["lengths"]
        for b in speech_data.train_loader(
            _exp(base, "deepspeech2", utterances_per_speaker=COUNTS, length_buckets=0), seed=0, epoch=0
        )
    ]
    assert sum(spread) < sum(float(b.max() - b.min()) for b in shuffled)  # less padding than a plain shuffle


def test_a_deep_speech_2_dense_phase_trains_its_first_epoch_shortest_first(tiny, tmp_path, monkeypatch):
    """SortaGrad through the trainer: the dense phase's first epoch in length order, the next one bucketed."""
    from conftest import parse, prepare_data, train

    base, _ = tiny
    row = {"track": "speech", "dataset": "spoken", "data": {"utterances_per_speaker": COUNTS},
           "model": {"arch": "deepspeech2", "conv_channels": 4, "rnn_hidden": 16, "rnn_layers": 1},
           "train": {"batch_size": 8}, "phases": [{"kind": "dense", "epochs": 2, "lr": 0.01}]}  # fmt: skip
    config = parse({"output_dir": str(tmp_path), "data_root": str(base), "seeds": [0], "rows": ["ds2"],
                    "threads": 1, "wandb": {"mode": "disabled"}, "experiments": {"ds2": row}})  # fmt: skip
    prepare_data(config, "ds2")
    seen, loss = [], speech_metric.loss

    def recording(model, batch, device):
        seen.append(batch["lengths"].tolist())
        return loss(model, batch, device)

    monkeypatch.setattr(speech_metric, "loss", recording)
    train(config, "ds2", 0, "dense")
    half = len(seen) // 2
    first, second = sum(seen[:half], []), sum(seen[half:], [])
    assert first == sorted(first) and second != sorted(second), seen


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
    # another corpus seed regenerates the corpus in place, and its lexicon with it; the old corpus' feature
    # caches are removed (their names keep them from being read, not from filling the disk)
    speech_data.dataset(_exp(tmp_path, utterances_per_speaker=COUNTS), "train")
    old_caches = set((tmp_path / "spoken" / "features").iterdir())
    assert old_caches
    one = {"train": 1, "dev": 1, "test": 1}
    again = prepare.prepare(_exp(tmp_path, utterances_per_speaker=one, corpus_seed=99))["summary"]
    assert not old_caches & set((tmp_path / "spoken" / "features").glob("*"))
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
    plain, *_ = speech_metric.evaluate(model, greedy, "test", "cpu")
    assert set(plain) == {"wer_pct", "cer_pct"}
    calls.clear()
    both, shown, items = speech_metric.evaluate(model, beam, "test", "cpu", n_samples=10_000)
    assert set(both) == {"wer_pct", "cer_pct", "greedy_wer_pct", "greedy_cer_pct"}
    assert len(calls) == len(list(speech_data.eval_loader(beam, "test", 16)))  # one forward pass per batch
    assert both["greedy_wer_pct"] == plain["wer_pct"] and both["greedy_cer_pct"] == plain["cer_pct"]
    refs, hyps = [s["reference"] for s in shown], [s["hypothesis"] for s in shown]  # the beam's output
    assert speech_metric.error_rates(refs, hyps) == {k: both[k] for k in ("wer_pct", "cer_pct")}
    assert np.mean(item_shares(items)) == pytest.approx(both["wer_pct"], rel=1e-9)  # the beam's, not greedy


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


def test_wsj_transcripts_normalised_by_the_written_rules():
    cases = {
        "THE U.S. ECONOMY [loud_breath] GREW \\PERIOD": "the us economy grew period",
        "A PARTIAL WO- WORD -TEND HERE": "a partial word here",
        "*MISPRONOUNCED* <INSERTED> TWENTY-FIVE": "mispronounced inserted twenty five",
        "IT'S \\COMMA OK~ [door_slam]": "it's comma ok",
        "TEN %PERCENT &AMPERSAND": "ten percent ampersand",
    }
    for line, expected in cases.items():
        assert speech_data.normalise_wsj(line, "x.dot:1") == expected
    with pytest.raises(DataError, match=r"x.dot:3: .*'3'"):
        speech_data.normalise_wsj("ROOM 3", "x.dot:3")


def test_wsj_backslash_quoting_and_verbalised_punctuation_marks_are_read_as_spoken():
    """The LDC's .dot files quote marks inside words with a backslash ("isn\\'t", "I\\. B\\. M\\.", Kaldi's
    normalize_transcript.pl shows both) and write verbalised punctuation after its mark (",COMMA", "--DASH", the
    CMU dictionary's words): each was a DataError, so one possessive in si284 stopped the whole corpus."""
    cases = {
        "OF COURSE THERE ISN\\'T ANY GUARANTEE THE COMPANY\\'S HOT HAND [misc_noise]": (
            "of course there isn't any guarantee the company's hot hand"
        ),
        "COMPUTERS I\\. B\\. M\\. INTRODUCED": "computers i b m introduced",
        "RATES \\,COMMA \\(LEFT-PAREN FELL \\)RIGHT-PAREN \\?QUESTION-MARK": (
            "rates comma left paren fell right paren question mark"
        ),
        "HE SAID --DASH \\;SEMI-COLON \\.PERIOD": "he said dash semi colon period",
    }
    for line, expected in cases.items():
        assert speech_data.normalise_wsj(line, "x.dot:1") == expected


def test_wsj_verbalised_single_quotes_lose_their_unspoken_apostrophe():
    """The CMU dictionary's single-quote words ("'SINGLE-QUOTE", "'END-INNER-QUOTE") kept their mark, the one
    verbalised punctuation that did: "'single quote" taught an apostrophe the reader never spoke."""
    cases = {
        "HE SAID \\'SINGLE-QUOTE YES \\'END-INNER-QUOTE 'QUOTE": "he said single quote yes end inner quote quote",
        "LET \\'EM GO \"DOUBLE-QUOTE": "let 'em go double quote",
    }
    for line, expected in cases.items():
        assert speech_data.normalise_wsj(line, "x.dot:1") == expected


def write_wsj(root, utterances, seconds=0.4, shorten=False):
    """A tiny WSJ disc layout: SPHERE .wv1 audio (written by soundfile), .dot transcripts, an .ndx index."""
    sr = 16000
    t = np.arange(int(sr * seconds)) / sr
    lines = []
    for i, (uid, text) in enumerate(utterances):
        speaker = uid[:3]
        folder = root / "wsj0" / "si_tr_s" / speaker
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(
            folder / f"{uid}.wv1",
            0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t),
            sr,
            format="NIST",
            subtype="PCM_16",
        )
        dots = root / "wsj0" / "transcrp" / "dots" / "si_tr_s" / speaker
        dots.mkdir(parents=True, exist_ok=True)
        with open(dots / f"{uid[:6]}00.dot", "a") as f:
            f.write(f"{text} ({uid})\n")
        lines.append(f"11_1_1:wsj0/si_tr_s/{speaker}/{uid}.wv1")
    index = root / "wsj0" / "doc" / "indices" / "train" / "tr_s_wv1.ndx"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(";; a comment, as in the LDC index files\n" + "\n".join(lines) + "\n")
    if shorten:  # what the discs hold: a SPHERE header announcing shorten, then compressed data
        wav = root / "wsj0" / "si_tr_s" / utterances[0][0][:3] / f"{utterances[0][0]}.wv1"
        head = b"NIST_1A\n   1024\nsample_coding -s26 pcm,embedded-shorten-v2.00\nend_head\n"
        wav.write_bytes(head.ljust(1024) + b"ajkg" * 16)
    return index


def test_wsj_layout_reads_sphere_audio_and_dot_transcripts(tmp_path):
    index = write_wsj(tmp_path, [("011c0201", "THE U.S. [breath] ECONOMY"), ("011c0202", "GREW \\PERIOD")])
    items = speech_data.read_wsj_index(index, tmp_path)
    assert [(i["id"], i["transcript"]) for i in items] == [
        ("011c0201", "the us economy"),
        ("011c0202", "grew period"),
    ]
    assert speech_data.load_audio(items[0]["audio"]).shape == (6400,)
    index.write_text(index.read_text() + "11_1_1:wsj0/si_tr_s/011/011c0299.wv1\n")
    with pytest.raises(DataError, match=r"tr_s_wv1.ndx:4: no transcript for 011c0299"):
        speech_data.read_wsj_index(index, tmp_path)
    assert len(speech_data.read_wsj_index(index, tmp_path, "skip")) == 2  # training: left out, counted


def test_wsj_evaluation_indices_without_the_suffix_and_converted_audio(tmp_path):
    """The eval indices (si_et_*.ndx, Nov'93's h1_p0.ndx) name utterances without `.wv1`; a file converted
    with sph2pipe as the error says (utt.wav beside utt.wv1) is read in the shorten-compressed one's place."""
    index = write_wsj(tmp_path, [("011c0201", "HELLO"), ("011c0202", "WORLD")], shorten=True)
    index.write_text(index.read_text().replace(".wv1", ""))
    items = speech_data.read_wsj_index(index, tmp_path)
    folder = tmp_path / "wsj0" / "si_tr_s" / "011"
    assert [i["audio"] for i in items] == [str(folder / "011c0201.wv1"), str(folder / "011c0202.wv1")]
    sf.write(folder / "011c0201.wav", np.zeros(3200), 16000, subtype="PCM_16")  # sph2pipe -f rif's output
    items = speech_data.read_wsj_index(index, tmp_path)
    assert items[0]["audio"] == str(folder / "011c0201.wav")
    assert speech_data.load_audio(items[0]["audio"]).shape == (3200,)


def test_the_corpus_fingerprint_covers_what_an_index_or_manifest_names(tmp_path):
    """The fingerprint that keys the features cache and every run's identity covered the WSJ index and manifest
    files alone: a .dot transcript edited, a `.wav` converted beside a `.wv1`, or an audio file a manifest names
    replaced, and the old features were read as this corpus's."""
    from dsd.engine.prepare import content_fingerprint

    def fingerprint(dataset, split_file):
        entry = {"track": "speech", "dataset": dataset, "model": {"arch": "deepspeech"},
                 "data": {"train": split_file, "val": split_file, "test": split_file},
                 "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}  # fmt: skip
        return content_fingerprint(
            parse_row("ds", entry, None).experiment(RunOptions(data_root=str(tmp_path)))
        )

    write_wsj(tmp_path / "wsj", [("011c0201", "HELLO"), ("011c0202", "WORLD")])
    index = "wsj0/doc/indices/train/tr_s_wv1.ndx"
    seen = [fingerprint("wsj", index)]
    dot = next((tmp_path / "wsj").rglob("*.dot"))
    dot.write_text(dot.read_text().replace("HELLO", "HALLO"))
    seen.append(fingerprint("wsj", index))
    sf.write(tmp_path / "wsj" / "wsj0" / "si_tr_s" / "011" / "011c0202.wav", np.zeros(3200), 16000)
    seen.append(fingerprint("wsj", index))
    corpus = tmp_path / "librispeech"
    corpus.mkdir()
    sf.write(corpus / "a.flac", np.zeros(1600), 16000)
    (corpus / "train.jsonl").write_text(json.dumps({"audio": "a.flac", "transcript": "a cat"}) + "\n")
    seen.append(fingerprint("librispeech", "train.jsonl"))
    sf.write(corpus / "a.flac", np.zeros(3200), 16000)
    seen.append(fingerprint("librispeech", "train.jsonl"))
    assert len(set(seen)) == len(seen), seen


def test_a_shorten_compressed_sphere_file_says_how_to_convert_it(tmp_path):
    write_wsj(tmp_path, [("011c0201", "HELLO")], shorten=True)
    with pytest.raises(DataError, match=r"011c0201.wv1: shorten-compressed SPHERE .*sph2pipe"):
        speech_data.load_audio(tmp_path / "wsj0" / "si_tr_s" / "011" / "011c0201.wv1")


def test_cached_features_are_read_from_disk_as_computed(tiny):
    base, _ = tiny
    exp = _exp(base, utterances_per_speaker=COUNTS)
    ds = speech_data.dataset(exp, "test")
    item = next(i for i in speech_data.read_librispeech(base / "spoken" / "test") if i["id"] == ds.ids[3])
    direct = speech_data.features(speech_data.load_audio(item["audio"]), exp.data)
    assert torch.equal(ds[3][0], direct)


def test_a_features_cache_index_holds_no_object_per_utterance(tmp_path):
    """LibriSpeech's 281k training utterances: a tensor of character ids each cost ~500 MB in every process,
    and lists of ids and transcripts were copied into each loader worker as it read them. The index is held
    in arrays (no more objects for more utterances); the items are what they were."""
    counts = []
    for n in (5, 500):
        folder = tmp_path / str(n)
        folder.mkdir()
        texts, lengths = (
            [f"utterance {'ab' * (i % 7)} number {'x' * (i % 11)} it's" for i in range(n)],
            [i % 5 + 1 for i in range(n)],
        )
        index = {"format": speech_data.FEATURES_FORMAT, "bins": 3, "ids": [f"spk-{i}" for i in range(n)],
                 "texts": texts, "lengths": lengths}  # fmt: skip
        (folder / "index.json").write_text(json.dumps(index))
        frames = np.arange(sum(lengths) * 3, dtype=np.float32)
        frames.tofile(folder / "frames.f32")
        ds = speech_data.SpeechSet(folder)
        start = 3 * sum(lengths[: n - 1])
        features, target, uid, text = ds[n - 1]
        assert torch.equal(features, torch.from_numpy(frames[start : start + 3 * lengths[-1]]).view(-1, 3))
        assert torch.equal(target, torch.tensor(speech_data.encode(texts[-1], "")))  # int64, as before
        assert (uid, text, len(ds)) == (f"spk-{n - 1}", texts[-1], n)
        counts.append(sum(reachable_objects(getattr(ds, name)) for name in vars(ds)))
    assert counts[0] == counts[1]


def test_evaluation_batches_utterances_of_similar_lengths_and_reports_them_in_the_splits_order(tmp_path):
    """In the corpus' order a batch was padded to its longest utterance (~3.5x the frames for 64 LibriSpeech-like
    utterances), which every layer outside the packed RNN computes on. Batched by length, the padding goes;
    the results are each utterance's own, listed in the split's order."""
    root, t = tmp_path / "ls", np.arange(16000) / 16000
    for split in ("train", "dev", "test"):
        folder = _write_librispeech(
            root / split, [(f"19-198-{i:04d}", "A CAT" if i % 3 else "THE DOG") for i in range(8)]
        )
        for i in range(0, 8, 2):  # short and long utterances alternate
            sf.write(folder / f"19-198-{i:04d}.flac", 0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t), 16000)
    entry = {"track": "speech", "dataset": "librispeech", "model": {"hidden": 16, "rnn_hidden": 8},
             "eval": {"batch_size": 4}, "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}  # fmt: skip
    exp = parse_row("ls", entry, str(root)).experiment(
        RunOptions(data_root=str(tmp_path), output_dir=str(tmp_path))
    )
    prepare.prepare(exp)
    ds = speech_data.dataset(exp, "test")
    batches = list(speech_data.eval_loader(exp, "test", 4))
    assert sum(b["features"].shape[:2].numel() for b in batches) == int(ds.lengths.sum())  # no padding
    torch.manual_seed(0)
    model = speech_model.build(exp)
    with torch.no_grad():
        model.out.bias[1:] += 3.0  # characters, not blanks: each utterance's hypothesis is its own
    out = speech_metric._decode(model, exp, "test", "cpu", exp.eval)
    alone = speech_metric._decode(model, exp, "test", "cpu", speech_config.Eval(batch_size=1))
    assert out["ids"] == list(ds.ids) == sorted(ds.ids) and out["refs"] == list(ds.texts)
    assert out["greedy"] == alone["greedy"] and len(set(out["greedy"])) > 1


def _talking_model(exp):
    """A model whose hypotheses differ from one utterance to another (its output layer's weights scaled up)."""
    torch.manual_seed(0)
    model = speech_model.build(exp)
    with torch.no_grad():
        model.out.weight *= 30.0
    utterances = []  # the utterances each forward pass decodes
    model.register_forward_pre_hook(lambda module, args: utterances.append(len(args[1])))
    return model, utterances


def _sharded_validation(rank, world, init_file, base, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    exp = _exp(base, utterances_per_speaker=COUNTS)
    model, utterances = _talking_model(exp)
    monitored = speech_metric.monitor(model, exp, "cpu")  # one batch of 8 (train.batch_size): rank 1 has none
    decoded = speech_metric._decode(model, exp, "val", "cpu", speech_config.Eval(batch_size=3), shard=True)
    torch.save({"monitor": monitored, "decoded": decoded, "utterances": utterances}, f"{out_file}.{rank}")
    leave_process_group()


def test_the_per_epoch_validation_is_sharded_over_ddp_ranks_with_one_processs_wer(tmp_path, tiny):
    """Under DDP each rank decodes its whole batches of the length-sorted split (each utterance once, in the batch
    one process decodes it in) and every rank scores all the hypotheses: one process's WER to the last bit, and
    the per-utterance results in the split's order."""
    import torch.multiprocessing as mp

    base, _ = tiny
    exp = _exp(base, utterances_per_speaker=COUNTS)
    model, utterances = _talking_model(exp)
    alone = speech_metric.monitor(model, exp, "cpu")
    whole = speech_metric._decode(model, exp, "val", "cpu", speech_config.Eval(batch_size=3))
    assert utterances == [8, 3, 3, 2] and 0 < alone["cer_pct"] < 100 and len(set(whole["greedy"])) > 1
    out = tmp_path / "ranks"
    mp.spawn(_sharded_validation, args=(2, str(tmp_path / "init"), str(base), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
    assert [r["utterances"] for r in ranks] == [[8, 3, 2], [3]]  # batches 0 and 2 of 3, batch 1 of 3
    for r in ranks:
        assert r["monitor"] == alone and r["decoded"] == whole


class DeviceReads(TorchFunctionMode):
    """Records the Python-level calls that wait for a GPU and that meta refuses or makes without a copy: reads of
    a device tensor's values (`.item()`, `.tolist()`, `int()`...) and tensors made from Python numbers on the
    device (`torch.tensor`, `torch.as_tensor`, `new_tensor`: a blocking copy on a GPU)."""

    READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
    FACTORIES = ("tensor", "as_tensor", "new_tensor")

    def __init__(self, waits: list):
        super().__init__()
        self.waits = waits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (
            name in self.READS
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].device.type == "meta"
        ):
            self.waits.append(name)
        out = func(*args, **(kwargs or {}))
        if name in self.FACTORIES and out.device.type == "meta":
            self.waits.append(name)
        return out


class HostWaits(TorchDispatchMode):
    """Records the operations of a step that make the host wait for a GPU, with the meta device standing in for
    it (the same calls, no GPU needed): a tensor read back from the device (`.cpu()`, `.item()`, a boolean
    mask's true count) and a copy to the device that is not queued (`non_blocking`), which torch makes with a
    wait for all the work queued before it."""

    def __init__(self):
        super().__init__()
        self.waits = []
        self.calls = DeviceReads(self.waits)

    def __enter__(self):
        self.calls.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.calls.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == "meta" for t in tensors)
        to = torch.device(kwargs["device"]).type if kwargs.get("device") is not None else None
        name = func.__name__
        if on_device and (name.startswith(("_local_scalar_dense", "nonzero")) or to == "cpu"):
            self.waits.append(name)
        elif on_device and any(t.dtype == torch.bool for t in tensors) and name.startswith("index"):
            self.waits.append(f"{name} with a mask")
        elif self._blocking_copy_to_device(name, args, kwargs, to, on_device):
            self.waits.append(f"{name} to the device, blocking")
        return func(*args, **kwargs)

    @staticmethod
    def _blocking_copy_to_device(name, args, kwargs, to, on_device) -> bool:
        if name.startswith("_to_copy"):
            return to == "meta" and not on_device and not kwargs.get("non_blocking")
        if name.startswith("copy_") and args[0].device.type == "meta" and args[1].device.type == "cpu":
            return not (args[2:] or [kwargs.get("non_blocking")])[0]
        return False


@pytest.mark.parametrize("arch", ["deepspeech", "deepspeech2"])
@pytest.mark.parametrize("rnn_type", ["gru", "rnn"])
def test_a_speech_step_and_its_validation_forward_make_the_host_wait_for_no_device_work(
    tmp_path, arch, rnn_type
):
    """The model's forward and backward pass (training and evaluation mode) and the loss's copies of its batch
    queue their work on the device and read nothing back: the lengths stay on the host, where the batch is
    packed and the convolutions' frames are picked ("meta" stands in for the GPU). CTC is torch's, which reads
    the lengths on the host (passed there) and has no meta kernel: the step's loss is taken up to it."""
    exp = _exp(tmp_path, arch, model={"rnn_type": rnn_type, "stride": 3})
    torch.manual_seed(0)
    model = speech_model.build(exp).to("meta")
    features, lengths = torch.randn(3, 40, speech_config.n_features(exp.data)), torch.tensor([40, 25, 33])
    batch = {"features": features, "lengths": lengths, "targets": torch.tensor([3, 4, 5, 6, 7, 8]),
             "target_lengths": torch.tensor([2, 2, 2])}  # fmt: skip
    with HostWaits() as recorded, pytest.raises(NotImplementedError, match="_ctc_loss"):
        speech_metric.loss(model, batch, "meta")
    assert recorded.waits == []
    for training in (True, False):
        model.train(training)
        with HostWaits() as recorded:
            log_probs, out_lengths = model(features.to("meta", non_blocking=True), lengths)
            if training:
                log_probs.sum().backward()
        assert recorded.waits == [], (training, recorded.waits)
        assert out_lengths.device.type == "cpu" and log_probs.shape[:2] == (3, int(out_lengths.max()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def test_frames_picked_by_host_indices_give_the_boolean_masks_numbers_bitwise():
    """`_norm_frames` picks an utterance's frames by indices found on the host: the same output, gradients and
    running statistics, bit for bit, as the boolean mask on the device it replaces."""

    def by_mask(norm, x, lengths):  # the former arithmetic
        b, c, f, t = x.shape
        valid = torch.arange(t)[None, :] < lengths[:, None]
        frames = x.permute(0, 3, 1, 2)
        normed = norm(frames[valid].reshape(-1, c * f))
        out = torch.zeros(b, t, c, f, dtype=normed.dtype)
        out[valid] = normed.reshape(-1, c, f)
        return out.permute(0, 2, 3, 1)

    torch.manual_seed(0)
    x, lengths, weight = torch.randn(4, 3, 5, 17), torch.tensor([17, 9, 1, 12]), torch.randn(4, 3, 5, 17)
    results = []
    for norm_frames in (by_mask, speech_model._norm_frames):
        torch.manual_seed(1)
        norm, leaf = torch.nn.BatchNorm1d(15), x.clone().requires_grad_()
        with torch.no_grad():
            norm.weight.normal_(), norm.bias.normal_()
        out = norm_frames(norm, leaf, lengths)
        (out * weight).sum().backward()
        results.append(
            [out, leaf.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var]
        )
    for old, new in zip(*results, strict=True):
        assert torch.equal(_bits(old), _bits(new))


@pytest.mark.parametrize("rnn", [torch.nn.GRU, torch.nn.RNN])
def test_packing_with_host_lengths_gives_torchs_packing_numbers_bitwise(rnn):
    """`pack` and `unpack` (the sort's order queued to the device, the lengths never read back) around a
    recurrent layer: its output and gradients bit for bit those of torch's `pack_padded_sequence`
    (`enforce_sorted=False`) and `pad_packed_sequence`."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    x, lengths = torch.randn(5, 11, 6), torch.tensor([7, 11, 3, 11, 1])
    layer, weight = rnn(6, 4, batch_first=True, bidirectional=True), torch.randn(5, 11, 8)
    results = []
    for torchs in (True, False):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        if torchs:
            packed = pack_padded_sequence(leaf, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(layer(packed)[0], batch_first=True, total_length=11)
        else:
            packed, restore = speech_model.pack(leaf, lengths)
            out = speech_model.unpack(layer(packed)[0], restore, 11)
        (out * weight).sum().backward()
        results.append([out, leaf.grad, *(p.grad.clone() for p in layer.parameters())])
    for old, new in zip(*results, strict=True):
        assert torch.equal(_bits(old), _bits(new))


@pytest.mark.parametrize("arch", ["deepspeech", "deepspeech2"])
@pytest.mark.parametrize("rnn_type", ["gru", "rnn"])
def test_a_compiled_speech_model_trains_as_the_uncompiled_one(tmp_path, arch, rnn_type):
    """`compile: true` compiles the model the trainer steps: Dynamo failed inside the packed recurrence
    (`pad_packed_sequence` reads its batch sizes, data, on the host). That part now runs eagerly and the layers
    around it compile: the CTC loss and every gradient those of the uncompiled model, over batches of changing
    lengths (each a recompile, then dynamic shapes). AOTAutograd's tracing is the trainer's (inductor's kernels
    only round differently; compiling them takes most of a minute on a 2-core CPU, and masks under inductor
    through the trainer are test_masks' vision test)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    exp = _exp(tmp_path, arch, model={"rnn_type": rnn_type, "hidden": 16, "rnn_hidden": 8, "rnn_layers": 2})
    torch.manual_seed(0)
    model = speech_model.build(exp)
    torch._dynamo.reset()  # no graph of another test's model: this one's are compiled and counted
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    targets, target_lengths = torch.randint(1, 29, (3, 4)), torch.tensor([4, 3, 2])
    for frames in ([41, 30, 17], [52, 52, 40], [23, 19, 12]):
        features, lengths = torch.randn(3, max(frames), 40), torch.tensor(frames)
        batch = dict(features=features, lengths=lengths, targets=targets, target_lengths=target_lengths)
        grads = []
        for net in (model, compiled):
            model.zero_grad()
            loss = speech_metric.loss(net, batch, "cpu")
            loss.backward()
            grads.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
        for eager, traced in zip(*grads, strict=True):
            torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    assert backend.frame_count > 0  # the layers outside the recurrence compiled, not all of it skipped


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine of 2 or more cores")
@pytest.mark.parametrize("confined", ["slurm", "taskset"])
def test_featurising_runs_on_the_cores_the_job_may_use_not_the_nodes(confined):
    """Featurising a corpus took `os.cpu_count()` processes: a SLURM job given 1 CPU on a 64-core node ran 64."""
    code = "from dsd.spec import RunOptions; from dsd.tracks.speech.data import feature_workers as f; print(f(RunOptions()))"
    env = os.environ | ({"SLURM_CPUS_PER_TASK": "1"} if confined == "slurm" else {})
    prefix = ["taskset", "-c", "0"] if confined == "taskset" else []
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


def _quoted_wsj(tmp_path):
    """A two-utterance WSJ layout whose transcript has a verbalised single quote, as one split."""
    write_wsj(tmp_path / "wsj", [("011c0201", "HE SAID 'SINGLE-QUOTE HELLO"), ("011c0202", "WORLD")])
    index = "wsj0/doc/indices/train/tr_s_wv1.ndx"
    entry = {"track": "speech", "dataset": "wsj", "model": {"arch": "deepspeech"},
             "data": {"train": index, "val": index, "test": index},
             "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}  # fmt: skip
    return parse_row("ds", entry, str(tmp_path / "wsj")).experiment(
        RunOptions(data_root=str(tmp_path / "data"))
    )


def test_features_cached_before_a_transcript_rule_changed_are_not_read_with_the_old_transcripts(
    tmp_path, monkeypatch
):
    """The features cache was named by the corpus' files and the feature settings: after `normalise_wsj` changed
    ("'SINGLE-QUOTE" -> "single quote", not "'single quote") the .dot files were the same, the data set stayed
    current, and training and the WER read the transcripts cached by the old rules."""
    exp = _quoted_wsj(tmp_path)
    rules = speech_data.normalise_wsj

    def older_rules(text, where):  # before the single quotes lost their apostrophe
        return rules(text.replace("'SINGLE-QUOTE", "'SINGLE QUOTE"), where)

    monkeypatch.setattr(speech_data, "normalise_wsj", older_rules)
    prepare.prepare(exp)
    assert list(speech_data.dataset(exp, "train").texts)[0] == "he said 'single quote hello"
    monkeypatch.setattr(speech_data, "normalise_wsj", rules)
    speech_data._UTTERANCES.clear()  # what a new process with the new code reads
    prepare.ensure(exp)
    assert list(speech_data.dataset(exp, "train").texts) == ["he said single quote hello", "world"]


def test_a_transcript_rule_change_makes_a_real_corpus_another_data_set(tmp_path, monkeypatch):
    """The corpus' fingerprint, which every checkpoint and result records, covered its files alone: after
    `normalise_wsj` changed, the dense checkpoint trained on the old transcripts started the sparse phase on
    the new ones, and finished phases kept WERs scored against the old references, all as current."""
    exp = _quoted_wsj(tmp_path)
    rules = speech_data.normalise_wsj
    today = prepare.content_fingerprint(exp)
    monkeypatch.setattr(
        speech_data, "normalise_wsj", lambda text, where: rules(text.replace("-Q", " Q"), where)
    )
    speech_data._UTTERANCES.clear()  # what a new process with the changed code reads
    assert prepare.content_fingerprint(exp) != today
    monkeypatch.setattr(speech_data, "normalise_wsj", rules)
    speech_data._UTTERANCES.clear()
    assert prepare.content_fingerprint(exp) == today
