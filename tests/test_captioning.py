"""Captioning track: Karpathy reader, vocabulary, decoding, BLEU, scenes generator, pruning, end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from conftest import killed_while_writing, leave_process_group
from torch import nn

from dsd.core.masks import Pruner
from dsd.engine import prepare
from dsd.errors import ConfigError, DataError
from dsd.spec import RunOptions, parse_row
from dsd.tracks.captioning import data as cap_data
from dsd.tracks.captioning import metric as cap_metric
from dsd.tracks.captioning import model as cap_model
from dsd.tracks.captioning import synthetic as scenes

torch.set_num_threads(1)


def _karpathy(tmp_path, images):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path


def _entry(i, split, raws):
    return {
        "filename": f"im{i}.jpg",
        "imgid": i,
        "split": split,
        "sentids": list(range(len(raws))),
        "sentences": [{"raw": r, "tokens": r.split(), "imgid": i, "sentid": j} for j, r in enumerate(raws)],
    }


def _exp(data_dir, dataset="flickr8k", model=None, data=None, eval=None, train=None):
    """A captioning row: `data_dir` is the real data set's folder, or (scenes) the data_root it is generated in."""
    entry = {
        "track": "captioning",
        "dataset": dataset,
        "model": model or {},
        "data": {"encoder_weights": "vgg16.pth", **(data or {})},
        "eval": eval or {},
        "train": train or {},
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}],
    }
    generated = dataset == "scenes"
    row = parse_row("captioning", entry, None if generated else str(data_dir))
    options = RunOptions(data_root=str(data_dir), output_dir=str(data_dir))
    return row.experiment(options, upstream={"encoder": "a test encoder"})


def test_karpathy_reader_normalises_and_names_bad_fields(tmp_path):
    images = [
        _entry(0, "train", ["A Dog, running!", "the dog runs."]),
        _entry(1, "restval", ["Two cats"]),
        _entry(2, "test", ["a bird"]),
    ]
    images[2]["filepath"] = "val2014"  # COCO layout: image_dir / filepath / filename
    read = cap_data.read_karpathy(_karpathy(tmp_path, images), tmp_path / "imgs")
    assert read[0].captions == (("a", "dog", "running"), ("the", "dog", "runs"))
    assert [im.split for im in read] == ["train", "train", "test"]  # restval counts as train
    assert read[2].path == tmp_path / "imgs" / "val2014" / "im2.jpg"

    del images[1]["sentences"]
    with pytest.raises(DataError) as err:
        cap_data.read_karpathy(_karpathy(tmp_path, images))
    message = str(err.value)
    assert "dataset_flickr8k.json" in message and "images[1]" in message and "im1.jpg" in message
    assert "'sentences'" in message and "\n" not in message

    images[1]["sentences"] = [{"imgid": 1}]
    with pytest.raises(DataError, match="'tokens'"):
        cap_data.read_karpathy(_karpathy(tmp_path, images))
    for bad, message in (({"raw": 5}, r"sentences\[0\].raw is int"), (None, "missing field 'tokens'")):
        images[1]["sentences"] = [bad]
        with pytest.raises(DataError, match=message):
            cap_data.read_karpathy(_karpathy(tmp_path, images))
    images[1]["sentences"], images[1]["filename"] = [{"raw": "a cat"}], 7
    with pytest.raises(DataError, match="field 'filename' is int"):
        cap_data.read_karpathy(_karpathy(tmp_path, images))


