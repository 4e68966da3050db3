"""Captioning loss and metric: teacher-forced cross-entropy; BLEU-1..4 of beam-search captions (coco-caption)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsd.spec import Experiment
from dsd.tracks.captioning.data import eval_loader, vocabulary
from dsd.tracks.captioning.model import ShowAndTell, beam_search, greedy


def loss(model: ShowAndTell, batch, device) -> torch.Tensor:
    """Mean cross-entropy over the non-pad target words (teacher forcing: input <start> w1.., target w1.. <end>)."""
    features, tokens = (t.to(device, non_blocking=True) for t in batch)
    logits = model(features, tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)


def corpus_bleu(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """coco-caption corpus BLEU-1..4 in percent; inputs already tokenized (lower-case, no punctuation)."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu{n + 1}": 100.0 * float(s) for n, s in enumerate(scores)}


def _captions(model, exp: Experiment, split: str, device, decode, batch_size: int):
    words = {i: w for w, i in vocabulary(exp).items()}
    was_training = model.training
    model.eval()
    loader = eval_loader(exp, split, batch_size)
    hypotheses = []
    try:
        for features, _ in loader:
            hypotheses += [[words[i] for i in ids] for ids in decode(features.to(device))]
    finally:
        model.train(was_training)
    return loader.dataset.items, hypotheses


def evaluate(model, exp: Experiment, split: str, device, n_samples: int = 0) -> tuple[dict, list, None]:
    """BLEU-1..4 (percent) of beam-search captions against every reference of each image; the first
    `n_samples` images with their reference and caption. No per-item outcomes: BLEU is a corpus statistic."""
    cfg = exp.eval
    items, hypotheses = _captions(
        model, exp, split, device, lambda f: beam_search(model, f, cfg.beam_size, cfg.max_len), cfg.batch_size
    )
    samples = [
        {"image": str(im.path), "reference": " ".join(im.captions[0]), "hypothesis": " ".join(h)}
        for im, h in zip(items[:n_samples], hypotheses[:n_samples], strict=True)
    ]
    return corpus_bleu([list(im.captions) for im in items], hypotheses), samples, None


def monitor(model, exp: Experiment, device) -> dict:
    """The per-epoch validation during training: BLEU of greedy captions up to the training caption length."""
    max_len = exp.data.max_words + 1
    items, hypotheses = _captions(
        model, exp, "val", device, lambda f: greedy(model, f, max_len), exp.train.batch_size
    )
    return corpus_bleu([list(im.captions) for im in items], hypotheses)


def check(exp: Experiment) -> None:
    """Evaluation needs nothing beyond the data and features, which earlier steps check."""
