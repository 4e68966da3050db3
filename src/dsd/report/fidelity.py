"""The fidelity table: per row and aspect, what the paper did, what this config does, and whether that is the
same, a deviation (with the config's reason), or a reading of something the paper leaves unstated.

Aspects: architecture, parameters, pruned (which weight tensors), sparsity, start (pretrained or scratch),
data, features (captioning), augmentation (vision), dropout (vision, captioning), batch_size, optimizer, phases (epochs, LR, sparsity), schedule (the
LR within a phase), metric (and test set); a row's `fidelity:` section gives its reasons under these names.

Our side is computed from the config and the code: models are built on the meta device to count parameters
and to list which weight tensors the prune patterns leave dense. The paper's side is
`reference/paper_rows.yaml` and `reference/dsd_paper_phases.csv`. A deviation without a reason in the row's
`fidelity:` section says so, so nothing departs from the paper unexplained.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import pandas as pd
import torch
import yaml

from dsd import tracks
from dsd.core.masks import prunable_parameters
from dsd.report.tables import paper_phases
from dsd.tracks.captioning.data import SPECIALS
from dsd.tracks.speech.config import n_features
from dsd.words import counted

NO_REASON = "no reason given (add one to the row's fidelity section)"
WSJ_EVALUATION_SETS = (  # the paper's WSJ'92 and WSJ'93: Nov'92's and Nov'93's evaluation sets
    "wsj0/doc/indices/test/nvp/si_et_20.ndx",
    "wsj1/doc/indices/wsj1/eval/h1_p0.ndx",
)


@cache
def paper_rows() -> dict:
    return yaml.safe_load(resources.files("dsd").joinpath("reference/paper_rows.yaml").read_text())


def _line(row, aspect: str, paper: str, ours: str, same: bool | None) -> dict:
    """same=None: the paper leaves it unstated, and ours is a reading."""
    if same is None:
        verdict = f"reading: {row.fidelity.get(aspect, ours)}"
    elif same:
        verdict = "same"
    else:
        verdict = f"deviation: {row.fidelity.get(aspect, NO_REASON)}"
    return {"row": row.name, "aspect": aspect, "paper": paper, "ours": ours, "verdict": verdict}


# the captioning count's vocabulary, fixed (a row's own is its data's): embedding and output layer over these
# tokens, our special ones (<pad>, <start>, <end>, <unk>) among them
CAPTION_TOKENS = 2538


def _built(row):
    """The row's model on the meta device: parameter count, weight tensors pruned and left dense."""
    track = tracks.get(row.track)
    with torch.device("meta"):
        if row.track == "captioning":
            model = track.model.ShowAndTell(
                4096, CAPTION_TOKENS, row.model.embed_dim, row.model.hidden_dim, 0.0
            )
        elif row.track == "speech":
            model = track.model.build(row.experiment())
        else:
            model = track.model._network(row.model)
    named = dict(model.named_parameters())
    pruned = prunable_parameters(model, row.prune.exclude, row.prune.include)
    dense = sorted(n for n, p in named.items() if p.dim() >= 2 and n not in pruned)
    return sum(p.numel() for p in named.values()), pruned, dense


def _dropout(row) -> list[float]:
    """The dropout probabilities of the row's vision model as built (torchvision's defaults, `model.dropout`
    and `model.args` applied), in module order."""
    with torch.device("meta"):
        model = tracks.get("vision").model._network(row.model)
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def _phase_text(kind: str, epochs: float, lr: float, sparsity: float | None) -> str:
    """'sparse 2 epochs at 0.01, 30%' (one epoch: '1 epoch')."""
    return f"{kind} {counted(float(epochs), 'epoch')} at {float(lr):g}" + (
        f", {sparsity:.0%}" if sparsity else ""
    )


