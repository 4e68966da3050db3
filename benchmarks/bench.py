"""Benchmarks of the DSD implementation against torch.nn.utils.prune and a bare PyTorch loop.

Every timing figure is a ratio measured inside one process, each section in a fresh interpreter of its own:
the variants run interleaved (A, B, then B, A on the next repetition, so slow drift of a shared machine hits
both equally), one ratio per repetition, and the summary gives the median with the interquartile range and
min-max of those per-repetition ratios.
Times are process CPU time by default (one thread; `--wall` for wall-clock).

    .venv/bin/python benchmarks/bench.py            # full run, about 7-11 minutes on a 2-core CPU
    .venv/bin/python benchmarks/bench.py --quick    # ~1-minute smoke run of every section (smaller sizes)

Writes results/benchmarks/*.csv and results/benchmarks/summary.md (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torchvision import models

from dsd import hparams
from dsd.config import Config, load_config, parse_config
from dsd.core.masks import Pruner, prunable_parameters
from dsd.core.schedule import lr_at
from dsd.engine import prepare
from dsd.engine.distributed import prefers_channels_last
from dsd.engine.loaders import epoch_seed
from dsd.engine.trainer import run_phase
from dsd.tracks.captioning.model import ShowAndTell
from dsd.tracks.speech import config as speech_config
from dsd.tracks.speech import data as speech_data
from dsd.tracks.speech import metric as speech_metric
from dsd.tracks.speech import model as speech_model
from dsd.tracks.vision import data as vision_data
from dsd.tracks.vision import metric as vision_metric
from dsd.tracks.vision import model as vision_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks"
THREADS = 1  # the embedded config's `threads: 1`; one thread is also the least noisy on a shared 2-core box
SPARSITY = 0.3
# Process CPU time: with one thread it is the time the work itself took, without the time other jobs on a
# shared machine held the core (`--wall` switches to wall-clock time).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]

# Targets of the "Benchmarks" issue.
TARGET_SELECTION_SPEEDUP = 3.0  # ours >= 3x faster than prune.l1_unstructured
TARGET_STEP_OVERHEAD_PCT = 3.0  # pruner.step adds <= 3% to a resnet50 training step
TARGET_TRAIN_BYTES = 1.0  # mask bytes per pruned weight while training
TARGET_CKPT_BITS = 1.0  # mask bits per pruned weight in a checkpoint
TARGET_TRAINER_RATIO = 0.99  # project loop samples/s >= 0.99x a bare loop
TARGET_LOADER_RATIO = 2.0  # vision training images/s per loader worker, after / before (float32 crops)

# DeepSpeech 2: configs/paper.yaml's deepspeech2 row (161 log-spectrogram bins) for selection and memory.
PAPER_DS2 = load_config(ROOT / "configs" / "paper.yaml", check_models=False).row("deepspeech2")
DS2_PAPER = PAPER_DS2.model
# A training step of the paper-size model takes minutes on this CPU: the step benchmark keeps the paper's
# convolutions and recurrent cell but 3 layers of 512.
DS2_STEP = dataclasses.replace(DS2_PAPER, rnn_hidden=512, rnn_layers=3)
DS2_QUICK = dataclasses.replace(DS2_PAPER, rnn_hidden=256, rnn_layers=3)
DS2_FEATURES = 161
DS2_PRUNE = {"include": PAPER_DS2.prune.include, "exclude": PAPER_DS2.prune.exclude}
NEURALTALK_VOCAB = 2538  # Flickr8k train captions, words seen >= 5 times (the paper's NeuralTalk setting)


# ------------------------------------------------------------------------------------------ statistics
def interleaved(
    variants: dict[str, Callable[[], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run the variants in turn, rotating the order each repetition (A, B / B, A; with three variants every
    one takes every position equally often); each callable returns its seconds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name]()
            if rep >= warmup:
                times[name].append(seconds)
    return times


def pin_allocator() -> bool:
    """Fixed glibc malloc thresholds for this process. By default glibc moves its mmap threshold as large
    blocks are freed, so whether a tensor's memory comes fresh from the kernel (page faults, counted as CPU
    time) depends on what the process did before: two loops doing the same arithmetic in one process measured
    twice the page faults and system time for one of them. Fixed, a freed block is reused by the next
    allocation. False where the C library is not glibc (the thresholds are then left as they are)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_threshold, trim_threshold = -3, -1  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        return bool(libc.mallopt(mmap_threshold, 1 << 30) and libc.mallopt(trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def timed(fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return clock() - start


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "q1": q[0],
        "q3": q[2],
        "min": min(values),
        "max": max(values),
    }


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def verdict(value: float, target: float, higher_is_better: bool, stats: dict | None = None) -> str:
    """PASS or MISS (with the shortfall relative to the target) of the median; flagged when the IQR
    reaches the other side of the target, i.e. the noise is too large to call it."""
    ok = value >= target if higher_is_better else value <= target
    text = (
        "PASS"
        if ok
        else f"MISS by {abs(value - target) / target * 100:.1f}% (got {value:.4g}, target {target:g})"
    )
    if stats is not None:
        low, high = stats["q1"], stats["q3"]
        if low < target < high:
            text += f"; IQR {low:.3g}-{high:.3g} straddles the target: not resolved at this noise level"
    return text


def fmt(stats: dict[str, float], digits: int = 2) -> str:
    return (
        f"{stats['median']:.{digits}f} (IQR {stats['q1']:.{digits}f}-{stats['q3']:.{digits}f}, "
        f"min-max {stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
    )


# ------------------------------------------------------------------------------------------------ models
def neuraltalk() -> nn.Module:
    """The paper's NeuralTalk language model: VGG fc7 features (4096), embed 512, LSTM 512, ~2.5k words."""
    return ShowAndTell(4096, NEURALTALK_VOCAB, 512, 512, 0.5)


def deepspeech2(cfg: speech_config.Model) -> nn.Module:
    return speech_model.DeepSpeech2(DS2_FEATURES, cfg)


def model_zoo(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], dict]]:
    """name -> (builder, Pruner include/exclude of the row in configs/default.yaml)."""
    vision_models = (
        ("resnet18", "resnet50", "googlenet") if quick else ("resnet18", "resnet50", "vgg16", "googlenet")
    )
    zoo = {}
    for arch in vision_models:
        extra = {"aux_logits": True, "init_weights": True} if arch == "googlenet" else {}
        zoo[arch] = (
            lambda arch=arch, extra=extra: models.get_model(arch, num_classes=1000, **extra),
            {"exclude": (vision_model.first_conv(arch),)},
        )
    zoo["neuraltalk"] = (neuraltalk, {"exclude": ("embed.weight",)})
    ds2 = DS2_QUICK if quick else DS2_PAPER
    zoo["deepspeech2"] = (
        lambda: deepspeech2(ds2),
        DS2_PRUNE,
    )
    return zoo