def test_preparing_flickr8k_names_a_missing_image_and_an_empty_split(tmp_path):
    _karpathy(tmp_path, [_entry(0, "train", ["a dog"]), _entry(1, "val", ["a cat"])])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "im0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="im1.jpg"):
        prepare.prepare(_exp(tmp_path))
    (tmp_path / "images" / "im1.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="dataset_flickr8k.json: no 'test' images"):
        prepare.prepare(_exp(tmp_path))  # would score no model, or every one 0 (an empty 'val')
    _karpathy(
        tmp_path, [_entry(0, "train", ["a dog"]), _entry(1, "val", ["a cat"]), _entry(2, "test", ["a"])]
    )
    (tmp_path / "images" / "im2.jpg").write_bytes(b"")
    assert prepare.prepare(_exp(tmp_path))["summary"]["images"] == {"train": 1, "val": 1, "test": 1}
    verified = dataclasses.replace(
        _exp(tmp_path), options=RunOptions(data_root=str(tmp_path), verify_data=True)
    )
    with pytest.raises(DataError, match=r"3 of 3 images cannot be decoded: .*im0.jpg"):
        prepare.prepare(verified)  # verify_data decodes them: empty files are no images


def test_coco_layout_prepares_by_its_data_set_name(tmp_path):
    """dataset: coco reads dataset_coco.json; images under train2014/ and val2014/ via each entry's filepath."""
    entries = [_entry(0, "train", ["a dog"]), _entry(1, "val", ["a cat"]), _entry(2, "test", ["a cow"])]
    for entry, folder in zip(entries, ("train2014", "val2014", "val2014"), strict=True):
        entry["filepath"] = folder
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / entry["filename"]).write_bytes(b"")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    assert prepare.prepare(_exp(tmp_path, "coco"))["summary"]["images"] == {"train": 1, "val": 1, "test": 1}


def test_vocabulary_min_count_specials_and_truncation(tmp_path):
    captions = [("a", "dog")] * 5 + [("a", "cat")] * 4
    vocab = cap_data.build_vocabulary(captions, min_count=5)
    assert list(vocab) == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]  # 'cat' seen 4 times only
    assert cap_data.build_vocabulary(captions, min_count=4)["cat"] == 6
    long = ("a", "dog") * 10
    ids = cap_data.encode(long, vocab, max_words=16)
    assert len(ids) == 18 and ids[0] == vocab["<start>"] and ids[-1] == vocab["<end>"]
    assert ids[1:-1] == [vocab["a"], vocab["dog"]] * 8

    # built from train captions only: a word frequent in test is not in the vocabulary
    _karpathy(tmp_path, [_entry(0, "train", ["a dog"] * 5), _entry(1, "test", ["a zebra"] * 5)])
    vocab = cap_data.vocabulary(_exp(tmp_path, data={"min_count": 5}))
    assert "dog" in vocab and "zebra" not in vocab


def test_unknown_config_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.hiden_dim: unknown key .did you mean 'hidden_dim'"):
        _exp(tmp_path, model={"hiden_dim": 3})
    with pytest.raises(ConfigError, match="eval.beam: unknown key"):
        _exp(tmp_path, eval={"beam": 3})
    with pytest.raises(ConfigError, match="data.features: this key moved to a cache"):
        _exp(tmp_path, data={"features": "vgg16_fc7.pt"})


@torch.no_grad()
def _score(model, feature, ids, max_len):
    """Total log-probability of a caption (+ <end> unless it ran to max_len)."""
    state, token, total = model.start(feature[None]), torch.tensor([1]), 0.0
    for w in ids + ([2] if len(ids) < max_len else []):
        logp, state = model.step(token, state)
        total += float(logp[0, w])
        token = torch.tensor([w])
    return total


def test_beam_one_is_greedy_and_wide_beam_is_exhaustive():
    torch.manual_seed(0)
    model = cap_model.ShowAndTell(
        feature_dim=12, vocab_size=40, embed_dim=16, hidden_dim=24, dropout=0.0
    ).eval()
    features = torch.randn(64, 12) * 3
    greedy = cap_model.greedy(model, features, max_len=16)
    assert cap_model.beam_search(model, features, beam_size=1, max_len=16) == greedy
    assert len({tuple(g) for g in greedy}) > 1  # not a degenerate comparison

    # 3 usable words, 3 steps: a beam of 64 holds every sequence, so it must find the exhaustive optimum
    small = cap_model.ShowAndTell(feature_dim=8, vocab_size=7, embed_dim=8, hidden_dim=16, dropout=0.0).eval()
    feats = torch.randn(8, 8) * 3
    found = cap_model.beam_search(small, feats, beam_size=64, max_len=3)
    candidates = [list(c) for n in range(4) for c in itertools.product((3, 4, 5, 6), repeat=n)]
    for feature, ids in zip(feats, found, strict=True):
        best = max(candidates, key=lambda c: _score(small, feature, c, 3))
        assert ids == best


