"""Evaluate a phase's final checkpoint on the validation and test splits, with the row's eval settings.

Evaluation is its own step: its identity is the checkpoint's plus the eval settings (decoder, beam, lexicon,
LM, batch size), so switching how models are evaluated re-runs this step only, never training. A checkpoint
trained for another spec than the one given is refused, unless asked (`any_spec`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsd import hparams, paths, tracks
from dsd.core.masks import Pruner
from dsd.engine import checkpoint, distributed, prepare, resume
from dsd.errors import CheckpointError
from dsd.spec import PhaseSpec, RunOptions, eval_fingerprint
from dsd.tracking import Tracker

SAMPLES = 8  # test items kept with their predictions (captions, transcripts) for the qualitative tables


def evaluate_checkpoint(
    spec: PhaseSpec,
    eval_section,
    path: str | Path,
    options: RunOptions = RunOptions(),
    splits: tuple[str, ...] = ("val", "test"),
    any_spec: bool = False,
) -> dict:
    exp = spec.experiment(options, eval_section)
    track = tracks.get(exp.track)
    track.metric.check(exp)
    state = resume.finished(path)
    saved = state.get("identity") or {}
    why = resume.mismatch(saved, resume.identity(spec, prepare.data_fingerprint(exp)))
    if why is not None and not any_spec:
        raise CheckpointError(
            f"{path}: trained for another spec than {spec.row} seed {spec.seed} {spec.phase} of this config "
            f"({why}); --any-spec evaluates it anyway"
        )
    device = distributed.resolve_device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(options.threads)
    distributed.fast_kernels(device, track.config.FIXED_SHAPES)  # the kernels its training validated with
    model = track.model.build(exp, pretrained=False)  # the checkpoint holds every weight: no pretrained read
    checkpoint.load_model(model, state, path)
    model.to(device)
    if distributed.prefers_channels_last(model, device):  # the layout it trained in
        model.to(memory_format=torch.channels_last)
    result = {
        "row": spec.row,
        "seed": spec.seed,
        "phase": spec.phase,
        "checkpoint": str(path),
        "fingerprint": saved.get("fingerprint"),
        "spec_matches": why is None,
        "eval": hparams.as_dict(eval_section),
        "eval_fingerprint": eval_fingerprint(spec, eval_section),
        "metric": track.config.METRIC,
        "higher_is_better": track.config.HIGHER_IS_BETTER,
        "sparsity": Pruner.from_state_dict(model, state["pruner"]).overall_sparsity()
        if state.get("pruner")
        else 0.0,
    }
    items_of: dict = {}
    for split in splits:
        if split == "test" and "val" in result and track.data.same_folder(exp, "val", "test"):
            result["test"] = result["val"]  # ImageNet reports on its validation set: evaluated once
            items_of["test"] = items_of["val"]
            continue
        with distributed.autocast(distributed.autocast_dtype(exp.train.precision, device)):
            metrics, samples, items_of[split] = track.metric.evaluate(model, exp, split, device, SAMPLES)
        result[split] = metrics
        if samples and (split == "test" or "samples" not in result):
            result["samples"] = samples
    if items_of.get("test"):  # per-item outcomes: the report's interval resamples the test items
        result["test_items"] = items_of["test"]
    if options.wandb.wants("evaluations", device.type == "cuda"):
        log_evaluation(result, spec, options, device)
    return result


def log_evaluation(result: dict, spec: PhaseSpec, options: RunOptions, device) -> None:
    """One wandb run per evaluation, in the (row, seed) group: its metrics as the summary, samples as a Table."""
    tracker = Tracker(
        options.wandb, paths.wandb_dir(options.output_dir), gpu=device.type == "cuda",
        group=f"{spec.row}-seed{spec.seed}", job_type="evaluate", name=f"{spec.row}-seed{spec.seed}-{spec.phase}-eval",
        config={"fingerprint": spec.fingerprint, "phase": spec.phase, "eval": result["eval"]},
    )  # fmt: skip
    splits = [s for s in ("val", "test") if isinstance(result.get(s), dict)]
    tracker.summary({f"{s}/{k}": v for s in splits for k, v in result[s].items()})
    tracker.table("samples", result.get("samples", []))
    tracker.finish()