def torch_prune(model: nn.Module, names: list[str], amount: float) -> None:
    """torch's reparametrisation (weight_orig * weight_mask) on the named parameters."""
    modules = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RNN flat weights are no longer one contiguous chunk
        for name in names:
            owner, attr = name.rsplit(".", 1)
            prune.l1_unstructured(modules[owner], attr, amount)


def torch_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: dict(model.named_buffers())[n + "_mask"] for n in names}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------- 1. mask selection
def bench_selection_model(
    name: str, build: Callable[[], nn.Module], patterns: dict, reps: int, warmup: int
) -> dict:
    """Pruner(...) construction (select + zero in place) vs prune.l1_unstructured on every prunable tensor.

    Each repetition works on fresh deep copies (copying is not timed), so no run sees already-pruned weights.
    """
    torch.manual_seed(0)
    model = build()
    names = list(prunable_parameters(model, **patterns))
    result: dict = {}

    def ours() -> float:
        target = copy.deepcopy(model)
        seconds = timed(lambda: result.__setitem__("ours", Pruner(target, SPARSITY, **patterns)))
        return seconds

    def theirs() -> float:
        target = copy.deepcopy(model)
        seconds = timed(lambda: torch_prune(target, names, SPARSITY))
        result["torch_model"] = target
        return seconds

    times = interleaved({"ours": ours, "torch": theirs}, reps=reps, warmup=warmup)
    pruner, torch_model = result["ours"], result["torch_model"]
    ours_pruned = {n: int((~m).sum()) for n, m in pruner.masks.items()}
    torch_pruned = {n: int((m == 0).sum()) for n, m in torch_masks(torch_model, names).items()}
    mismatched = [n for n in names if ours_pruned.get(n) != torch_pruned[n]]
    speedup = spread(ratios(times["torch"], times["ours"]))
    return {
        "model": name,
        "params": count_params(model),
        "pruned_tensors": len(names),
        "masked_weights": sum(p.numel() for n, p in model.named_parameters() if n in names),
        "reps": reps,
        "ours_s_median": statistics.median(times["ours"]),
        "torch_s_median": statistics.median(times["torch"]),
        **{f"speedup_{k}": v for k, v in speedup.items()},
        "pruned_entries": sum(ours_pruned.values()),
        "same_count_every_tensor": not mismatched,
        "mismatched_tensors": ";".join(mismatched),
        "status": verdict(speedup["median"], TARGET_SELECTION_SPEEDUP, higher_is_better=True, stats=speedup),
        "_times": times,
    }


def bench_selection(quick: bool) -> list[dict]:
    rows = []
    for name, (build, patterns) in model_zoo(quick).items():
        big = name in ("vgg16", "deepspeech2")  # 138M and 68M weights: the slowest rounds
        reps = 2 if quick else (3 if big else 5)
        row = bench_selection_model(name, build, patterns, reps, warmup=0 if big else 1)
        print(
            f"  selection {name}: speedup {fmt(spread(ratios(row['_times']['torch'], row['_times']['ours'])))}"
        )
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. step overhead
def vision_batch(batch: int, size: int):
    return torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))


