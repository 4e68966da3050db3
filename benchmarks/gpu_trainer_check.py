"""The trainer's own phases on a GPU: where a training step makes the host wait, and compiled Deep Speech 2.

    python3 benchmarks/gpu_trainer_check.py              # on a GPU (--device cpu: a smoke run, nothing to count)

Two rows train dense, then sparse, through the trainer's `run_phase` (loader, autocast, fused optimizer,
pruner, checkpoints, per-epoch validation): the paper's ResNet-18 row (its precision, channels-last decision,
optimizer and `train_crop`) on generated ImageNet-size JPEGs, once with `decode: cpu` and once with
`decode: device`, and Deep Speech 2 at the paper's size (its model, precision and optimizer) on the embedded
generated utterances. During each sparse phase `torch.cuda.set_sync_debug_mode("warn")` makes every operation
that blocks the host on the GPU warn; each warning is counted by the innermost frame of dsd's code it came from
(and torch's function it called), split into the training steps' (inside `train_epoch`) and the rest
(validation, checkpoints, the pruner's set-up). Printed per site: the count and the count per training step.

Then Deep Speech 2's sparse phase runs again from the same dense checkpoint with `compile: true`: its loss,
the least fraction of zeros in a pruned tensor (the in-place masking held), zeros differing from eager's,
and the time per step of eager and compiled training.
"""

import argparse
import collections
import contextlib
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402

from dsd import hparams, paths  # noqa: E402
from dsd.config import parse_config  # noqa: E402
from dsd.engine import checkpoint, prepare  # noqa: E402
from dsd.engine.trainer import run_phase  # noqa: E402

SPARSITY = 0.5