def test_corpus_bleu_matches_sacrebleu():
    # coco-caption and sacrebleu agree when every n-gram order has a match in the corpus (coco's 1e-15/1e-9
    # smoothing is then negligible) and the brevity penalty uses the closest reference length in both; the
    # hypotheses here are shorter than their closest references, so the brevity penalty is exercised too.
    hyps = ["a dog runs on the grass", "a man rides a red bike", "two cats sit on a mat", "a bird flies"]
    refs = [
        ["a brown dog runs on the green grass", "the dog is running on grass outside", "a dog running"],
        ["a man is riding a red bike down the road", "a person rides a bicycle", "man on a red bike"],
        ["two cats are sitting on a mat", "two small cats sit on the mat together", "cats on a mat"],
        ["a small bird flies over the water", "a bird is flying in the sky", "bird flying high"],
    ]
    ours = cap_metric.corpus_bleu([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps])
    theirs = sacrebleu.corpus_bleu(
        hyps,
        [list(col) for col in zip(*refs, strict=True)],
        tokenize="none",
        smooth_method="none",
        force=True,
    )
    assert theirs.bp < 1.0
    for n in range(4):  # bleu-n = BP * geometric mean of the first n precisions
        logs = [math.log(p / 100) for p in theirs.precisions[: n + 1]]
        expected = 100 * theirs.bp * math.exp(sum(logs) / (n + 1))
        assert ours[f"bleu{n + 1}"] == pytest.approx(expected, abs=1e-3)
    assert ours["bleu4"] == pytest.approx(theirs.score, abs=1e-3)