def _phases(row) -> tuple[str, str, bool]:
    """The paper's phases after the starting model against ours (epochs, LR, sparsity)."""
    paper = paper_phases()
    paper = paper[(paper["row"] == row.name) & (paper["phase"] != "baseline_equal_epochs")]
    ours = row.recipe.phases
    if paper.empty:
        return "not in the paper", "", False
    theirs = [_phase_text(p.phase, p.epochs, p.lr, p.sparsity) for p in paper.itertuples()]
    mine = [_phase_text(p.kind, p.epochs, p.lr, p.sparsity) for p in ours]
    pairs = list(zip(paper.itertuples(), ours, strict=False))
    same = len(paper) == len(ours) and all(
        (q.kind == "dense" and q.epochs == 0)  # a pretrained start: the paper's dense epochs are that model's
        or (
            abs(q.epochs - p.epochs) < 1e-9
            and abs(q.lr - float(p.lr)) < 1e-12
            and abs(q.sparsity - p.sparsity) < 1e-9
        )
        for p, q in pairs
    )
    return "; ".join(theirs), "; ".join(mine), same


def vision(row) -> list[dict]:
    facts = paper_rows()["vision"]["rows"].get(row.name)
    if facts is None:
        return []
    common, expect, cfg, hp = paper_rows()["vision"]["common"], facts["expect"], row.model, row.train
    count, pruned, dense = _built(row)
    dropout = _dropout(row)
    first = tracks.get("vision").model.FIRST_CONV.get(cfg.arch, "first_conv")
    norm = "batch norm" if cfg.arch != "vgg16" else "no batch norm"
    pretrained = bool(cfg.weights) and row.phases[0].epochs == 0
    paper_phases_text, our_phases, phases_same = _phases(row)
    data = row.data
    return [
        _line(row, "architecture", facts["architecture"], f"torchvision {cfg.arch} ({cfg.size}, {norm})",
              cfg.size == "full" and cfg.arch == expect["arch"] and cfg.arch != "googlenet"),
        _line(row, "parameters", f"{facts['parameters']:,} ({facts['parameters_source']})", f"{count:,}",
              abs(count - facts["parameters"]) <= 0.01 * facts["parameters"]),
        _line(row, "pruned", common["pruned"],
              f"{len(pruned)} weight tensors at {row.recipe.phases[1].sparsity:.0%}; dense: {', '.join(dense) or 'none'}",
              dense == [first] and row.recipe.phases[1].sparsity == 0.3),
        _line(row, "start", common["start"],
              f"pretrained {cfg.weights}, dense phase 0 epochs" if pretrained else f"from scratch, {counted(float(row.phases[0].epochs), 'dense epoch')}",
              pretrained),
        _line(row, "data", common["data"], f"{row.dataset}: train {data.train_dir}/, test {data.test_dir}/",
              row.dataset == "imagenet" and data.test_dir == "val"),
        _line(row, "augmentation", facts["augmentation"], _augmentation(data), False),
        _line(row, "dropout", facts["dropout"], ", ".join(f"{p:g}" for p in dropout) or "none",
              dropout == expect["dropout"]),
        _line(row, "batch_size", f"{facts['batch_size']} ({facts['batch_size_source']})", str(hp.batch_size),
              hp.batch_size == facts["batch_size"]),
        _line(row, "optimizer", facts["optimizer"],
              f"{hp.optimizer}, momentum {hp.momentum:g}{', Nesterov' if hp.nesterov else ''}, weight decay {hp.weight_decay:g}",
              hp.optimizer == "sgd" and hp.momentum == 0.9 and hp.nesterov == expect.get("nesterov", False)
              and hp.weight_decay == expect["weight_decay"]
              and not expect.get("bias_multipliers")),  # Caffe's per-blob LR and decay: one of each here
        _line(row, "phases", paper_phases_text, our_phases, phases_same),
        _line(row, "schedule", f"{common['schedule']}; {facts['schedule_reading']}", _schedule(hp),
              hp.lr_schedule == expect["lr_schedule"]),
        _line(row, "metric", facts.get("metric", common["metric"]),
              f"top-1 / top-5 error on {data.test_dir}/ (resize {data.resize}, centre crop {data.image_size})",
              data.test_dir == "val" and data.resize == 256 and data.image_size == 224
              and not expect.get("eval_warp")),  # no warped evaluation here: its aspect kept
    ]  # fmt: skip


def _augmentation(data) -> str:
    """The training crop (data.train_crop) and flip; never the paper's: Caffe's LMDB warped images to a square,
    fb.resnet.torch added colour jitter and lighting noise (the rows' reasons say which)."""
    if data.train_crop == "random":
        return (
            f"random {data.image_size}x{data.image_size} crops of images resized to {data.resize} on the shorter "
            "side (aspect kept), horizontal flip"
        )
    return f"RandomResizedCrop {data.image_size} ({data.crop_scale_min:g}-1 of the area), horizontal flip"