def speech_batch(batch: int, frames: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((batch,), frames, dtype=torch.long)
    target_lengths = torch.full((batch,), frames // 10, dtype=torch.long)
    return {
        "features": torch.randn(batch, frames, DS2_FEATURES, generator=g),
        "lengths": lengths,
        "targets": torch.randint(1, len(speech_data.ALPHABET), (int(target_lengths.sum()),), generator=g),
        "target_lengths": target_lengths,
    }


def vision_loss(model: nn.Module, batch) -> torch.Tensor:
    return vision_metric.loss(model, batch, torch.device("cpu"))


def speech_loss(model: nn.Module, batch) -> torch.Tensor:
    return speech_metric.loss(model, batch, torch.device("cpu"))


def train_step(model, optimizer, loss_fn, batch, pruner: Pruner | None = None, pruner_times=None) -> float:
    """One forward, backward, optimizer.step (+ pruner.step); returns seconds (pruner.step's share recorded)."""
    start = clock()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    optimizer.step()
    if pruner is not None:
        before = clock()
        pruner.step(optimizer)
        pruner_times.append(clock() - before)
    return clock() - start


def bench_step_model(
    name: str, build, patterns: dict, loss_fn, batch, make_opt, reps: int, setting: str
) -> list[dict]:
    """Dense step vs dense step + pruner.step (same model and optimizer) vs torch's reparametrised copy, in the
    trainer's memory layout (channels-last for the CNNs) with its fused SGD."""
    torch.manual_seed(0)
    model = build()
    model.train()
    names = list(prunable_parameters(model, **patterns))
    reparam = copy.deepcopy(model)
    torch_prune(reparam, names, SPARSITY)  # torch's pruning needs the default layout (`view(-1)`)
    if prefers_channels_last(model, torch.device("cpu")):
        model = model.to(memory_format=torch.channels_last)
        reparam = reparam.to(memory_format=torch.channels_last)
        setting += ", channels-last"
    optimizer = make_opt(model)
    pruner = Pruner(model, SPARSITY, **patterns)
    torch_opt = make_opt(reparam)
    inner: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved(
            {
                "dense": lambda: train_step(model, optimizer, loss_fn, batch),
                "ours": lambda: train_step(model, optimizer, loss_fn, batch, pruner, inner),
                "torch": lambda: train_step(reparam, torch_opt, loss_fn, batch),
            },
            reps=reps,
            warmup=1,
        )
    inner = inner[-reps:]
    dense = times["dense"]
    ours_pct = spread([(r - 1) * 100 for r in ratios(times["ours"], dense)])
    torch_pct = spread([(r - 1) * 100 for r in ratios(times["torch"], dense)])
    share_pct = spread([p / (t - p) * 100 for p, t in zip(inner, times["ours"], strict=True)])
    common = {
        "model": name,
        "setting": setting,
        "reps": reps,
        "dense_step_s_median": statistics.median(dense),
    }
    target = TARGET_STEP_OVERHEAD_PCT if name == "resnet50" else None
    rows = []
    for method, stats in (
        ("ours: pruner.step, A/B step ratio", ours_pct),
        ("ours: pruner.step call / rest of step", share_pct),
        ("torch reparametrisation, A/B step ratio", torch_pct),
    ):
        status = "(no target)"
        if target is not None and method.startswith("ours"):
            status = verdict(stats["median"], target, higher_is_better=False, stats=stats)
        rows.append(
            common
            | {"method": method}
            | {f"overhead_pct_{k}": v for k, v in stats.items()}
            | {"status": status}
        )
    return rows


def sgd(lr: float, momentum: float, nesterov: bool, weight_decay: float):
    return lambda m: torch.optim.SGD(
        m.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=True
    )  # as make_optimizer


def bench_step(quick: bool) -> list[dict]:
    size, batch, reps = (112, 4, 3) if quick else (224, 8, 9)
    rows = bench_step_model(
        "resnet50",
        lambda: models.resnet50(num_classes=1000),
        {"exclude": ("conv1.weight",)},
        vision_loss,
        vision_batch(batch, size),
        sgd(0.01, 0.9, False, 5e-4),
        reps,
        f"batch {batch} at {size}x{size}, fused SGD momentum 0.9, weight decay 5e-4",
    )
    ds2 = DS2_QUICK if quick else DS2_STEP
    frames, sbatch, sreps = (100, 2, 3) if quick else (200, 4, 6)
    rows += bench_step_model(
        "deepspeech2",
        lambda: deepspeech2(ds2),
        DS2_PRUNE,
        speech_loss,
        speech_batch(sbatch, frames),
        sgd(1e-4, 0.99, True, 0.0),
        sreps,
        f"{ds2.rnn_layers} bidirectional {ds2.rnn_type.upper()} layers of {ds2.rnn_hidden}, paper convolutions, batch {sbatch} x "
        f"{frames} frames x {DS2_FEATURES} bins, fused SGD Nesterov 0.99",
    )
    for row in rows:
        print(f"  step {row['model']} {row['method']}: {row['overhead_pct_median']:+.2f}%")
    return rows


# ------------------------------------------------------------------------------------------- 3. memory
def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and plain tensor attribute (torch's recomputed `weight`) of a model."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        tensors += [v for v in vars(module).values() if torch.is_tensor(v)]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    return total


def saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def bench_memory_model(name: str, build, patterns: dict) -> dict:
    torch.manual_seed(0)
    model = build()
    dense_bytes, dense_ckpt = tensor_bytes(model), saved_bytes(model.state_dict())
    reparam = copy.deepcopy(model)
    pruner = Pruner(model, SPARSITY, **patterns)
    names = list(pruner.masks)
    masked = sum(m.numel() for m in pruner.masks.values())
    torch_prune(reparam, names, SPARSITY)
    ours_train = tensor_bytes(model) + sum(m.nbytes for m in pruner.masks.values()) - dense_bytes
    torch_train = tensor_bytes(reparam) - dense_bytes
    state = pruner.state_dict()
    payload = sum(p.nbytes for p in state["masks"].values())
    ours_ckpt = saved_bytes({"model": model.state_dict(), "pruner": state}) - dense_ckpt
    torch_ckpt = saved_bytes(reparam.state_dict()) - dense_ckpt
    return {
        "model": name,
        "masked_weights": masked,
        "ours_train_bytes_per_weight": ours_train / masked,
        "torch_train_bytes_per_weight": torch_train / masked,
        "ours_ckpt_bits_per_weight": ours_ckpt * 8 / masked,
        "ours_ckpt_mask_payload_bits_per_weight": payload * 8 / masked,
        "torch_ckpt_bits_per_weight": torch_ckpt * 8 / masked,
        "train_status": verdict(ours_train / masked, TARGET_TRAIN_BYTES, higher_is_better=False),
        "ckpt_status": verdict(ours_ckpt * 8 / masked, TARGET_CKPT_BITS, higher_is_better=False),
    }


def bench_memory(quick: bool) -> list[dict]:
    """Exact byte counts (no timing). The two >100M-parameter models are skipped: per-weight figures do not
    depend on size, and copying them costs more than a minute."""
    rows = []
    for name, (build, patterns) in model_zoo(quick=True).items():
        if name == "deepspeech2":
            build = lambda: deepspeech2(DS2_QUICK if quick else DS2_STEP)  # noqa: E731
        rows.append(bench_memory_model(name, build, patterns))
        print(f"  memory {name}: {rows[-1]['ours_train_bytes_per_weight']:.3f} B/w training")
    return rows


# ------------------------------------------------------------------------------------ 4. trainer overhead
def trainer_config(tmp: Path, epochs: int, per_class: int, val: int) -> Config:
    """configs/default.yaml's resnet18 row, one dense phase, on a small generated shapes set in `tmp`."""
    raw = hparams.load_yaml(ROOT / "configs" / "default.yaml")
    raw |= {"data_root": str(tmp), "output_dir": str(tmp / "out"), "device": "cpu", "threads": THREADS}
    raw |= {"wandb": {"mode": "disabled"}, "rows": ["resnet18"]}
    row = raw["experiments"]["resnet18"]
    raw["experiments"] = {"resnet18": row}  # the other vision rows share 'shapes' as the config generates it
    row["phases"] = [{"kind": "dense", "epochs": epochs, "lr": 0.05}]
    row["data"] = row["data"] | {"generate": {"per_class": {"train": per_class, "val": val, "test": val}}}
    config = parse_config(raw, check_models=False)
    prepare.prepare(config.experiment("resnet18"))
    return config


class TimedLoader:
    """Wraps a training loader: time from the first batch asked for to the end of the epoch's loop over it,
    i.e. the epoch's training steps, and each step's share (from handing out one batch to the next)."""

    def __init__(self, loader, seconds: list[float], step_seconds: list[float]):
        self.loader, self.seconds, self.step_seconds = loader, seconds, step_seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        start = last = clock()
        try:
            for batch in self.loader:
                yield batch
                now = clock()
                self.step_seconds.append(now - last)  # the step on this batch and fetching the next
                last = now
        finally:  # also when the loop breaks early and the generator is closed
            self.seconds.append(clock() - start)


def project_run(config: Config, out_dir: Path) -> dict[str, float]:
    """dsd.engine.trainer.run_phase, timed through wrappers of the vision track's `train_loader` and `monitor`."""
    epoch_seconds: list[float] = []
    step_seconds: list[float] = []
    val_seconds: list[float] = []
    original_loader, original_monitor = vision_data.train_loader, vision_metric.monitor

    def train_loader(*args, **kwargs):
        return TimedLoader(original_loader(*args, **kwargs), epoch_seconds, step_seconds)

    def monitor(model, exp_, device):
        start = clock()
        result = original_monitor(model, exp_, device)
        val_seconds.append(clock() - start)
        return result

    vision_data.train_loader, vision_metric.monitor = train_loader, monitor
    try:
        start = clock()
        run_phase(config.phase("resnet18", 0, "dense"), out_dir, options=config.options)
        whole = clock() - start
    finally:
        vision_data.train_loader, vision_metric.monitor = original_loader, original_monitor
    steps = sum(epoch_seconds)
    return {
        "steps": steps,
        "steps+val": steps + sum(val_seconds),
        "whole call": whole,
        "median step": statistics.median(step_seconds),
    }


def bare_run(config: Config) -> dict[str, float]:
    """The minimal loop doing the trainer's arithmetic: the same model builder and initial weights, the same
    Dataset object, batch size, SGD settings and per-step LR (the phase's schedule)."""
    start_call = clock()
    torch.set_num_threads(THREADS)
    torch.manual_seed(epoch_seed(0))  # the trainer's seed for seed 0's initial weights
    exp = config.experiment("resnet18")
    model = vision_model.build(exp)
    layout = (
        torch.channels_last if prefers_channels_last(model, torch.device("cpu")) else torch.contiguous_format
    )
    model = model.to(memory_format=layout)  # the trainer's layout
    hp, phase = exp.train, config.row("resnet18").phases[0]
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=phase.lr,
        momentum=hp.momentum,
        nesterov=hp.nesterov,
        weight_decay=hp.weight_decay,
        fused=True,  # as the trainer's (make_optimizer)
    )
    data = vision_data.dataset(exp, "train")
    epochs, per_epoch = int(phase.epochs), math.ceil(len(data) / hp.batch_size)
    epoch_seconds: list[float] = []
    step_seconds: list[float] = []
    step = 0
    for _ in range(epochs):
        model.train()
        loader = torch.utils.data.DataLoader(data, batch_size=hp.batch_size, shuffle=True)
        for images, labels in TimedLoader(loader, epoch_seconds, step_seconds):
            optimizer.param_groups[0]["lr"] = lr_at(phase.lr, step, epochs * per_epoch, hp.lr_schedule)
            step += 1
            optimizer.zero_grad(set_to_none=True)
            images = images.contiguous(memory_format=layout)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    steps = sum(epoch_seconds)
    return {
        "steps": steps,
        "steps+val": steps,
        "whole call": clock() - start_call,
        "median step": statistics.median(step_seconds),
    }


def bench_trainer(quick: bool) -> list[dict]:
    epochs, reps, per_class = (1, 2, 16) if quick else (2, 15, 64)  # short runs: many repetitions
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        tmp = Path(tmp)
        config = trainer_config(tmp, epochs, per_class, val=10)
        samples = (
            len(vision_data.dataset(config.experiment("resnet18"), "train")) * epochs
        )  # decoded once, untimed
        batch = config.experiment("resnet18").train.batch_size
        results: dict[str, list[dict]] = {"project": [], "bare": []}
        counter = iter(range(10**6))

        def project() -> float:
            results["project"].append(project_run(config, tmp / "out" / f"run{next(counter)}"))
            return 0.0

        def bare() -> float:
            results["bare"].append(bare_run(config))
            return 0.0

        interleaved({"project": project, "bare": bare}, reps=reps, warmup=1)
    rows = []
    for scope, label in (
        ("median step", "median training step (robust to a busy machine's stalls)"),
        ("steps", "training steps only (validation excluded)"),
        ("steps+val", "training steps + per-epoch validation (project) vs steps (bare: has none)"),
        ("whole call", "whole call: model build, epochs, checkpoints"),
    ):
        project_times = [r[scope] for r in results["project"][-reps:]]
        bare_times = [r[scope] for r in results["bare"][-reps:]]
        stats = spread(ratios(bare_times, project_times))  # samples/s ratio = inverse time ratio
        per_time = batch if scope == "median step" else samples
        rows.append(
            {
                "scope": label,
                "samples_per_run": samples,
                "reps": reps,
                "project_samples_per_s": per_time / statistics.median(project_times),
                "bare_samples_per_s": per_time / statistics.median(bare_times),
                **{f"ratio_{k}": v for k, v in stats.items()},
                "status": verdict(stats["median"], TARGET_TRAINER_RATIO, higher_is_better=True, stats=stats)
                if scope in ("steps", "median step")
                else "(no target)",
            }
        )
        print(f"  trainer {scope}: {fmt(stats, 3)}")
    return rows


# ------------------------------------------------------------------------------------ 6. job start-up
def bench_startup(quick: bool) -> list[dict]:
    """`python -m dsd` as Snakemake runs it: a fresh interpreter (DSD_PREFORK=0) vs a child of the warm one.

    Wall-clock of the whole command, interleaved; the warm server is started before timing (its one-off
    imports are the cost of the first job of a pipeline, not of every job)."""
    reps, per_class = (1, 4) if quick else (5, 8)  # quick: a smoke run, one interleaved pair per command
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        tmp = Path(tmp)
        config = trainer_config(tmp, 1, per_class, val=2)
        spec = config.phase("resnet18", 0, "dense").to_json()
        train = ["train", "--spec", spec, "--options", config.options.to_json(), "--out", str(tmp / "run")]
        commands = {
            "check-config (start-up only)": ["check-config", str(ROOT / "configs" / "default.yaml")],
            "train a 1-epoch phase (tiny data)": train,
        }
        env = os.environ | {"DSD_PREFORK_DIR": str(tmp), "WANDB_MODE": "disabled"}

        def run(args: list[str], prefork: str) -> float:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "dsd", *args],
                env=env | {"DSD_PREFORK": prefork},
                check=True,
                capture_output=True,
                cwd=ROOT,
            )
            return time.perf_counter() - start

        for name, args in commands.items():
            run(args, "1")  # starts (or reuses) the server
            times = interleaved(
                {"fresh": lambda args=args: run(args, "0"), "warm": lambda args=args: run(args, "1")},
                reps=reps,
                warmup=0,
            )
            fresh, warm = statistics.median(times["fresh"]), statistics.median(times["warm"])
            speedup = spread(ratios(times["fresh"], times["warm"]))
            rows.append(
                {"command": name, "fresh_s": fresh, "warm_s": warm, "saved_s": fresh - warm}
                | {f"speedup_{k}": v for k, v in speedup.items()}
            )
    return rows


