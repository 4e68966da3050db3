"""GPU throughput of the paper's vision rows: our data path and training step, a few hundred steps per row.

    .venv/bin/python benchmarks/gpu_bench.py                      # make gpu-bench: every configs/paper.yaml row
    .venv/bin/python benchmarks/gpu_bench.py --rows resnet50 --steps 300

Each row of configs/paper.yaml's ImageNet track trains its sparse phase (the row's model, batch size, optimizer,
precision, channels-last decision, pruner and DataLoader workers, as `dsd train` would) on synthetic
ImageNet-size JPEGs (500x375, quality 90) written to a temporary ImageNet layout; the model starts from random
weights (nothing is downloaded). Reported per row and `data.decode` (cpu: the workers decode and crop; device:
they read the files and draw the crops, nvJPEG decodes on the GPU): images/s after a warm-up, the fraction of
the time the step loop waited for data, the GPU's utilisation (NVML, where installed), peak GPU memory, and the
projected GPU-hours per seed of the row's DSD phases and equal-epoch control on ImageNet's 1,281,167 training
images, and whether the run was sound: its last loss, and the pruned weights left nonzero (a non-finite loss or
a leaked mask fails the script). `--compile yes` trains through torch.compile, as `compile: true`
(`reduce-overhead`: also `compile_mode: reduce-overhead`, which replays each step as CUDA graphs). First, the
two decoding paths' crops of the same draws are compared (mean and largest difference in uint8 levels: nvJPEG's
inverse DCT and the GPU's resize round differently from libjpeg-turbo's and the CPU's; also for grayscale,
CMYK, PNG, progressive and 4:4:4 files), and on CUDA the decoder's write race is checked (`decoder_race`).
The JPEGs are few and re-read from the page cache, so storage speed is not part of the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dsd import hparams  # noqa: E402
from dsd.config import parse_config  # noqa: E402
from dsd.core.masks import Pruner  # noqa: E402
from dsd.core.schedule import CONTROL  # noqa: E402
from dsd.engine import distributed, loaders, trainer  # noqa: E402
from dsd.engine.epoch import _step, defers_loss_read, queue_step  # noqa: E402
from dsd.tracks.vision import data as vision_data  # noqa: E402
from dsd.tracks.vision import metric as vision_metric  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
VISION_ROWS = ("googlenet", "vgg16", "resnet18", "resnet50")


def write_jpegs(root: Path, count: int, classes: int = 4, size=(500, 375), seed: int = 0) -> None:
    """ImageNet-like photos stand-in: smooth random fields with noise (JPEG decode cost depends on content)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-24, 25, size=(height, width, 3))
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.JPEG", quality=90)