def _noisy_corpus(n_items: int, seed: int):
    """References of random words and hypotheses copied from one of them with words dropped or replaced."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    references, hypotheses = [], []
    for _ in range(n_items):
        refs = [list(rng.choice(words, size=rng.integers(6, 12))) for _ in range(3)]
        hyp = [w if rng.random() > 0.3 else str(rng.choice(words)) for w in refs[0] if rng.random() > 0.25]
        references.append(refs)
        hypotheses.append(hyp or ["w0"])
    return references, hypotheses


@pytest.mark.parametrize("short", [True, False])
def test_bleu4_item_shares_average_to_coco_bleu4(short):
    references, hypotheses = _noisy_corpus(40, seed=1)
    if not short:  # long hypotheses: no brevity penalty
        hypotheses = [h + refs[1] for h, refs in zip(hypotheses, references, strict=True)]
    statistics = cap_metric.bleu_statistics(references, hypotheses)
    ratio = sum(statistics["testlen"]) / sum(statistics["reflen"])
    assert (ratio < 1) == short
    coco = cap_metric.corpus_bleu(references, hypotheses)["bleu4"]
    assert np.mean(cap_metric.bleu4_item_shares(statistics)) == pytest.approx(coco, rel=1e-9)


def test_bleu4_item_shares_spread_matches_a_bootstrap_over_items():
    # the delta method's standard error (the shares' spread / sqrt(n)) against resampling the items
    statistics = cap_metric.bleu_statistics(*_noisy_corpus(300, seed=2))
    shares = np.asarray(cap_metric.bleu4_item_shares(statistics))
    delta_se = shares.std(ddof=1) / math.sqrt(len(shares))
    correct, guess = np.asarray(statistics["correct"]), np.asarray(statistics["guess"])
    test, ref = np.asarray(statistics["testlen"]), np.asarray(statistics["reflen"])
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(shares), len(shares)) for _ in range(2000)]
    boot = [
        cap_metric.bleu4_from_sums(correct[i].sum(0), guess[i].sum(0), test[i].sum(), ref[i].sum())
        for i in draws
    ]
    assert delta_se == pytest.approx(np.std(boot, ddof=1), rel=0.1)


def test_scenes_are_deterministic_and_karpathy(tmp_path):
    a = scenes.generate(tmp_path / "a", seed=3, splits=(6, 2, 2), image_size=32)
    b = scenes.generate(tmp_path / "b", seed=3, splits=(6, 2, 2), image_size=32)
    c = scenes.generate(tmp_path / "c", seed=4, splits=(6, 2, 2), image_size=32)
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    for name in ("scene_00000.png", "scene_00009.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    read = cap_data.read_karpathy(a, tmp_path / "a/images")
    assert [im.split for im in read] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert all(len(im.captions) == 5 and im.path.is_file() for im in read)
    assert all(len(set(im.captions)) > 1 for im in read)  # the five references differ
    sentids = [s["sentid"] for im in json.loads(a.read_text())["images"] for s in im["sentences"]]
    assert sentids == list(range(50))


def test_pruning_leaves_the_word_embedding_dense():
    torch.manual_seed(0)
    model = cap_model.ShowAndTell(feature_dim=32, vocab_size=50, embed_dim=16, hidden_dim=24, dropout=0.0)
    pruner = Pruner(model, 0.8, exclude=("embed.weight",))
    measured = pruner.sparsity()
    assert set(measured) == {"image_proj.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.weight"}
    assert all(v == pytest.approx(0.8, abs=1e-3) for v in measured.values())
    assert int((model.embed.weight == 0).sum()) == 0
    # the in-place masks survive an Adam step through the LSTM's flat weights
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (torch.randn(4, 32), torch.randint(4, 50, (4, 7)))
    cap_metric.loss(model, batch, "cpu").backward()
    optimizer.step()
    pruner.step(optimizer)
    assert all(v == pytest.approx(0.8, abs=1e-3) for v in pruner.sparsity().values())
    assert int((model.embed.weight == 0).sum()) == 0


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_end_to_end_on_tiny_scenes(tmp_path):
    exp = _exp(
        tmp_path,
        dataset="scenes",
        model={"embed_dim": 16, "hidden_dim": 32, "dropout": 0.0},
        data={"scenes_splits": [40, 8, 8], "scenes_image_size": 32, "image_size": 32, "min_count": 2},
        eval={"batch_size": 8},
        train={"batch_size": 16},
    )
    summary = prepare.prepare(exp)["summary"]
    assert summary["images"] == {"train": 40, "val": 8, "test": 8} and summary["captions"] == 280
    with pytest.raises(DataError, match="features"):
        cap_model.build(exp)

    torch.manual_seed(0)
    encoder = cap_model.encoder_from_module(TinyCNN())
    path = cap_data.extract_features(exp, encoder)
    saved = torch.load(path, weights_only=True)
    assert saved["features"].shape == (56, 32) and len(saved["filenames"]) == 56
    assert saved["data_fingerprint"] == prepare.data_fingerprint(exp)

    model = cap_model.build(exp)
    assert model.embed.weight.shape[0] == len(cap_data.vocabulary(exp))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(3):
        for batch in cap_data.train_loader(exp, seed=0, epoch=epoch):
            value = cap_metric.loss(model, batch, "cpu")
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(value.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4

    metrics, shown, items = cap_metric.evaluate(model, exp, "val", "cpu", n_samples=3)
    assert set(metrics) == {"bleu1", "bleu2", "bleu3", "bleu4"}
    # per image, its share of BLEU-4: their mean is the corpus BLEU-4 (the report's interval resamples them)
    assert len(items["shares"]) == len(items["bleu_statistics"]["testlen"]) == 8
    assert np.mean(items["shares"]) == pytest.approx(metrics["bleu4"], rel=1e-9, abs=1e-9)
    assert all(0.0 <= v <= 100.0 for v in metrics.values()) and metrics["bleu1"] > 0
    assert len(shown) == 3 and all(s["hypothesis"] and s["image"].endswith(".png") for s in shown)
    assert set(cap_metric.monitor(model, exp, "cpu")) == set(metrics)


def test_features_of_other_images_are_never_read(tmp_path):
    """A features cache carries the data set's fingerprint: regenerated data makes it stale, not reusable."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    assert cap_data.feature_dim(exp) == 32
    marker = prepare.marker(exp)
    marker.write_text(marker.read_text().replace(prepare.data_fingerprint(exp), "0123456789abcdef"))
    with pytest.raises(DataError, match="stale, computed from other images"):
        cap_data.load_features(exp)
    other = _exp(tmp_path, dataset="scenes", data=data | {"image_size": 24})
    assert cap_data.features_path(other) != cap_data.features_path(exp)  # another encoder input size