def _schedule(hp) -> str:
    return {
        "step_epochs": f"step_epochs: /10 every {hp.lr_step_epochs:g} epochs",
        "poly": f"poly, power {hp.lr_power:g}",
        "step": "step: /10 at 50% and 75% of the phase",
        "anneal_epochs": f"anneal_epochs: /{hp.lr_anneal:g} after every epoch",
    }.get(hp.lr_schedule, hp.lr_schedule)


def captioning(row) -> list[dict]:
    facts = paper_rows()["captioning"]["rows"].get(row.name)
    if facts is None:
        return []
    expect, cfg, hp, data = facts["expect"], row.model, row.train, row.data
    count, pruned, dense = _built(row)
    paper_phases_text, our_phases, phases_same = _phases(row)
    encoder = (
        f"row {data.encoder_row} (seed {data.encoder_seed})" if data.encoder_row else data.encoder_weights
    )
    return [
        # torch's LSTM cell is never neuraltalk's (o * tanh(c), two biases): a deviation at any size
        _line(row, "architecture", facts["architecture"],
              f"fc7 -> {cfg.embed_dim}-d image projection, {cfg.embed_dim}-d word embedding, LSTM {cfg.hidden_dim} "
              "(torch's: o * tanh(c), two biases per gate)", False),
        _line(row, "parameters", facts["parameters"], f"{count:,} ({CAPTION_TOKENS:,} tokens, our {len(SPECIALS)} special ones included: a Flickr8k-sized vocabulary, whatever the row's data)", None),
        _line(row, "pruned", facts["pruned"],
              f"{', '.join(sorted(pruned))}; dense: {', '.join(dense) or 'none'}",
              dense == ["embed.weight"]),
        _line(row, "sparsity", facts["sparsity_choice"],
              f"best on validation among {', '.join(f'{s:.0%}' for s in row.sweep)}" if row.sweep else f"{row.recipe.phases[1].sparsity:.0%} fixed",
              0.8 in row.sweep),
        _line(row, "start", facts["start"], f"from scratch, {counted(float(row.phases[0].epochs), 'dense epoch')}", False),
        _line(row, "data", facts["data"], f"{row.dataset} ({data.json or 'dataset_' + row.dataset + '.json'})",
              row.dataset == "flickr8k"),
        _line(row, "features", facts["features"], f"fc7 of {encoder}, {data.image_size} centre crop, standardised",
              False),
        _line(row, "dropout", facts["dropout"], f"{cfg.dropout:g} on the LSTM's inputs and on its outputs",
              cfg.dropout == expect["dropout"]),
        _line(row, "batch_size", str(facts["batch_size"]), str(hp.batch_size), hp.batch_size == facts["batch_size"]),
        _line(row, "optimizer", facts["optimizer"],
              f"{hp.optimizer}, momentum {hp.momentum:g}, weight decay {hp.weight_decay:g}, clip {hp.grad_clip}", None),
        _line(row, "phases", paper_phases_text, our_phases, phases_same),
        _line(row, "schedule", facts["schedule"], _schedule(hp), None),
        _line(row, "vocabulary", facts["vocabulary"],
              f"words seen >= {data.min_count} times, rarer ones dropped from the caption (as neuraltalk); "
              f"training captions cut at {data.max_words} words", None),
        _line(row, "decoding", facts["decoding"],
              f"beam search, width {row.eval.beam_size}, at most {row.eval.max_len} words", None),
        # the paper names no scorer, and neuraltalk's own has no brevity penalty: coco-caption's is a reading
        _line(row, "metric", facts["metric"], "BLEU-1..4 (coco-caption) of beam-search captions on test",
              None if row.dataset == "flickr8k" else False),
    ]  # fmt: skip