class SyncCounter:
    """Counts CUDA sync-debug warnings by where in dsd's code they were raised."""

    def __init__(self):
        self.sites = collections.Counter()

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("always", message=".*synchronizing")  # every one, not once per place
        self._shown, warnings.showwarning = warnings.showwarning, self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._shown
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._shown(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if "/dsd/" in f.filename and "benchmarks" not in f.filename]
        part = "step" if any(f.name == "train_epoch" for f in stack) else "other"
        site = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        torch_call = [f for f in stack if not f.filename.endswith("warnings.py")][-1]
        self.sites[
            (part, site, f"{Path(torch_call.filename).name}:{torch_call.lineno} {torch_call.name}")
        ] += 1

    def report(self, steps: int) -> list[str]:
        lines = []
        for part in ("step", "other"):
            found = {k: n for k, n in self.sites.items() if k[0] == part}
            total = sum(found.values())
            per_step = f" ({total / steps:.2f} per training step)" if part == "step" else ""
            lines.append(f"  {part}: {total} syncs{per_step}")
            for (_, site, call), n in sorted(found.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {n:5d}  {site}  -> {call}")
        return lines


def write_imagenet(root: Path, count: int) -> None:
    """train/<wnid>/ and val/<wnid>/ of generated 500x375 JPEGs."""
    gpu_bench.write_jpegs(root, count)
    gpu_bench.write_jpegs(root / "val-set", count // 4, seed=1)
    (root / "val-set" / "train").rename(root / "val")


def vision_config(tmp: Path, device: str, decode: str):
    overrides = {
        "data": {"decode": decode},
        "train": {
            "batch_size": 32 if device == "cuda" else 4,
            "max_steps_per_epoch": 30 if device == "cuda" else 2,
        },
        "phases": [
            {"kind": "dense", "epochs": 1, "lr": 0.1},
            {"kind": "sparse", "epochs": 1, "lr": 0.01, "sparsity": SPARSITY},
        ],
    }
    return _reparse(tmp, "paper.yaml", "resnet18", device, overrides, data={"imagenet": str(tmp)})


def speech_config(tmp: Path, device: str, compile_: bool = False):
    paper = hparams.load_yaml(ROOT / "configs" / "paper.yaml")["experiments"]["deepspeech2"]
    overrides = {
        "model": paper["model"] if device == "cuda" else {},  # the full size is minutes a step on a CPU
        "train": {**paper["train"], "batch_size": 32 if device == "cuda" else 4, "lr_schedule": "constant",
                  "max_steps_per_epoch": 30 if device == "cuda" else 2},
        "phases": [
            {"kind": "dense", "epochs": 1, "lr": 3.0e-4},
            {"kind": "sparse", "epochs": 2, "lr": 3.0e-4, "sparsity": SPARSITY},
        ],
    }  # fmt: skip
    overrides["train"].pop("lr_anneal", None)
    return _reparse(tmp, "default.yaml", "deepspeech2", device, overrides, compile_=compile_)


def _reparse(tmp: Path, file: str, row: str, device: str, overrides: dict, data=None, compile_=False):
    raw = hparams.load_yaml(ROOT / "configs" / file)
    raw |= {"device": device, "wandb": {"mode": "disabled"}, "rows": [row], "seeds": [0], "compile": compile_}
    raw |= {
        "output_dir": str(tmp / "out"),
        "data_root": str(tmp / "data"),
        "threads": "auto",
        "workers": "auto",
    }
    if data:
        raw["data"] = data
    entry = raw["experiments"][row]
    entry["model"].pop("weights", None)
    for key, value in overrides.items():
        entry[key] = {**entry.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw, check_models=False)


def train(config, row: str, out: Path, count_syncs: bool, dense: Path | None = None):
    """Dense (unless given) then sparse; returns (sparse checkpoint, dense checkpoint, counter, metrics)."""
    prepare.prepare(config.row(row).data_spec().experiment(config.options))
    if dense is None:
        spec = config.phase(row, 0, "dense")
        run_phase(spec, out / "dense", options=config.options)
        dense = paths.checkpoint(out / "dense")
    spec = config.phase(row, 0, "sparse1")
    counter = SyncCounter()
    with counter if count_syncs else contextlib.nullcontext():
        metrics = run_phase(spec, out / "sparse1", init=dense, options=config.options)
    return paths.checkpoint(out / "sparse1"), dense, counter, metrics


def step_ms(metrics: dict) -> float:
    """The last epoch's time per step (a compiled run's first epoch holds its compiling)."""
    last = metrics["history"][-1]
    return last["seconds"] / max(last["steps"], 1) * 1e3


def zeros(path: Path, reference: Path | None = None) -> str:
    saved = checkpoint.load(path)
    masks, model = saved["pruner"]["masks"], saved["model"]
    least = min(float((model[n] == 0).float().mean()) for n in masks)
    text = f"least zero fraction of a pruned tensor {least:.3f} (target {SPARSITY})"
    if reference is not None:
        other = checkpoint.load(reference)["model"]
        differ = sum(int(((model[n] == 0) != (other[n] == 0)).sum()) for n in masks)
        text += f", zeros differing from eager's {differ} of {sum(model[n].numel() for n in masks)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--parts", nargs="+", default=["vision", "speech", "compiled-speech"])
    args = parser.parse_args()
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dsd-trainer-check-") as name:
        tmp = Path(name)
        if "vision" in args.parts:
            write_imagenet(tmp, 640 if args.device == "cuda" else 16)
            for decode in ("cpu", "device"):
                config = vision_config(tmp, args.device, decode)
                start = time.perf_counter()
                _, _, counter, metrics = train(config, "resnet18", tmp / f"vision-{decode}", True)
                steps = sum(h["steps"] for h in metrics["history"])
                print(f"resnet18 (paper row), decode: {decode}: sparse phase {steps} steps, "
                      f"{step_ms(metrics):.1f} ms/step, loss {metrics['history'][-1]['train_loss']:.4f} "
                      f"({time.perf_counter() - start:.0f} s with the dense phase)", flush=True)  # fmt: skip
                print("\n".join(counter.report(steps)), flush=True)
        if {"speech", "compiled-speech"} & set(args.parts):
            config = speech_config(tmp, args.device)
            start = time.perf_counter()
            eager, dense, counter, metrics = train(config, "deepspeech2", tmp / "speech", True)
            steps = sum(h["steps"] for h in metrics["history"])
            print(f"deepspeech2 (paper model), eager: sparse phase {steps} steps, {step_ms(metrics):.1f} ms/step (second epoch), "
                  f"loss {metrics['history'][-1]['train_loss']:.4f}, {zeros(eager)} "
                  f"({time.perf_counter() - start:.0f} s with data and the dense phase)", flush=True)  # fmt: skip
            print("\n".join(counter.report(steps)), flush=True)
            if "compiled-speech" in args.parts:
                config = speech_config(tmp, args.device, compile_=True)
                start = time.perf_counter()
                compiled, _, _, metrics = train(config, "deepspeech2", tmp / "speech-compiled", False, dense)
                print(f"deepspeech2 (paper model), compile: true: {step_ms(metrics):.1f} ms/step (second epoch), "
                      f"loss {metrics['history'][-1]['train_loss']:.4f}, {zeros(compiled, eager)} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