def test_a_features_cache_half_written_by_a_killed_job_is_removed(tmp_path):
    """kill -9 while the features cache is saved leaves its temporary file, as large as the cache (GBs for
    COCO): the next extraction deletes it, and keeps a live writer's."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    path = cap_data.features_path(exp)
    path.parent.mkdir(parents=True, exist_ok=True)
    killed_while_writing(
        path.parent, "open(f'.{sys.argv[1]}.tmp{os.getpid()}', 'wb').write(bytes(4096))", path.name
    )
    assert list(path.parent.glob(".*.tmp*"))
    live = path.parent / f".{path.name}.tmp{os.getppid()}"  # a live process, not this writer
    live.write_bytes(b"")
    cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    assert path.is_file() and [p.name for p in path.parent.glob(".*.tmp*")] == [live.name]


def test_a_damaged_features_cache_is_named(tmp_path):
    """A features cache cut short or emptied (a copy, a crash) is one error naming it; torch's own error named no
    file and ended `dsd train` with a traceback."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    path = cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):
        path.write_bytes(damaged)
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}: not a readable features cache"):
            cap_data.load_features(exp)


def test_vgg_weights_must_be_a_local_file(tmp_path):
    exp = _exp(tmp_path, data={"encoder_weights": "weights/vgg16.pth"})
    with pytest.raises(DataError, match=str(tmp_path / "weights" / "vgg16.pth")):  # inside the data folder
        cap_model.vgg16_encoder(exp)


def test_scenes_made_with_other_settings_are_regenerated_not_kept(tmp_path):
    """The prepared scenes are the config's: changing the generator seed rewrites them (they were kept once
    complete, whatever settings they were made with, while the marker named the new settings)."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    first = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(first)
    json_path = Path(first.data_dir) / "dataset_scenes.json"
    before = json_path.read_text()
    prepare.prepare(first)
    assert json_path.read_text() == before  # the same settings: kept
    prepare.prepare(_exp(tmp_path, dataset="scenes", data=data | {"scenes_seed": 1}))
    assert json.loads(json_path.read_text())["generator"]["seed"] == 1
    assert json_path.read_text() != before


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    scenes.generate(tmp_path, seed=0, splits=(1, 0, 0), image_size=16)
    good = tmp_path / "images" / "scene_00000.png"
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])  # truncated
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("cut.png", "notes.png"):
        with pytest.raises(DataError, match=f"{name}: cannot decode image"):
            cap_data._ImageFiles([tmp_path / name], 16)[0]


def _caption_batch():
    """Eight captions of 2 to 9 words (padded with 0): the first half short, the second long."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(8, 11, dtype=torch.long)
    for i, words in enumerate([2, 3, 2, 3, 9, 8, 9, 7]):
        tokens[i, : words + 2] = torch.randint(1, 20, (words + 2,), generator=g)
    return torch.randn(8, 6, generator=g), tokens


def _caption_model():
    torch.manual_seed(0)
    return cap_model.ShowAndTell(6, 20, 8, 8, dropout=0.0)