def write_odd_images(folder: Path, size=(500, 375)) -> list[tuple[str, int]]:
    """The files ImageNet's training set holds besides baseline RGB JPEGs, each routed its own way under
    `decode: device`: grayscale and CMYK JPEGs and a PNG named .JPEG (decoded by the workers), a progressive
    and a 4:4:4 JPEG (nvJPEG's batched call, or the CPU where it refuses one)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    coarse = rng.uniform(0, 255, size=(size[1] // 25 + 1, size[0] // 25 + 1, 3)).astype(np.uint8)
    rgb = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    kinds = {
        "grayscale": (rgb.convert("L"), {"format": "JPEG", "quality": 90}),
        "cmyk": (rgb.convert("CMYK"), {"format": "JPEG", "quality": 90}),
        "png": (rgb, {"format": "PNG"}),
        "progressive": (rgb, {"format": "JPEG", "quality": 90, "progressive": True}),
        "subsampling444": (rgb, {"format": "JPEG", "quality": 90, "subsampling": 0}),
    }
    files = []
    for name, (image, options) in kinds.items():
        image.save(folder / f"{name}.JPEG", **options)
        files.append((str(folder / f"{name}.JPEG"), 0))
    return files


def paper_config(data_dir: Path, rows: list[str], device: str, batch_size: int | None, workers: int | None):
    raw = hparams.load_yaml(ROOT / "configs" / "paper.yaml")
    raw |= {"device": device, "data": {"imagenet": str(data_dir)}, "wandb": {"mode": "disabled"}}
    raw |= {"output_dir": str(data_dir / "out"), "rows": rows}
    if workers is not None:
        raw["workers"] = workers
    for row in rows:
        entry = raw["experiments"][row]
        entry["model"].pop("weights", None)  # random weights: no download, the same cost per step
        entry["phases"][0] = {"kind": "dense", "epochs": 1, "lr": 0.1}  # a from-scratch start (not timed)
        if batch_size:
            entry["train"]["batch_size"] = batch_size
    return parse_config(raw, check_models=False)


def gpu_utilisation(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # NVML (nvidia-ml-py) not installed
        return None


def compare_decoders(config, row: str, device: torch.device, odd: list, count: int = 64) -> dict:
    """The same draws through both paths: the workers' crops (libjpeg-turbo, CPU resize) against the device's,
    on `count` training JPEGs and, one batch together with them, on each of the `odd` files."""
    exp = config.experiment(row)
    files = vision_data.samples(exp, exp.data.train_dir)[:count]
    diff = crop_differences(exp, files + odd, device)
    by_kind = {Path(path).stem: diff[len(files) + i] for i, (path, _) in enumerate(odd)}
    return {
        "images": len(files),
        "mean_abs_levels": diff[: len(files)].float().mean().item(),
        "max_abs_levels": diff[: len(files)].max().item(),
        "odd_files_max_abs_levels": {kind: d.max().item() for kind, d in by_kind.items()},
    }


def crop_differences(exp, files: list, device: torch.device) -> torch.Tensor:
    from torch.utils.data import default_collate

    cpu = vision_data.ImageFolderData(files, exp.data, train=True, in_memory=False)
    keys = [(i, 1000 + i) for i in range(len(files))]
    workers_crops = default_collate([cpu[key] for key in keys])[0].to(device)
    device_crops = vision_data.decode_crops(encoded_batch(exp, files, keys), device)
    return (workers_crops.int() - device_crops.int()).abs()


def decoder_race(config, row: str, device: torch.device, iterations: int = 40, tensors: int = 16) -> dict:
    """Does decoding on the GPU write into memory that kernels queued before it still read? Each iteration
    fills tensors the size of a decoded image, queues a spin kernel and then one sum per tensor, frees the
    tensors while the sums wait, and decodes a batch (the allocator may hand the decoder the freed blocks):
    an iteration whose sums come out wrong was corrupted. Run through our `decode_crops` (which drains the
    stream first: expect 0) and through torchvision's `decode_jpeg` alone (the race: above 0 where nvJPEG's
    hardware engine decodes, as on an H100)."""
    exp = config.experiment(row)
    files = vision_data.samples(exp, exp.data.train_dir)[:8]
    batch = encoded_batch(exp, files, [(i, i) for i in range(len(files))])
    raw = list(torch.split(batch.files, batch.lengths.tolist()))
    size = decode_jpeg(raw[0]).shape  # the block size the decoder asks for
    decoders = {
        "decode_crops": lambda: vision_data.decode_crops(batch, device),
        "decode_jpeg_alone": lambda: decode_jpeg(raw, device=device),
    }
    corrupted = dict.fromkeys(decoders, 0)
    expected = [(i + 1) * math.prod(size) for i in range(tensors)]
    for name, decode in decoders.items():
        for _ in range(iterations):
            values = [torch.full(size, i + 1, dtype=torch.uint8, device=device) for i in range(tensors)]
            torch.cuda.synchronize(device)
            torch.cuda._sleep(50_000_000)  # tens of ms of queued work ahead of the sums
            sums = [v.sum() for v in values]
            del values  # freed on this stream while the sums are still queued
            decode()
            torch.cuda.synchronize(device)
            corrupted[name] += [int(s) for s in sums] != expected
    return {"iterations": iterations} | {f"corrupted_{name}": n for name, n in corrupted.items()}


def decode_rate(config, row: str, device: torch.device, repeats: int = 5) -> float:
    """Images/s of the device's part alone (decode, crop, flip) on one training batch of encoded files."""
    exp = config.experiment(row)
    files = vision_data.samples(exp, exp.data.train_dir)[: exp.train.batch_size]
    batch = encoded_batch(exp, files, [(i, i) for i in range(len(files))])
    vision_data.decode_crops(batch, device)  # warm-up: nvJPEG's handles, kernels
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        vision_data.decode_crops(batch, device)
    synchronize(device)
    return repeats * len(files) / (time.perf_counter() - start)