# ------------------------------------------------------------------------------------ 7. config path
def bench_config_path(quick: bool) -> list[dict]:
    """Reading and checking a config, as `dsd check-config` and a Snakemake dry run do: wall-clock per command,
    and whether it imports torch (each command also runs once with a `torch` on the path that fails to
    import: it must still succeed). Parameter names for the prune-pattern check are cached after the first."""
    reps = 1 if quick else 5  # quick: a smoke run of each command
    paper = str(ROOT / "configs" / "paper.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        poison = Path(tmp) / "poison" / "torch"
        poison.mkdir(parents=True)
        (poison / "__init__.py").write_text("raise ImportError('torch imported')\n")
        data = "data={imagenet: /in, flickr8k: /fl, librispeech: /ls}"
        commands = {
            "dsd check-config configs/paper.yaml": [sys.executable, "-m", "dsd", "check-config", paper],
            "snakemake -n --configfile configs/paper.yaml": [
                sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", tmp, "-n", "-q", "rules",
                "--configfile", paper, "--config", data, "--cores", "1",
            ],
        }  # fmt: skip
        env = os.environ | {"DSD_PREFORK": "0"}
        for name, cmd in commands.items():
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp)  # fills the names cache
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp)
                times.append(time.perf_counter() - start)
            poisoned = subprocess.run(
                cmd, env=env | {"PYTHONPATH": str(poison.parent)}, capture_output=True, cwd=tmp
            )
            rows.append(
                {"command": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                 "imports_torch": "no" if poisoned.returncode == 0 else "yes"}
            )  # fmt: skip
            print(f"  {name}: {rows[-1]['median_s']:.2f} s, imports torch: {rows[-1]['imports_torch']}")
    return rows