def speech(row) -> list[dict]:
    facts = paper_rows()["speech"]["rows"].get(row.name)
    if facts is None:
        return []
    count, pruned, dense = _built(row)
    with torch.device("meta"):
        layers = tracks.get("speech").model.layer_counts(tracks.get("speech").model.build(row.experiment()))
    table_layers = facts["layers"]
    per_layer = [
        abs(ours - paper) <= 0.01 * paper for (_, ours), paper in zip(layers, table_layers, strict=False)
    ]
    layer_text = ", ".join(f"{name} {ours:,}" for name, ours in layers)
    paper_phases_text, our_phases, phases_same = _phases(row)
    hp = row.train
    return [
        _line(row, "architecture", facts["architecture"],
              f"{row.model.arch}: {layer_text}; ReLU clipped at {row.model.relu_clip:g} but in the recurrence", False),
        _line(row, "parameters", f"{facts['parameters']:,} ({facts['parameters_source']}: {', '.join(f'{n:,}' for n in table_layers)})",
              f"{count:,}", abs(count - facts["parameters"]) <= 0.01 * facts["parameters"] and all(per_layer)),
        _line(row, "pruned", facts["pruned"], f"{len(pruned)} weight tensors; dense: {', '.join(dense) or 'none'}",
              dense == sorted(facts["dense"])),
        _line(row, "start", facts["start"], f"from scratch, {counted(float(row.phases[0].epochs), 'dense epoch')}", False),
        _line(row, "data", facts["data"], f"{row.dataset}: train {_names(row.data.train)}, test {_names(row.data.test)}",
              row.dataset == "wsj" and row.name == "deepspeech"),
        _line(row, "features", facts["features"],
              f"{row.data.feature}, {n_features(row.data)} bins of a 20 ms window every 10 ms, normalised per "
              f"utterance{_context(row.model)}; stride {row.model.stride}; training utterances over "
              f"{row.data.max_seconds or 'no'} s dropped", None),
        _line(row, "batch_size", _stated_batch(facts), str(hp.batch_size),
              hp.batch_size == facts["batch_size"] if "batch_size" in facts else None),
        _line(row, "optimizer", facts["optimizer"],
              f"{hp.optimizer}, momentum {hp.momentum:g}{', Nesterov' if hp.nesterov else ''}, weight decay "
              f"{hp.weight_decay:g}, gradient norm clipped at {hp.grad_clip}", _speech_optimizer_same(hp, facts)),
        _line(row, "phases", paper_phases_text, our_phases, phases_same),
        _line(row, "schedule", facts.get("schedule", SPEECH_SCHEDULE), _schedule(hp),
              _speech_schedule_same(hp, facts)),
        _line(row, "metric", facts["metric"], f"WER, {row.eval.decoder} decoding, on {_names(row.data.test)}",
              row.dataset == "wsj" and row.data.test in WSJ_EVALUATION_SETS and row.eval.decoder == "greedy"),
    ]  # fmt: skip


SPEECH_SCHEDULE = (
    "the LR lowered at each retraining (the phases' LRs); within a stage \"decayed the same as conventional "
    "training\", the starting model's decay not stated"
)


def _stated_batch(facts: dict) -> str:
    return f"{facts['batch_size']} ({facts['batch_size_source']})" if "batch_size" in facts else "not stated"


def _speech_optimizer_same(hp, facts: dict) -> bool | None:
    """Against the starting model's recipe where the row's facts give one (Deep Speech 2: Amodei et al.'s),
    else a reading."""
    expect = facts.get("expect")
    if expect is None:
        return None
    return (
        hp.optimizer == "sgd"
        and hp.momentum == expect["momentum"]
        and hp.nesterov == expect["nesterov"]
        and hp.grad_clip == expect["grad_clip"]
    )


def _speech_schedule_same(hp, facts: dict) -> bool | None:
    """Against the starting model's schedule where the row's facts state one (Deep Speech 2: Amodei et al.'s)."""
    if "schedule" not in facts:
        return None
    expect = facts["expect"]
    return hp.lr_schedule == expect["lr_schedule"] and hp.lr_anneal == expect.get("lr_anneal", hp.lr_anneal)


def _context(model) -> str:
    return f", {2 * model.context + 1} frames of context" if model.arch == "deepspeech" else ""


def _names(split) -> str:
    return split if isinstance(split, str) else " + ".join(split)


def table(rows) -> pd.DataFrame:
    lines = []
    for row in rows:
        lines += {"vision": vision, "captioning": captioning, "speech": speech}[row.track](row)
    return pd.DataFrame(lines, columns=["row", "aspect", "paper", "ours", "verdict"])


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "No row of this config is one of the paper's (fidelity compares paper rows only).\n"
    return frame.to_markdown(index=False) + "\n"