def encoded_batch(exp, files: list, keys: list) -> vision_data.EncodedCrops:
    """The `decode: device` workers' batch of these (index, seed) keys."""
    on_device = dataclasses.replace(exp.data, decode="device")
    readers = vision_data.ImageFolderData(files, on_device, train=True, in_memory=False)
    return vision_data.collate_encoded([readers[key] for key in keys])[0]


def trainer_step(state, loss, grad_clip, pending, losses: list, waiting: bool = False):
    """The rest of the trainer's step after the forward pass (`dsd.engine.epoch.train_epoch`): with a fused
    optimizer the loss is read one step late and a non-finite step skipped on the device, else the host waits
    for the loss before backward. Appends read losses; returns this step's pending read."""
    if waiting or not defers_loss_read(state):
        losses.append(float(loss.detach()))
        _step(state, loss, grad_clip)
        return None
    queued = queue_step(state, loss, grad_clip, 1, 0)
    if pending is not None:
        losses.append(pending.read()[0])
    return queued


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_row(config, row: str, steps: int, warmup: int, decode: str, workers: int, compiled: str) -> dict:
    exp = config.experiment(row)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, decode=decode))
    spec = config.phase(row, 0, "sparse1")
    sparse = spec.recipe["sparse1"]
    device, _, _ = distributed.setup(config.options.device)
    if device.type == "cpu":
        torch.set_num_threads(config.options.threads)
    state = trainer.build(exp, spec, device, sparse.lr)
    state.pruner = Pruner(state.model, sparse.sparsity, exclude=exp.prune.exclude, include=exp.prune.include)
    state.model.train()
    forward = state.model  # as the trainer's `compile: true` (and `compile_mode`)
    if compiled != "no":
        forward = torch.compile(state.model, mode="default" if compiled == "yes" else compiled)
    files = vision_data.samples(exp, exp.data.train_dir)
    reps = math.ceil((steps + warmup) * exp.train.batch_size / len(files))
    dataset = vision_data.ImageFolderData(files * reps, exp.data, train=True, in_memory=False)
    collate = vision_data.collate_encoded if decode == "device" else None
    batches = iter(
        loaders.loader(dataset, exp.train.batch_size, train=True, workers=workers, collate_fn=collate)
    )
    wait = busy = 0.0
    utilisation, losses, pending = [], [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:  # the clock starts once workers, cuDNN's autotuner and the allocator are warm
            synchronize(device)
            start, wait = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        with distributed.autocast(state.dtype):
            loss = vision_metric.loss(forward, batch, device)
        pending = trainer_step(state, loss, exp.train.grad_clip, pending, losses)
        wait += fetched - before
        if step >= warmup and step % 10 == 0 and (value := gpu_utilisation(device)) is not None:
            utilisation.append(value)
    synchronize(device)
    busy = time.perf_counter() - start
    if pending is not None:
        losses.append(pending.read()[0])
    images_per_s = steps * exp.train.batch_size / busy
    parameters = dict(state.model.named_parameters())
    leaked = sum(int(parameters[n][m == 0].ne(0).sum()) for n, m in state.pruner.masks.items())
    after_dense = config.phase(row, 0, CONTROL).phases[1:]
    epochs = 2 * sum(p.epochs for p in after_dense)  # DSD's phases and the control's, the same epochs
    return {
        "row": row,
        "decode": decode,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "batch_size": exp.train.batch_size,
        "precision": str(state.dtype).replace("torch.", "") if state.dtype else "fp32",
        "channels_last": distributed.prefers_channels_last(state.model, device),
        "workers": workers,
        "compile": compiled,
        "steps": steps,
        "pruned_weights_nonzero": leaked,  # the masks hold after every step (0), compiled or not
        "last_loss": losses[-1],
        "images_per_s": images_per_s,
        "data_wait_fraction": wait / busy,
        "gpu_utilisation_pct": float(np.mean(utilisation)) if utilisation else None,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda"
        else None,
        "epochs_per_seed": epochs,
        "projected_gpu_hours_per_seed": epochs * IMAGENET_TRAIN_IMAGES / images_per_s / 3600,
    }


def report(results: list[dict], checks: dict, out: Path) -> None:
    """The newest row on the console; the summary so far to disk (a long sweep keeps what it measured)."""
    r = results[-1]
    print(
        f"{r['row']} decode={r['decode']} workers={r['workers']} compile={r['compile']}: "
        f"{r['images_per_s']:.0f} images/s, last loss {r['last_loss']:.3g}, data wait "
        f"{r['data_wait_fraction']:.0%}, {r['projected_gpu_hours_per_seed']:.1f} GPU-hours per seed",
        flush=True,
    )
    (out / "summary.json").write_text(json.dumps({"decoders": checks, "rows": results}, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(results))


def markdown(results: list[dict]) -> str:
    head = (
        "row",
        "decode",
        "workers",
        "compile",
        "device",
        "batch",
        "precision",
        "images/s",
        "data wait",
        "GPU util",
    )
    head += ("GPU-hours/seed", "last loss")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        util = f"{r['gpu_utilisation_pct']:.0f}%" if r["gpu_utilisation_pct"] is not None else "n/a"
        lines.append(
            f"| {r['row']} | {r['decode']} | {r['workers']} | {r['compile']} | {r['device']} | "
            f"{r['batch_size']} | "
            f"{r['precision']} | {r['images_per_s']:.0f} | {r['data_wait_fraction']:.0%} | {util} | "
            f"{r['projected_gpu_hours_per_seed']:.1f} | {r['last_loss']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(VISION_ROWS), choices=VISION_ROWS)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--files", type=int, default=512, help="distinct JPEGs (re-read in turn)")
    parser.add_argument(
        "--batch", type=int, default=None, help="override the rows' batch sizes (CPU smoke test)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader workers, one or more values (a sweep: where `decode: device` stops paying); "
        "default: paper.yaml's auto",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        default=["cpu", "device"],
        choices=("cpu", "device"),
        help="data.decode values",
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["no"],
        choices=("no", "yes", "reduce-overhead"),
        help="torch.compile the forward/backward (yes: as `compile: true`; reduce-overhead: also "
        "`compile_mode: reduce-overhead`, CUDA graphs); several values: a comparison",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the script)")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu"), help="summary folder")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device here (--device cpu runs a smoke test of the script)")
    results = []
    with tempfile.TemporaryDirectory(prefix="dsd-gpu-bench-") as tmp:
        write_jpegs(Path(tmp), args.files)
        odd = write_odd_images(Path(tmp) / "odd")
        config = paper_config(Path(tmp), args.rows, args.device, args.batch, (args.workers or [None])[0])
        device = torch.device(args.device)
        checks = {
            "crops": attempt(compare_decoders, config, args.rows[0], device, odd),
            "device_images_per_s": attempt(decode_rate, config, args.rows[0], device),
            "race": attempt(decoder_race, config, args.rows[0], device) if device.type == "cuda" else None,
        }
        print(f"decoders: {checks}", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for row in args.rows:
            for workers in args.workers or [config.options.workers]:
                for decode in args.decode:
                    for compiled in args.compile:
                        result = bench_row(config, row, args.steps, args.warmup, decode, workers, compiled)
                        results.append(result)
                        report(results, checks, out)
    print(markdown(results), end="")
    unsound = [f"{r['row']} decode={r['decode']} workers={r['workers']}" for r in results if not sound(r)]
    if unsound:  # a run that diverged or lost its masks measures nothing worth reporting
        sys.exit(f"gpu_bench: non-finite loss or unmasked pruned weights in {', '.join(unsound)}")


def attempt(check, *args):
    """A check's result, or what failed (the throughput rows still run; the summary says so)."""
    try:
        return check(*args)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def sound(result: dict) -> bool:
    return math.isfinite(result["last_loss"]) and result["pruned_weights_nonzero"] == 0


if __name__ == "__main__":
    main()