# ---------------------------------------------------------------------------------- 8. speech data path
SPEECH_1X = 1200  # "1x": the embedded corpus' training utterances when written (12 voices x 100; now 12 x 60)

_MEMORY_JOB = """
import json, sys, time
from dsd.config import parse_config
from dsd.engine import prepare
from dsd.engine.distributed import prefers_channels_last
from dsd.engine.trainer import run_phase
config = parse_config(json.loads(sys.argv[1]), check_models=False)
start = time.perf_counter()
prepare.prepare(config.experiment("ds"))
prepared = time.perf_counter() - start
run_phase(config.phase("ds", 0, "dense"), sys.argv[2], options=config.options)
# VmHWM, not ru_maxrss: Linux carries a parent's peak into ru_maxrss across fork + exec (the bench's own)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"prepare_s": prepared, "peak_rss_mb": peak_kb / 1024}))
"""


def write_speech_corpus(root: Path, train: int, seed: int = 0) -> float:
    """LibriSpeech layout, train/dev/test, 1-3 s of tones and noise per utterance; returns training hours."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "cloud", "light"]
    seconds = 0.0
    for split, count in (("train", train), ("dev", 100), ("test", 100)):
        for chapter in range(0, count, 100):
            folder = root / split / "19" / str(chapter)
            folder.mkdir(parents=True)
            lines = []
            for i in range(chapter, min(count, chapter + 100)):
                n = int(rng.integers(16000, 48000))
                wav = 0.1 * rng.standard_normal(n) + 0.3 * np.sin(np.arange(n) * rng.uniform(0.05, 0.2))
                uid = f"19-{chapter}-{i:05d}"
                sf.write(folder / f"{uid}.flac", wav.astype("float32"), 16000)
                lines.append(f"{uid} {' '.join(rng.choice(words, size=int(rng.integers(2, 5))))}")
                seconds += n / 16000 if split == "train" else 0
            (folder / f"19-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return seconds / 3600


def bench_speech_memory(quick: bool) -> list[dict]:
    """Peak RSS of one process that prepares a LibriSpeech-layout corpus (features streamed to disk) and trains
    a dense epoch on it (features read utterance by utterance), at 1x and 10x the embedded corpus' size; and
    the feature extraction's throughput. Target: the 10x peak within 1.2x of the 1x peak."""
    rows = []
    scales, base = ((1, 3), SPEECH_1X // 10) if quick else ((1, 10), SPEECH_1X)
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        for scale in scales:
            root = Path(tmp) / f"corpus{scale}"
            hours = write_speech_corpus(root, base * scale)
            raw = {
                "data": {"librispeech": str(root)}, "data_root": str(Path(tmp) / f"data{scale}"),
                "output_dir": str(Path(tmp) / f"out{scale}"), "device": "cpu", "threads": THREADS, "workers": 2,
                "wandb": {"mode": "disabled"},
                "experiments": {"ds": {
                    "track": "speech", "dataset": "librispeech",
                    "model": {"arch": "deepspeech2", "conv_channels": 8, "conv_kernels": [[5, 5], [5, 5]],
                              "rnn_hidden": 64, "rnn_layers": 2, "rnn_type": "gru", "stride": 3},
                    "data": {"feature": "logspec", "train": "train", "val": "dev", "test": "test"},
                    "train": {"batch_size": 16, "max_steps_per_epoch": 40, "precision": "fp32"},
                    "phases": [{"kind": "dense", "epochs": 1, "lr": 0.01}]}},
            }  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-c", _MEMORY_JOB, json.dumps(raw), str(Path(tmp) / f"run{scale}")],
                capture_output=True, text=True, env=os.environ | {"DSD_PREFORK": "0"},
            )  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"speech memory job ({scale}x) failed:\n{done.stderr[-2000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            utterances = base * scale + 200
            rows.append(
                {"scale": f"{scale}x", "train_utterances": base * scale, "train_hours": round(hours, 2),
                 "peak_rss_mb": measured["peak_rss_mb"], "prepare_s": measured["prepare_s"],
                 "utterances_per_s": utterances / measured["prepare_s"]}
            )  # fmt: skip
            print(
                f"  speech {scale}x: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['utterances_per_s']:.0f} utt/s"
            )
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    for row in rows:
        row["rss_ratio_to_1x"] = row["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        row["status"] = verdict(ratio, 1.2, higher_is_better=False) if row is rows[-1] else ""
    return rows


# ---------------------------------------------------------------------------------------- 5. pipeline
def pipeline_benchmarks(rules_dir: Path) -> pd.DataFrame | None:
    """Sum Snakemake `benchmark:` files: wall seconds summed, peak max_rss, per rule (phase) and per row."""
    files = sorted(rules_dir.rglob("*.tsv"))
    if not files:
        return None
    records = []
    for path in files:
        parts = path.relative_to(rules_dir).with_suffix("").parts
        table = pd.read_csv(path, sep="\t")
        if len(parts) == 3:  # <row>/seed<seed>/<phase>.tsv, <phase>.eval.tsv
            phase, _, step = parts[2].partition(".")
            rule, row = (f"evaluate:{phase}" if step == "eval" else f"train:{phase}"), parts[0]
        else:  # prepare_<dataset>.tsv
            rule, row = parts[-1], "(data)"
        records.append({"rule": rule, "row": row, "s": table["s"].mean(), "max_rss": table["max_rss"].max()})
    jobs = pd.DataFrame(records)
    out = []
    for level in ("rule", "row"):
        grouped = jobs.groupby(level).agg(
            jobs=("s", "size"), wall_s=("s", "sum"), peak_max_rss_mb=("max_rss", "max")
        )
        out.append(grouped.reset_index().rename(columns={level: "name"}).assign(level=level))
    total = {"level": "total", "name": "all", "jobs": len(jobs), "wall_s": jobs["s"].sum()}
    out.append(pd.DataFrame([total | {"peak_max_rss_mb": jobs["max_rss"].max()}]))
    return pd.concat(out, ignore_index=True)[["level", "name", "jobs", "wall_s", "peak_max_rss_mb"]]


# ----------------------------------------------------------------------------------------- reporting
def table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    rows = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, r in df.iterrows():
        cells = []
        for key in columns:
            value = r[key]
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary(results: dict, quick: bool, clock_name: str, seconds: dict[str, float]) -> str:
    sel, step, mem, trainer, pipeline, startup = (
        results[k] for k in ("selection", "step", "memory", "trainer", "pipeline", "startup")
    )
    sel = sel.assign(speedup=[fmt(r) for r in spread_rows(sel, "speedup")])
    step = step.assign(overhead=[fmt(r) for r in spread_rows(step, "overhead_pct")])
    trainer = trainer.assign(ratio=[fmt(r, 3) for r in spread_rows(trainer, "ratio")])
    head = [
        "# DSD benchmarks",
        "",
        f"{'QUICK smoke run (reduced sizes, 1 to 3 repetitions: not for quoting)' if quick else 'Full run'}; "
        f"torch {torch.__version__}, {THREADS} CPU thread(s) (torch.set_num_threads({THREADS})), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; {sum(seconds.values()):.0f} s wall in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + ").",
        "Timings are per-repetition ratios of interleaved A/B runs in one process (a fresh one per section): median "
        "(IQR, min-max over repetitions), measured in "
        + (
            "wall-clock time."
            if clock_name == "wall"
            else "process CPU time (time.process_time; --wall for wall-clock)."
        ),
        "",
        f"## 1. Mask selection at {SPARSITY:.0%}: Pruner(...) vs prune.l1_unstructured "
        f"(target: >= {TARGET_SELECTION_SPEEDUP:g}x on every model)",
        "",
        table(
            sel,
            {
                "model": "model",
                "params": "params",
                "pruned_tensors": "tensors",
                "ours_s_median": "ours s",
                "torch_s_median": "torch s",
                "speedup": "speedup (torch/ours)",
                "same_count_every_tensor": "same #pruned per tensor",
                "status": "target",
            },
        ),
        "",
        "DeepSpeech-2: "
        + (
            f"reduced (3 {DS2_QUICK.rnn_type.upper()} layers of 256) in --quick"
            if quick
            else _ds2_text(DS2_PAPER)
        )
        + "; NeuralTalk: ShowAndTell(4096-d VGG features, vocab 2538, embed 512, LSTM 512), embedding dense.",
        "",
        f"## 2. Sparse-phase step overhead (target: <= {TARGET_STEP_OVERHEAD_PCT:g}% on resnet50, "
        "ours A/B ratio)",
        "",
        table(
            step,
            {
                "model": "model",
                "setting": "setting",
                "dense_step_s_median": "dense step s",
                "method": "method",
                "overhead": "overhead % of dense step",
                "status": "target",
            },
        ),
        "",
        "'pruner.step call / rest of step' times the call inside the same steps (less noisy than the A/B "
        "difference of two whole steps).",
        "",
        "## 3. Memory per pruned weight (exact byte counts of the tensors and of torch.save output)",
        "",
        table(
            mem,
            {
                "model": "model",
                "masked_weights": "masked weights",
                "ours_train_bytes_per_weight": "ours B/w training",
                "torch_train_bytes_per_weight": "torch B/w training",
                "train_status": f"target <= {TARGET_TRAIN_BYTES:g} B/w",
                "ours_ckpt_bits_per_weight": "ours bits/w ckpt",
                "ours_ckpt_mask_payload_bits_per_weight": "ours mask payload bits/w",
                "torch_ckpt_bits_per_weight": "torch bits/w ckpt",
                "ckpt_status": f"target <= {TARGET_CKPT_BITS:g} bit/w",
            },
        ),
        "",
        "Checkpoint figures: size of torch.save({model state, pruner.state_dict()}) (ours) or of the pruned "
        "model's state dict (torch) minus the dense state dict, per masked weight; the payload column is the "
        "packed masks alone (the rest is pickle/zip framing per tensor).",
        "",
        f"## 4. Trainer overhead: dsd.engine.trainer.run_phase vs a bare loop (target: >= {TARGET_TRAINER_RATIO:g}x "
        "samples/s, training steps only)",
        "",
        "Both loops do the same arithmetic (initial weights, per-step LR) and are timed by the same loader "
        "wrapper: each step from handing out one batch to the next. The median step shows the steady per-step "
        "cost; the epochs' total also carries the busy machine's stalls.",
        "",
        table(
            trainer,
            {
                "scope": "what is timed",
                "project_samples_per_s": "project samples/s",
                "bare_samples_per_s": "bare samples/s",
                "ratio": "project / bare",
                "status": "target",
            },
        ),
        "",
        "resnet18 row of configs/default.yaml (mini, width 8, 32x32, batch 64, SGD with a cosine LR), one dense phase, "
        "generated shapes data, wandb disabled, progress bar off.",
        "",
        "## 5. Pipeline (Snakemake benchmark files)",
        "",
    ]
    if pipeline is None:
        head.append("No files under results/benchmarks/rules/: run `make run` first.")
    else:
        head.append(
            table(
                pipeline,
                {
                    "level": "level",
                    "name": "name",
                    "jobs": "jobs",
                    "wall_s": "wall s (sum)",
                    "peak_max_rss_mb": "peak max_rss MB",
                },
            )
        )
        head += [
            "",
            "Jobs that ran in the warm interpreter (dsd.prefork, the default on a CPU machine) report the "
            "max_rss of their small client process, not of the training.",
        ]
    startup = startup.assign(speedup=[fmt(r) for r in spread_rows(startup, "speedup")])
    head += [
        "",
        "## 6. Job start-up: fresh interpreter vs the warm one (dsd.prefork), wall-clock per command",
        "",
        table(
            startup,
            {
                "command": "command",
                "fresh_s": "fresh s",
                "warm_s": "warm s",
                "saved_s": "saved s per job",
                "speedup": "fresh / warm",
            },
        ),
        "",
        "Medians over interleaved runs of `python -m dsd ...` in subprocesses, as Snakemake starts its jobs; "
        "the train command trains the resnet18 row for one epoch of a tiny generated set (wandb disabled).",
        "",
        "## 7. Config path: reading and checking a config without the ML stack (target: check-config < 1 s, "
        "no torch import)",
        "",
        table(
            results["config"],
            {
                "command": "command",
                "median_s": "median s",
                "min_s": "min s",
                "max_s": "max s",
                "imports_torch": "imports torch",
            },
        ),
        "",
        "Wall-clock of whole commands in fresh interpreters (no warm interpreter); `imports torch` is no when the "
        "command succeeds with a `torch` on the path that raises on import. The prune-pattern check reads "
        "parameter names from a per-user cache, filled once (a subprocess builds the models on the meta device).",
        "",
        "## 8. Speech data path: peak memory at 1x and 10x the embedded corpus (target: 10x within 1.2x of 1x)",
        "",
        table(
            results["speech_memory"],
            {
                "scale": "corpus",
                "train_utterances": "train utterances",
                "train_hours": "train hours",
                "peak_rss_mb": "peak RSS MB",
                "rss_ratio_to_1x": "ratio to 1x",
                "prepare_s": "prepare s",
                "utterances_per_s": "features utt/s",
                "status": "status",
            },
        ),
        "",
        "One process prepares a LibriSpeech-layout corpus of 1-3 s utterances (161-bin log spectra computed by 2 "
        "worker processes and streamed to one file) and trains a small Deep Speech 2 for 40 steps with 2 loader "
        "workers reading utterances from that file; peak RSS is the process's own (VmHWM), so it also counts the "
        "index of every utterance.",
        "",
        f"## 9. Vision training loader, per worker (target: >= {TARGET_LOADER_RATIO:g}x images/s)",
        "",
        table(
            results["loader"].assign(ratio=[fmt(r) for r in spread_rows(results["loader"], "ratio")]),
            {
                "decode": "data.decode",
                "handed_over": "a worker hands over",
                "images": "JPEGs",
                "batch_size": "batch",
                "before_images_per_s": "before img/s (float32 crops)",
                "after_images_per_s": "after img/s",
                "ratio": "after / before",
                "status": "target",
            },
        ),
        "",
        "ImageNet-size JPEGs (500x375, quality 90; `gpu_bench.write_jpegs`), the paper rows' training transforms "
        "(decode, RandomResizedCrop to 224 with scale 0.08-1, flip); one DataLoader worker feeds the main process, "
        "which only receives the batches; wall clock, interleaved repetitions. Before: each crop scaled and "
        "normalised to float32 in the worker (602 KB per image through the queue); after: uint8 crops (150 KB), "
        "scaled and normalised on the device by `vision.data.to_model_input` (the same operations, the same "
        "numbers). Decoding the full JPEG is the floor on the CPU (the last row: a worker that only decodes; "
        "a DCT-scaled decode cannot keep 224 pixels across RandomResizedCrop's boxes on 500x375 images, 106-499 "
        "px a side), so with libjpeg-turbo's exact decode no CPU path reaches that row's ratio. `data.decode: device`: "
        "the worker reads the file, parses its header and draws the crop box and flip (the same draws, so the "
        "same crops); nvJPEG decodes and crops on the GPU. This row is the CPU's share per image; the GPU's side, "
        "and when each setting trains faster, is `make gpu-bench`'s (README, paper section).",
        "",
        "## 10. Optimizer step: torch's default SGD vs the fused one the trainer uses (no target)",
        "",
        table(
            results["optimizer"].assign(
                speedup=[fmt(r) for r in spread_rows(results["optimizer"], "speedup")]
            ),
            {
                "model": "model",
                "weights": "weights",
                "params": "params",
                "tensors": "tensors",
                "default_ms": "default ms",
                "fused_ms": "fused ms",
                "speedup": "default / fused",
            },
        ),
        "",
        "One `optimizer.step()` of SGD (momentum 0.9, weight decay 5e-4) over the model's parameters, gradients "
        "given; default: torch's implementation for CPU tensors (tensor by tensor), fused: `fused=True`, as "
        "`dsd.engine.trainer.make_optimizer` builds SGD, Adam and AdamW where the device has fused kernels. "
        "With channels-last weights (the trainer's layout for the CNNs) torch 2.11's fused CPU kernel first "
        "copies each 4-D gradient to contiguous memory, a copy it does not use, so it gains less there.",
    ]
    return "\n".join(head) + "\n"


