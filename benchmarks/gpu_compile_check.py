"""Does compiled training, with or without CUDA graphs, train what eager training does, masks included?

    python3 benchmarks/gpu_compile_check.py              # on a GPU (cpu: a smoke run, where no CUDA graphs form)

A tiny vision row (mini ResNet-18 on generated shapes) trains dense, sparse and re-dense through the trainer's
own `run_phase` eagerly; then its sparse and re-dense phases run again from that dense checkpoint three times:
eager again, `compile: true`, and `compile: true` with `compile_mode: reduce-overhead`, in fp32 (TF32 stays on,
as in every CUDA job) so that mixed precision's rounding does not swamp the comparison. Printed per rerun, at the
end of the sparse phase: the smallest fraction of zeros in a pruned tensor (it must reach the sparsity: the
pruner's in-place masking held after every step), how many zeros differ from the first eager run's, and the
weight gap to that run and to a compiled run, as a share of how far the sparse phase moved the weights. Weights
that a graph replayed stale would be about 100% apart; "eager again" is the device's own run-to-run spread
(cuDNN's autotuner and atomic adds may pick other kernels or orders each run; on the CPU all gaps are 0).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dsd import paths  # noqa: E402
from dsd.config import parse_config  # noqa: E402
from dsd.engine import checkpoint, prepare  # noqa: E402
from dsd.engine.trainer import run_phase  # noqa: E402

ROW, SPARSITY = "resnet18", 0.3
VARIANTS = {"eager": {"compile": False}, "default": {"compile": True}}
VARIANTS["reduce-overhead"] = {"compile": True, "compile_mode": "reduce-overhead"}


def config(tmp: Path, device: str, options: dict):
    phases = [
        {"kind": "dense", "epochs": 1, "lr": 0.05},
        {"kind": "sparse", "epochs": 2, "lr": 0.005, "sparsity": SPARSITY},
        {"kind": "redense", "epochs": 1},
    ]
    row = {
        "track": "vision",
        "dataset": "shapes",
        "model": {"arch": "resnet18", "size": "mini", "width": 8, "num_classes": 10},
        "data": {"image_size": 32, "resize": 32, "val_dir": "val", "test_dir": "test", "in_memory": True},
        "train": {"batch_size": 16, "lr_schedule": "cosine", "max_steps_per_epoch": 6, "precision": "fp32"},
        "prune": {"exclude": ["conv1.weight"]},
        "phases": phases,
    }
    row["data"]["generate"] = {"per_class": {"train": 12, "val": 2, "test": 2}}
    raw = {"output_dir": str(tmp / "results"), "data_root": str(tmp / "data"), "seeds": [0], "rows": [ROW]}
    raw |= {"device": device, "threads": 4, "wandb": {"mode": "disabled"}, "experiments": {ROW: row}}
    return parse_config(raw | options)


def train(tmp: Path, device: str, options: dict, dense: Path | None = None) -> dict:
    """The final checkpoints (paths) of one run of the row's phases; from the given dense checkpoint if any."""
    cfg = config(tmp, device, options)
    prepare.prepare(cfg.row(ROW).data_spec().experiment(cfg.options))
    saved = {} if dense is None else {"dense": dense}
    for phase in ("dense", "sparse1", "redense1")[dense is not None :]:
        spec = cfg.phase(ROW, 0, phase)
        out = paths.run_dir(cfg.options.output_dir, ROW, 0, phase)
        init = None if spec.previous() is None else saved[spec.previous().phase]
        run_phase(spec, out, init=init, options=cfg.options)
        saved[phase] = paths.checkpoint(out)
    return saved


def gap(a: dict, b: dict, names: list[str]) -> float:
    return float(torch.cat([(a[n].float() - b[n].float()).flatten() for n in names]).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsd-compile-check-") as tmp:
        # every variant's sparse phase starts from eager's dense checkpoint, so the gaps are the sparse phase's own
        saved = {"eager": train(Path(tmp) / "eager", args.device, VARIANTS["eager"])}
        for name, options in VARIANTS.items():
            dense = saved["eager"]["dense"]
            saved[name if name != "eager" else "eager again"] = train(
                Path(tmp) / name, args.device, options, dense
            )
        runs = {
            name: (checkpoint.load(s["dense"]), checkpoint.load(s["sparse1"])) for name, s in saved.items()
        }
    dense, eager = runs["eager"][0]["model"], runs["eager"][1]["model"]
    floats = [n for n, v in eager.items() if v.is_floating_point() and "running_" not in n]
    moved = gap(eager, dense, floats)
    failed = False
    for name in ("eager again", "default", "reduce-overhead"):
        sparse = runs[name][1]
        masks, model = sparse["pruner"]["masks"], sparse["model"]
        zeros = min(float((model[n] == 0).float().mean()) for n in masks)
        differ = sum(int(((model[n] == 0) != (eager[n] == 0)).sum()) for n in masks)
        total = sum(model[n].numel() for n in masks)  # the checkpoint packs masks 8 to a byte
        other = runs["reduce-overhead" if name == "default" else "default"][1]["model"]
        print(
            f"{name}: least zero fraction of a pruned tensor {zeros:.3f} (target {SPARSITY}); "
            f"zeros differing from eager's {differ} of {total}; weight gap to eager "
            f"{gap(model, eager, floats) / moved:.2%} and to the other compiled run "
            f"{gap(model, other, floats) / moved:.2%} of the sparse phase's movement"
        )
        failed |= zeros < SPARSITY - 0.01
    if failed:
        sys.exit("gpu_compile_check: a pruned tensor lost zeros under compile")


if __name__ == "__main__":
    main()