def _half_batch_gradients(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _caption_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    features, tokens = _caption_batch()
    half = slice(rank * 4, rank * 4 + 4)
    value = cap_metric.loss(ddp, (features[half], tokens[half]), "cpu")
    value.backward()
    mean = torch.tensor([float(value)])
    dist.all_reduce(mean)  # what the trainer records: the mean over the ranks
    if rank == 0:
        torch.save(
            {"loss": float(mean) / world, **{n: p.grad for n, p in model.named_parameters()}}, out_file
        )
    leave_process_group()


def test_two_ranks_with_half_batches_optimise_the_loss_of_the_whole_batch(tmp_path):
    """Under DDP with captions of unequal lengths on the two ranks: the recorded loss and the (averaged)
    gradient are those of one process on the whole batch, the mean over all its words."""
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_half_batch_gradients, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    model = _caption_model()
    whole = cap_metric.loss(model, _caption_batch(), "cpu")
    whole.backward()
    assert ddp["loss"] == pytest.approx(float(whole), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp[name], param.grad, rtol=1e-5, atol=1e-7)


def _scenes_to_validate(base):
    """Seven validation images, in batches of 2 (train.batch_size): 2 + 2 + 2 + 1."""
    data = {"scenes_splits": [12, 7, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    model = {"embed_dim": 16, "hidden_dim": 32, "dropout": 0.0}
    return _exp(base, dataset="scenes", model=model, data=data, train={"batch_size": 2})


def _validated_model(exp):
    torch.manual_seed(0)
    model = cap_model.build(exp)
    with torch.no_grad():
        model.out.weight *= 10.0  # captions that differ from one image to another
    images = []  # the images each batch decodes
    model.image_proj.register_forward_pre_hook(lambda module, args: images.append(len(args[0])))
    return model, images


def _sharded_validation(rank, world, init_file, base, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    exp = _scenes_to_validate(base)
    model, images = _validated_model(exp)
    bleu = cap_metric.monitor(model, exp, "cpu")
    greedy = lambda f: cap_model.greedy(model, f, exp.data.max_words + 1)  # noqa: E731
    _, captions = cap_metric._captions(model, exp, "val", "cpu", greedy, 2, shard=True)
    torch.save({"bleu": bleu, "captions": captions, "images": images}, f"{out_file}.{rank}")
    leave_process_group()


def test_the_per_epoch_validation_is_sharded_over_ddp_ranks_with_one_processs_bleu(tmp_path):
    """Under DDP each rank captions its whole batches of the split (each image once, in the batch one process
    captions it in) and every rank scores all the captions: one process's corpus BLEU to the last bit."""
    import torch.multiprocessing as mp

    exp = _scenes_to_validate(tmp_path)
    prepare.prepare(exp)
    torch.manual_seed(0)
    cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    model, images = _validated_model(exp)
    alone = cap_metric.monitor(model, exp, "cpu")
    greedy = lambda f: cap_model.greedy(model, f, exp.data.max_words + 1)  # noqa: E731
    _, whole = cap_metric._captions(model, exp, "val", "cpu", greedy, 2)
    assert images == [2, 2, 2, 1] * 2 and 0 < alone["bleu1"] < 100 and len({tuple(c) for c in whole}) > 1
    out = tmp_path / "ranks"
    mp.spawn(
        _sharded_validation, args=(3, str(tmp_path / "init"), str(tmp_path), str(out)), nprocs=3, join=True
    )
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(3)]
    assert [r["images"] for r in ranks] == [[2, 1] * 2, [2] * 2, [2] * 2]  # batches 0 and 3, 1, 2 of 4
    for r in ranks:
        assert r["bleu"] == alone and r["captions"] == whole


def test_a_feature_constant_over_the_training_images_is_centred_not_blown_up(tmp_path):
    """A ReLU unit never on in training but on for a val image: divided by ~0 it was 1e5 times its value."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    path = cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    saved = torch.load(path, weights_only=True)
    splits = [im.split for im in cap_data.images(exp)]
    saved["features"][:, 0] = torch.tensor([0.0 if s == "train" else 5.0 for s in splits])
    torch.save(saved, path)
    _, val = cap_data._split_features(exp, "val")
    assert val[:, 0].tolist() == [5.0, 5.0]
    assert val[:, 1:].abs().max() < 1e3  # the other features standardised as before


def preempted_at_start(monkeypatch, config) -> None:
    """Row `nt`'s dense phase stopped by a SIGTERM as it starts: it leaves resume.pt."""
    from conftest import train

    from dsd.engine import resume
    from dsd.errors import Preempted

    with monkeypatch.context() as patch:
        patch.setattr(resume.StopSignal, "received", "SIGTERM", raising=False)
        patch.setattr(resume.StopSignal, "__init__", lambda self: None)
        with pytest.raises(Preempted):
            train(config, "nt", 0, "dense")


def test_a_resume_point_of_replaced_encoder_weights_is_discarded(tmp_path, monkeypatch, capfd):
    """The spec names `data.encoder_weights` by path: a file replaced mid-phase (its images encoded again)
    resumed the phase trained on the old encoder's features, mixing two encoders. resume.pt records the
    file's content digest: another content starts the phase afresh, with one line naming the key."""
    from conftest import parse, prepare_data, tiny_vision_config, train

    from dsd import paths

    weights = tmp_path / "vgg16.pth"
    torch.save({"fc7": torch.zeros(2)}, weights)  # only its content is read here: the features are given
    config = tiny_vision_config(tmp_path, seeds=[0], rows=["nt"])
    config["experiments"] = {
        "nt": {
            "track": "captioning", "dataset": "scenes", "model": {"embed_dim": 8, "hidden_dim": 8},
            "data": {"min_count": 1, "image_size": 32, "scenes_splits": [8, 2, 2], "encoder_weights": str(weights)},
            "phases": [{"kind": "dense", "epochs": 4, "lr": 0.005}],  # a SIGTERM in the last epoch finishes it
        }
    }  # fmt: skip
    config = parse(config)
    prepare_data(config, "nt")
    torch.manual_seed(0)
    cap_data.extract_features(config.experiment("nt"), cap_model.encoder_from_module(TinyCNN()))

    preempted_at_start(monkeypatch, config)
    weights.write_bytes(weights.read_bytes())  # the same content, written again: still the same encoder
    preempted_at_start(monkeypatch, config)
    assert "resume.pt is from another spec" not in capfd.readouterr().err
    assert paths.resume(paths.run_dir(config.options.output_dir, "nt", 0, "dense")).exists()
    torch.save({"fc7": torch.ones(2)}, weights)  # another encoder under the same path

    train(config, "nt", 0, "dense")
    message = [
        line for line in capfd.readouterr().err.splitlines() if "resume.pt is from another spec" in line
    ]
    assert message and "data.encoder_weights replaced since" in message[0], message


def test_a_resume_point_of_images_encoded_again_is_discarded(tmp_path, monkeypatch, capfd):
    """`encoder_row`: the features are named by the encoder run's spec, so a dense encoder retrained under it
    (a code fix, another GPU) encodes them again under the same name. The phase resumed on the new features
    the resume point trained on the old ones, silently; resume.pt records the features' digest now, and the
    phase ends as a fresh one on the new features does."""
    from conftest import parse, prepare_data, tiny_vision_config, train

    from dsd import paths

    config = tiny_vision_config(tmp_path, seeds=[0], rows=["nt"])
    config["experiments"]["nt"] = {
        "track": "captioning", "dataset": "scenes", "model": {"embed_dim": 8, "hidden_dim": 8},
        "data": {"min_count": 1, "image_size": 32, "scenes_splits": [8, 2, 2], "encoder_row": "resnet18"},
        "phases": [{"kind": "dense", "epochs": 4, "lr": 0.005}],  # a SIGTERM in the last epoch finishes it
    }  # fmt: skip
    config = parse(config)
    prepare_data(config, "nt")

    def encoded(seed):
        torch.manual_seed(seed)
        cap_data.extract_features(config.experiment("nt"), cap_model.encoder_from_module(TinyCNN()))

    encoded(0)
    preempted_at_start(monkeypatch, config)
    encoded(0)  # encoded again by the same encoder: the same features, the resume point continues
    preempted_at_start(monkeypatch, config)
    assert "resume.pt is from another spec" not in capfd.readouterr().err
    encoded(1)  # the encoder retrained under the same spec: other features under the same name

    train(config, "nt", 0, "dense")
    message = [
        line for line in capfd.readouterr().err.splitlines() if "resume.pt is from another spec" in line
    ]
    assert message and "the image features replaced since" in message[0], message
    train(config, "nt", 0, "dense", out=tmp_path / "fresh")
    runs = paths.run_dir(config.options.output_dir, "nt", 0, "dense"), tmp_path / "fresh"
    a, b = (torch.load(paths.checkpoint(run), weights_only=True)["model"] for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_images_are_decoded_for_the_encoder_by_the_runs_loader_workers(tmp_path, monkeypatch):
    """The frozen CNN encodes every image once; their decoding ran in the job's own process (~6 ms a Flickr8k
    JPEG: ~10x VGG-16's time on a GPU), whatever the run's `workers`. The features are the same."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    encoder = cap_model.encoder_from_module(TinyCNN())
    alone = torch.load(cap_data.extract_features(exp, encoder))["features"]
    workers = []
    real_loader = cap_data.loaders.loader
    monkeypatch.setattr(
        cap_data.loaders, "loader", lambda *a, **k: workers.append(k.get("workers")) or real_loader(*a, **k)
    )
    two = dataclasses.replace(exp, options=dataclasses.replace(exp.options, workers=2))
    assert torch.equal(torch.load(cap_data.extract_features(two, encoder))["features"], alone)
    assert workers == [2]


def test_the_training_pairs_are_built_once_per_process_and_again_for_new_features(tmp_path):
    """Every epoch standardised every image's features and made a tensor per caption again (~0.75 s an epoch at
    Flickr8k's size, the GPU idle); once per process now, and again when the features file is replaced."""
    data = {"scenes_splits": [6, 2, 2], "scenes_image_size": 32, "image_size": 32, "min_count": 1}
    exp = _exp(tmp_path, dataset="scenes", data=data)
    prepare.prepare(exp)
    features = cap_data.extract_features(exp, cap_model.encoder_from_module(TinyCNN()))
    first = cap_data.train_loader(exp, seed=0, epoch=0).dataset
    assert cap_data.train_loader(exp, seed=0, epoch=1).dataset is first
    assert cap_data.eval_loader(exp, "val", 4).dataset is cap_data.eval_loader(exp, "val", 4).dataset
    stamp = features.stat().st_mtime_ns + 10**9
    os.utime(features, ns=(stamp, stamp))
    again = cap_data.train_loader(exp, seed=0, epoch=2).dataset
    assert again is not first and len(again) == len(first) == 6 * 5


def test_a_rare_word_is_dropped_from_a_training_caption_as_neuraltalk_drops_it():
    """NeuralTalk keeps a caption's words that are in the vocabulary and skips the rest; a <unk> target taught
    the model to emit a word that no reference holds (a sure miss for BLEU)."""
    vocab = cap_data.build_vocabulary([["a", "dog", "runs"]] * 5 + [["a", "zebra", "runs"]], min_count=5)
    ids = cap_data.encode(["a", "zebra", "dog", "runs"], vocab, max_words=2)
    assert ids == [vocab["<start>"], vocab["a"], vocab["dog"], vocab["<end>"]]
    assert vocab["<unk>"] not in cap_data.encode(["zebra"] * 3, vocab, max_words=16)