def _ds2_text(cfg: speech_config.Model) -> str:
    return (
        f"configs/paper.yaml size ({cfg.rnn_layers} bidirectional {cfg.rnn_type.upper()} layers of {cfg.rnn_hidden}, "
        f"conv {cfg.conv_channels}ch, {DS2_FEATURES} bins) for selection; smaller in steps/memory (see there)"
    )


def spread_rows(df: pd.DataFrame, prefix: str) -> list[dict[str, float]]:
    keys = ("median", "q1", "q3", "min", "max")
    return [{k: r[f"{prefix}_{k}"] for k in keys} for _, r in df.iterrows()]


# ------------------------------------------------------------------------------------ 9. vision loader
def loader_images_per_s(dataset, batch: int, batches: int) -> float:
    """One worker process feeding the main process, which only receives (the device's work is not timed):
    images per second of wall clock, after the worker's start-up and first batch."""
    device = getattr(dataset, "cfg", None) is not None and dataset.cfg.decode == "device"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=1, prefetch_factor=4,
        collate_fn=vision_data.collate_encoded if device else None,
    )  # fmt: skip
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    del it
    return batches * batch / seconds


class DecodedFiles(torch.utils.data.Dataset):
    """Each file decoded whole (libjpeg-turbo) and put through torchvision `transform`s: the workers' path
    before (crop, flip, scale and normalise in float32 there), and the decode's bound (a 1-pixel crop)."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(vision_data.decode(path)), label


def bench_loader(quick: bool) -> list[dict]:
    """The paper rows' training transforms on ImageNet-size JPEGs (500x375, quality 90), per worker: before,
    each worker decoded, cropped and handed over normalised float32 crops; now uint8 crops (normalised on the
    device, `to_model_input`), or with `data.decode: device` the file's bytes and its crop box (decoded and
    cropped on the GPU: `make gpu-bench` measures that side)."""
    from gpu_bench import write_jpegs
    from torchvision.transforms import v2

    from dsd.tracks.vision.config import Data

    files, batch, batches, reps = (64, 16, 4, 2) if quick else (256, 64, 12, 5)
    cfg = Data(image_size=224, resize=256, crop_scale_min=0.08)
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        write_jpegs(Path(tmp), files)
        files_once = [(str(p), 0) for p in sorted(Path(tmp).rglob("*.JPEG"))]
        samples = files_once * math.ceil((batches + 1) * batch / files)  # the first batch is untimed
        cpu = vision_data.ImageFolderData(samples, cfg, train=True, in_memory=False)
        variants = {
            "before": DecodedFiles(
                samples,
                v2.Compose(
                    [
                        *cpu.transform.transforms,
                        v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(vision_data.IMAGENET_MEAN, vision_data.IMAGENET_STD),
                    ]
                ),
            ),
            "cpu": cpu,
            "device": vision_data.ImageFolderData(
                samples, dataclasses.replace(cfg, decode="device"), train=True, in_memory=False
            ),
            # the bound of any worker that decodes the whole JPEG: the decode, and a 1-pixel crop handed over
            "decode alone": DecodedFiles(samples, v2.CenterCrop(1)),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):  # interleaved, the order rotating
            names = list(variants)[rep % len(variants) :] + list(variants)[: rep % len(variants)]
            for name in names:
                rates[name].append(loader_images_per_s(variants[name], batch, batches))
    rows = []
    handed_over = {
        "cpu": "uint8 crops",
        "device": "file bytes + crop box",
        "decode alone": "1 pixel: the decode alone (the bound)",
    }
    for name, what in handed_over.items():
        stats = spread(ratios(rates[name], rates["before"]))
        print(f"  loader, decode {name}: {fmt(stats)}")
        rows.append(
            {
                "decode": "device" if name == "device" else "cpu",
                "handed_over": what,
                "images": files,
                "batch_size": batch,
                "reps": reps,
                "before_images_per_s": statistics.median(rates["before"]),
                "after_images_per_s": statistics.median(rates[name]),
                **{f"ratio_{k}": v for k, v in stats.items()},
                "status": _loader_status(name, stats),
            }
        )
    return rows


def _loader_status(name: str, stats: dict) -> str:
    if name == "decode alone":
        return "(no target: the most a full decode allows)"
    status = verdict(stats["median"], TARGET_LOADER_RATIO, higher_is_better=True, stats=stats)
    # the decode moves to the GPU, not timed here: what this row passes is the CPU's share of each image
    return f"{status} (the CPU's share: the GPU decodes, make gpu-bench)" if name == "device" else status


# ------------------------------------------------------------------------------------ 10. optimizer step
def bench_optimizer(quick: bool) -> list[dict]:
    """One SGD step (momentum 0.9, weight decay 5e-4) over a model's parameters: torch's default
    implementation for CPU tensors against the fused one the trainer builds (`make_optimizer`), with the
    weights in the layout the trainer gives them (channels-last: `prefers_channels_last`) and contiguous."""
    reps = 3 if quick else 15
    rows = []
    for name in ("resnet18", "resnet50") if quick else ("resnet18", "resnet50", "googlenet", "vgg16"):
        model = models.get_model(
            name, num_classes=1000, **({"init_weights": True} if name == "googlenet" else {})
        )
        trainers = "channels-last" if prefers_channels_last(model, torch.device("cpu")) else "contiguous"
        for layout in dict.fromkeys((trainers, "contiguous")):
            last = layout == "channels-last"
            model = model.to(memory_format=torch.channels_last if last else torch.contiguous_format)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            settings = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
            steppers = {
                "default": torch.optim.SGD(model.parameters(), **settings),
                "fused": torch.optim.SGD(model.parameters(), **settings, fused=True),
            }
            times = interleaved(
                {k: lambda o=o: timed(o.step) for k, o in steppers.items()}, reps=reps, warmup=1
            )
            stats = spread(ratios(times["default"], times["fused"]))
            print(f"  optimizer {name} ({layout}): default / fused {fmt(stats)}")
            rows.append(
                {
                    "model": name,
                    "weights": layout + (" (the trainer's)" if layout == trainers else ""),
                    "params": sum(p.numel() for p in model.parameters()),
                    "tensors": len(list(model.parameters())),
                    "default_ms": 1e3 * statistics.median(times["default"]),
                    "fused_ms": 1e3 * statistics.median(times["fused"]),
                    **{f"speedup_{k}": v for k, v in stats.items()},
                }
            )
    return rows


SECTIONS: dict[str, Callable[[bool], pd.DataFrame | None]] = {
    "selection": lambda quick: pd.DataFrame(bench_selection(quick)),
    "step": lambda quick: pd.DataFrame(bench_step(quick)),
    "memory": lambda quick: pd.DataFrame(bench_memory(quick)),
    "trainer": lambda quick: pd.DataFrame(bench_trainer(quick)),
    "pipeline": lambda quick: pipeline_benchmarks(ROOT / "results" / "benchmarks" / "rules"),
    "startup": lambda quick: pd.DataFrame(bench_startup(quick)),
    "config": lambda quick: pd.DataFrame(bench_config_path(quick)),
    "speech_memory": lambda quick: pd.DataFrame(bench_speech_memory(quick)),
    "loader": lambda quick: pd.DataFrame(bench_loader(quick)),
    "optimizer": lambda quick: pd.DataFrame(bench_optimizer(quick)),
}


def run_sections(quick: bool, wall: bool) -> tuple[dict[str, pd.DataFrame | None], dict[str, float]]:
    """Each section in a fresh interpreter: what one section allocated and freed must not move another's
    figures (in one process, the trainer ratio read 0.97-0.99x after the model-heavy sections and 0.993-0.996x
    alone)."""
    results, seconds = {}, {}
    for i, name in enumerate(SECTIONS, 1):
        print(f"{i}. {name}", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
            result = Path(tmp) / f"{name}.pkl"
            flags = ["--quick"] * quick + ["--wall"] * wall
            subprocess.run(
                [sys.executable, __file__, "--section", name, "--result", str(result), *flags], check=True
            )
            results[name] = pd.read_pickle(result)
        seconds[name] = time.perf_counter() - start
    return results, seconds


def write_csvs(results: dict[str, pd.DataFrame | None]) -> None:
    sel = results["selection"]
    raw = [
        {"model": r["model"], "variant": v, "rep": i, "seconds": t}
        for r in sel.to_dict("records")
        for v, ts in r["_times"].items()
        for i, t in enumerate(ts)
    ]
    sel.drop(columns="_times").to_csv(OUT / "selection.csv", index=False)
    pd.DataFrame(raw).to_csv(OUT / "selection_reps.csv", index=False)
    results["step"].to_csv(OUT / "step_overhead.csv", index=False)
    results["memory"].to_csv(OUT / "memory.csv", index=False)
    results["trainer"].to_csv(OUT / "trainer.csv", index=False)
    results["startup"].to_csv(OUT / "startup.csv", index=False)
    results["config"].to_csv(OUT / "config_path.csv", index=False)
    results["speech_memory"].to_csv(OUT / "speech_memory.csv", index=False)
    results["loader"].to_csv(OUT / "loader.csv", index=False)
    results["optimizer"].to_csv(OUT / "optimizer.csv", index=False)
    if results["pipeline"] is not None:
        results["pipeline"].to_csv(OUT / "pipeline.csv", index=False)


def main(argv: list[str] | None = None) -> int:
    global clock, OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run of every section")
    parser.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the CSVs and summary.md go ({OUT})")
    # one section in this process, its table pickled to --result (how run_sections runs each section)
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    OUT = args.out
    clock = CLOCKS["wall" if args.wall else "cpu"]
    torch.set_num_threads(THREADS)
    pinned = pin_allocator()
    if args.section:
        pd.to_pickle(SECTIONS[args.section](args.quick), args.result)
        return 0
    print(f"glibc malloc thresholds pinned: {pinned}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    results, seconds = run_sections(args.quick, args.wall)
    write_csvs(results)
    text = summary(results, args.quick, "wall" if args.wall else "cpu", seconds)
    (OUT / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
