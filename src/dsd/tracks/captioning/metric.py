"""Captioning loss and metric: teacher-forced cross-entropy; BLEU-1..4 of beam-search captions (coco-caption)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dsd.engine import distributed
from dsd.spec import Experiment
from dsd.tracks.captioning.data import eval_loader, vocabulary
from dsd.tracks.captioning.model import ShowAndTell, beam_search, greedy


def loss(model: ShowAndTell, batch, device) -> torch.Tensor:
    """Mean cross-entropy over the non-pad target words (teacher forcing: input <start> w1.., target w1.. <end>).

    Under DDP the mean over the global batch's words, as one process computes it: each rank's word sum over
    the words of all ranks, times the world size that DDP's gradient averaging divides by again (a mean per
    rank would weight a word of a rank with short captions more)."""
    features, tokens = (t.to(device, non_blocking=True) for t in batch)
    logits = model(features, tokens[:, :-1])
    logits, targets = logits.flatten(0, 1), tokens[:, 1:].flatten()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return F.cross_entropy(logits, targets, ignore_index=0)
    words = (targets != 0).sum().float()
    torch.distributed.all_reduce(words)  # on the device: nothing waits for it
    world = torch.distributed.get_world_size()
    return F.cross_entropy(logits, targets, ignore_index=0, reduction="sum") * world / words.clamp(min=1)


def _scorer(references: list[list[list[str]]], hypotheses: list[list[str]]):
    """coco-caption's BLEU counting of every (hypothesis, references) pair, in item order."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for refs, hyp in zip(references, hypotheses, strict=True):
        scorer += (" ".join(hyp), [" ".join(r) for r in refs])
    return scorer


def _corpus_scores(scorer) -> dict[str, float]:
    scores, _ = scorer.compute_score(option="closest", verbose=0)  # what coco-caption's Bleu(4) computes
    return {f"bleu{n + 1}": 100.0 * float(s) for n, s in enumerate(scores)}


def _statistics(scorer) -> dict[str, list]:
    closest = [min((abs(r - c["testlen"]), r) for r in c["reflen"])[1] for c in scorer.ctest]
    return {
        "testlen": [c["testlen"] for c in scorer.ctest],
        "reflen": closest,
        "guess": [c["guess"] for c in scorer.ctest],
        "correct": [c["correct"] for c in scorer.ctest],
    }


def corpus_bleu(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """coco-caption corpus BLEU-1..4 in percent; inputs already tokenized (lower-case, no punctuation)."""
    return _corpus_scores(_scorer(references, hypotheses))


# coco-caption's guards against empty counts, kept so that BLEU from the sums is coco-caption's to the last digit
_TINY, _SMALL = 1e-15, 1e-9


def bleu_statistics(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, list]:
    """Per item, what corpus BLEU sums (coco-caption's counting): hypothesis length, the closest reference
    length, and per n-gram order (1-4) the hypothesis n-grams and those clipped-matched by a reference."""
    return _statistics(_scorer(references, hypotheses))


def bleu4_from_sums(correct, guess, testlen: float, reflen: float) -> float:
    """Corpus BLEU-4 (percent) from the summed statistics: the geometric mean of the four n-gram precisions
    times the brevity penalty."""
    log_precision = np.mean(
        np.log((np.asarray(correct, float) + _TINY) / (np.asarray(guess, float) + _SMALL))
    )
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    return 100.0 * math.exp(log_precision + (1.0 - 1.0 / ratio if ratio < 1 else 0.0))


def bleu4_item_shares(statistics: dict) -> list[float]:
    """Each item's share of corpus BLEU-4, linearised (delta method): their mean is the corpus BLEU-4 and their
    spread gives its standard error over test sets, as a mean's would. BLEU divides corpus sums, so it is not a
    mean over items; this lets the report's interval count the test set's draw for captioning too."""
    correct, guess = np.asarray(statistics["correct"], float), np.asarray(statistics["guess"], float)
    test, ref = np.asarray(statistics["testlen"], float), np.asarray(statistics["reflen"], float)
    sums = correct.sum(0), guess.sum(0), test.sum(), ref.sum()
    bleu = bleu4_from_sums(*sums)
    # d log BLEU-4 / d(item's counts), each count relative to its corpus sum; an order without a single match
    # (BLEU-4 ~ 0, not linearisable) adds no spread
    matched = sums[0] > 0
    per_order = np.where(matched, correct / np.maximum(sums[0], 1) - guess / (sums[1] + _SMALL), 0.0)
    slope = per_order.sum(1) / correct.shape[1]
    if (sums[2] + _TINY) / (sums[3] + _SMALL) < 1:  # brevity penalty exp(1 - R/T)
        slope += sums[3] * test / (sums[2] + _TINY) ** 2 - ref / (sums[2] + _TINY)
    return (bleu * (1.0 + len(test) * slope)).tolist()


def _captions(model, exp: Experiment, split: str, device, decode, batch_size: int, shard: bool = False):
    """The split's images and their captions, in order. With `shard`, under torch.distributed, each rank decodes
    its share of the batches and every rank gets all the captions."""
    words = {i: w for w, i in vocabulary(exp).items()}
    was_training = model.training
    model.eval()
    loader = eval_loader(exp, split, batch_size, shard=shard)
    hypotheses = []
    try:
        for features, _ in loader:
            hypotheses += [[words[i] for i in ids] for ids in decode(features.to(device))]
    finally:
        model.train(was_training)
    if shard:
        hypotheses = distributed.in_split_order(list(loader.sampler), hypotheses, gather=True)
    return loader.dataset.items, hypotheses


def evaluate(model, exp: Experiment, split: str, device, n_samples: int = 0) -> tuple[dict, list, dict]:
    """BLEU-1..4 (percent) of beam-search captions against every reference of each image; the first
    `n_samples` images with their reference and caption; per image, its BLEU statistics and share of BLEU-4
    (the items the report's interval resamples)."""
    cfg = exp.eval
    items, hypotheses = _captions(
        model, exp, split, device, lambda f: beam_search(model, f, cfg.beam_size, cfg.max_len), cfg.batch_size
    )
    samples = [
        {"image": str(im.path), "reference": " ".join(im.captions[0]), "hypothesis": " ".join(h)}
        for im, h in zip(items[:n_samples], hypotheses[:n_samples], strict=True)
    ]
    scorer = _scorer([list(im.captions) for im in items], hypotheses)  # counted once for both
    statistics = _statistics(scorer)
    per_item = {"shares": bleu4_item_shares(statistics), "bleu_statistics": statistics}
    return _corpus_scores(scorer), samples, per_item


def monitor(model, exp: Experiment, device) -> dict:
    """The per-epoch validation during training: BLEU of greedy captions up to the training caption length, under
    DDP sharded over the ranks (corpus BLEU of all the ranks' captions, as one process computes it)."""
    max_len = exp.data.max_words + 1
    items, hypotheses = _captions(
        model, exp, "val", device, lambda f: greedy(model, f, max_len), exp.train.batch_size, shard=True
    )
    return corpus_bleu([list(im.captions) for im in items], hypotheses)


def check(exp: Experiment) -> None:
    """Evaluation needs nothing beyond the data and features, which earlier steps check."""
