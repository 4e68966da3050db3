"""Speech track: reader, synthesiser, CTC decoding, WER/CER, pruning patterns, errors, a short end-to-end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from dsd import spoken
from dsd.config import ConfigError, Experiment, TrainHparams
from dsd.masks import Pruner
from dsd.tracks import DataError, speech

torch.set_num_threads(1)


def _exp(tmp_path, arch="deepspeech", **data) -> Experiment:
    model = {"hidden": 32, "rnn_hidden": 24, "rnn_layers": 2, "conv_channels": 4}
    return Experiment(
        row=arch,
        track="speech",
        dataset="spoken",
        data_dir=str(tmp_path / "spoken"),
        data_root=str(tmp_path),
        model={"arch": arch, **model},
        data=data,
        train=TrainHparams(batch_size=8, eval_batch_size=16),
    )


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
    items = speech.read_librispeech(tmp_path / "dev")
    assert [i["id"] for i in items] == ["19-198-0000", "19-198-0001"]
    assert [i["transcript"] for i in items] == ["hello world", "it's a test"]
    wav = speech.load_audio(items[0]["audio"])
    assert wav.shape == (4800,)
    feats = speech.features(wav, speech.DataConfig())
    assert feats.shape == (31, 40)  # 0.3 s at a 10 ms hop (centred frames), 40 mel bins
    assert torch.allclose(feats.mean(0), torch.zeros(40), atol=1e-4)


def test_manifest_reader(tmp_path):
    folder = _write_librispeech(tmp_path / "c", [("19-198-0000", "HELLO")])
    manifest = tmp_path / "m.jsonl"
    row = {"audio": str(folder / "19-198-0000.flac"), "transcript": "Hello", "duration": 0.3}
    manifest.write_text(json.dumps(row) + "\n")
    assert speech.read_manifest(manifest)[0]["transcript"] == "hello"
    manifest.write_text('{"audio": "x.flac"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1"):
        speech.read_manifest(manifest)


def test_bad_audio_and_transcripts_are_named(tmp_path):
    folder = _write_librispeech(tmp_path / "dev", [("19-198-0000", "HELLO")])
    bad = folder / "19-198-0000.flac"
    bad.write_bytes(b"not a flac file at all")
    with pytest.raises(DataError, match="19-198-0000.flac: unreadable"):
        speech.load_audio(bad)
    import numpy as np
    import soundfile as sf

    sf.write(str(bad), np.zeros(0, dtype="float32"), 16000, format="FLAC")  # a valid file with no samples
    with pytest.raises(DataError, match="19-198-0000.flac: (audio file has no samples|unreadable)"):
        speech.load_audio(bad)
    bad.unlink()
    with pytest.raises(DataError, match="19-198-0000.flac: audio file is missing"):
        speech.load_audio(bad)
    (folder / "19-198.trans.txt").write_text("19-198-0000 HELLO W0RLD\n")
    with pytest.raises(DataError, match=r"19-198\.trans\.txt:1 \(19-198-0000\).*'0'"):
        speech.read_librispeech(tmp_path / "dev")


def test_greedy_ctc_decoding():
    path = "_hh_e_ll_l_oo"
    ids = [speech.ALPHABET.index(c) for c in path]
    logits = torch.full((len(ids), len(speech.ALPHABET)), -5.0)
    logits[torch.arange(len(ids)), ids] = 5.0
    assert speech.greedy_decode(logits.argmax(-1)) == "hello"
    assert speech.greedy_decode([0, 0, 0]) == ""


def test_beam_search_with_a_lexicon_returns_lexicon_words(tmp_path):
    """torchaudio's flashlight decoder (flashlight-text is a dev dependency): where greedy decoding misspells
    a word, the lexicon-constrained beam search returns the closest word of the lexicon."""
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("cat\tc a t |\ncap\tc a p |\ndog\td o g |\n")
    frames = [("c", 1.0), ("a", 1.0), ("x", 0.5), ("t", 0.4)]  # greedy: "cax"; t beats p
    logits = torch.full((len(frames) + 1, len(speech.ALPHABET)), -4.0)
    for i, (char, score) in enumerate(frames):
        logits[i, speech.ALPHABET.index(char)] = score
    logits[2, speech.ALPHABET.index("t")] = 0.4
    logits[2, speech.ALPHABET.index("p")] = 0.1
    logits[len(frames), 0] = 1.0  # blank
    log_probs = logits.log_softmax(-1)
    assert speech.greedy_decode(log_probs.argmax(-1)) == "caxt"
    decoder = speech._beam_decoder(speech.EvalConfig(decoder="beam", lexicon=str(lexicon), beam_size=10))
    best = decoder(log_probs[None], torch.tensor([len(frames) + 1], dtype=torch.int32))[0][0]
    assert list(best.words) == ["cat"]


def test_wer_cer_by_hand():
    refs, hyps = ["the cat sat", "on the mat"], ["the cat sit", "on mat"]
    rates = speech.error_rates(refs, hyps)
    assert rates["wer_pct"] == pytest.approx(100 * 2 / 6)  # 1 substitution + 1 deletion over 6 words
    # characters: "sat"->"sit" 1 edit; "on the mat"->"on mat" deletes "the " (4); 21 reference chars
    assert rates["cer_pct"] == pytest.approx(100 * 5 / 21)


@pytest.mark.parametrize("arch", ["deepspeech", "deepspeech2"])
def test_pruning_patterns_leave_convolutions_dense(tmp_path, arch):
    model = speech.build_model(_exp(tmp_path, arch))
    pruner = Pruner(model, 0.5, exclude=speech.PRUNE_EXCLUDE, include=speech.PRUNE_INCLUDE)
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


def test_unknown_model_key_is_config_error(tmp_path):
    exp = _exp(tmp_path)
    bad = Experiment(**{**exp.__dict__, "model": {"arch": "deepspeech", "layers": 3}})
    with pytest.raises(ConfigError, match="model: unknown key 'layers'"):
        speech.build_model(bad)


def test_synthesiser_is_deterministic_for_a_seed():
    counts = {"train": 1, "dev": 1, "test": 2}
    a = spoken.speaker_audio(spoken.CorpusSpec(seed=7, utterances_per_speaker=counts), "test", 0)
    b = spoken.speaker_audio(spoken.CorpusSpec(seed=7, utterances_per_speaker=counts), "test", 0)
    c = spoken.speaker_audio(spoken.CorpusSpec(seed=8, utterances_per_speaker=counts), "test", 0)
    assert [t for t, _ in a] == [t for t, _ in b] != [t for t, _ in c]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == np.float32 and len(x) > 8000 and np.abs(x).max() <= 1.0
        assert np.array_equal(x, y)  # bit-identical samples, not merely similar


def test_end_to_end_tiny_corpus(tmp_path):
    counts = {"train": 6, "dev": 2, "test": 2}
    exp = _exp(tmp_path, utterances_per_speaker=counts)
    summary = speech.DATASETS["spoken"](exp)
    assert summary["train"]["utterances"] == 6 * len(spoken.SPEAKERS["train"])
    assert (tmp_path / "spoken" / "test" / "201" / "1" / "201-1.trans.txt").is_file()
    # the same reader serves the embedded corpus
    assert len(speech.read_librispeech(tmp_path / "spoken" / "dev")) == 2 * len(spoken.SPEAKERS["dev"])
    for arch in ("deepspeech", "deepspeech2"):
        exp = _exp(tmp_path, arch, utterances_per_speaker=counts)
        torch.manual_seed(0)
        model = speech.build_model(exp)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        batch = next(iter(speech.train_loader(exp, seed=0, epoch=0)))
        losses = []
        for _ in range(8):  # overfit one batch: the loss must go down
            value = speech.loss(model, batch, "cpu")
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        rates = speech.evaluate(model, exp, "test", "cpu")
        assert 0 <= rates["wer_pct"] <= 500 and 0 <= rates["cer_pct"] <= 500
        out = speech.samples(model, exp, "cpu", 3)
        assert [s["id"] for s in out] == ["201-1-0000", "201-1-0001", "202-1-0000"]
    ds2 = _exp(tmp_path, "deepspeech2", utterances_per_speaker=counts)
    first = next(iter(speech.train_loader(ds2, seed=0, epoch=0)))["lengths"]
    assert first.tolist() == sorted(first.tolist())  # SortaGrad: epoch 0 shortest first
    assert first.max() <= speech.dataset(ds2, "train").lengths.sort().values[7]
