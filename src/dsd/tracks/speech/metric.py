"""Speech loss and metrics: CTC; WER / CER of greedy (best path) or lexicon beam-search decoding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsd.engine import distributed
from dsd.errors import ConfigError, DataError
from dsd.spec import Experiment
from dsd.tracks.speech.config import Eval
from dsd.tracks.speech.data import ALPHABET, eval_loader


def loss(model: nn.Module, batch: dict, device) -> torch.Tensor:
    """CTC (blank = 0) summed over each utterance and averaged over the batch: the per-utterance loss of
    warp-ctc and the DeepSpeech implementations, whose scale the paper's learning rates assume. (torch's
    reduction="mean" also divides by each transcript's length: steps about 100x smaller at paper scale.)

    The lengths stay on the host, where the model packs its batch and CTC reads them (on the GPU, each would be
    read back, a wait for the work queued before it); the batch's tensors are copied without waiting (pinned)."""
    features = batch["features"].to(device, non_blocking=True)
    log_probs, out_lengths = model(features, batch["lengths"])
    total = F.ctc_loss(
        log_probs.float().transpose(0, 1),
        batch["targets"].to(device, non_blocking=True),
        out_lengths,
        batch["target_lengths"],
        blank=0,
        reduction="sum",
        zero_infinity=True,
    )
    return total / len(batch["target_lengths"])


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
    value = getattr(exp.eval, key)
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
    """The beam decoder's files and package, before a checkpoint is loaded to find out."""
    if exp.eval.decoder == "beam":
        for key in ("lexicon", "lm"):
            eval_file(exp, key)
        _ctc_decoder()


def _beam_decoder(cfg: Eval):
    """torchaudio's flashlight decoder with a lexicon and an optional KenLM (flashlight-text package)."""
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
def _decode(model: nn.Module, exp: Experiment, split: str, device, cfg: Eval, shard: bool = False) -> dict:
    """One forward pass per batch, decoded by the configured decoder ("hyps") and greedily ("greedy").

    Both from the same log-probabilities, so the greedy numbers show the acoustic model alone at no cost
    of a second pass. With the greedy decoder the two lists are the same. With `shard`, under
    torch.distributed, each rank decodes its share of the batches and every rank gets all the results.
    """
    was_training = model.training
    beam = None
    if cfg.decoder == "beam":  # checked and built before any batch runs
        files = {key: eval_file(exp, key) for key in ("lexicon", "lm")}
        beam = _beam_decoder(replace(cfg, **{k: None if f is None else str(f) for k, f in files.items()}))
    model.eval()
    out = {"ids": [], "refs": [], "hyps": [], "greedy": []}
    loader = eval_loader(exp, split, cfg.batch_size, shard=shard)
    try:
        for batch in loader:
            log_probs, lengths = model(batch["features"].to(device, non_blocking=True), batch["lengths"])
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
    finally:
        model.train(was_training)
    # decoded in the loader's order (batched by length), returned in the split's: the samples shown, and the
    # per-utterance errors that the report resamples, are the same utterances whatever the batching
    rows = list(zip(*out.values(), strict=True))
    rows = distributed.in_split_order(loader.sampler.order, rows, gather=shard)
    return {key: [row[k] for row in rows] for k, key in enumerate(out)}


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER in percent: total edits / total reference words (characters)."""
    import jiwer

    return {
        "wer_pct": 100.0 * float(jiwer.wer(references, hypotheses)),
        "cer_pct": 100.0 * float(jiwer.cer(references, hypotheses)),
    }


def word_errors(references: list[str], hypotheses: list[str]) -> dict[str, list[int]]:
    """Per utterance: word edits and reference words (WER = 100 * sum of errors / sum of units)."""
    import jiwer

    errors, units = [], []
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        out = jiwer.process_words(reference, hypothesis)
        errors.append(out.substitutions + out.deletions + out.insertions)
        units.append(len(reference.split()))
    return {"errors": errors, "units": units}


def evaluate(
    model: nn.Module, exp: Experiment, split: str, device, n_samples: int = 0
) -> tuple[dict, list, dict]:
    """WER / CER of the configured decoder (with beam also greedy_wer_pct, greedy_cer_pct from the same pass);
    the first `n_samples` utterances with reference and hypothesis; each utterance's word errors."""
    out = _decode(model, exp, split, device, exp.eval)
    rates = error_rates(out["refs"], out["hyps"])
    if exp.eval.decoder == "beam":
        rates |= {f"greedy_{k}": v for k, v in error_rates(out["refs"], out["greedy"]).items()}
    samples = [
        {"id": i, "reference": r, "hypothesis": h}
        for i, r, h in list(zip(out["ids"], out["refs"], out["hyps"], strict=True))[:n_samples]
    ]
    return rates, samples, word_errors(out["refs"], out["hyps"])


def monitor(model: nn.Module, exp: Experiment, device) -> dict:
    """The per-epoch validation during training: greedy WER / CER (the acoustic model alone), under DDP
    sharded over the ranks (the corpus rates of all the ranks' hypotheses, as one process computes them)."""
    cfg = Eval(batch_size=exp.train.batch_size, decoder="greedy")
    out = _decode(model, exp, "val", device, cfg, shard=True)
    return error_rates(out["refs"], out["greedy"])
