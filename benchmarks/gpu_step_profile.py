"""Where a paper vision row's training step spends its time on a GPU, without a loader (a pinned uint8 batch
copied to the device each step, as the trainer receives it).

    python benchmarks/gpu_step_profile.py cuda 0 googlenet > step_profile.txt

Arguments: device (cuda; cpu is a smoke run), batch size (0: the row's), row. Prints the step time with and
without the pruner, with the trainer's loss read (one step late with a fused optimizer), with the read before
backward and with none; each part synchronised on its own (forward, backward, optimizer, pruner); the step with
torch's foreach optimizer instead of the trainer's fused one; the step with model and batch in the other memory
layout (NCHW where the trainer chose channels-last); the step with float instead of bool masks (whose multiply
the foreach kernels take on their fast path); torch.profiler's tables by host and by device time; and on CUDA
the step compiled with CUDA graphs (`mode="reduce-overhead"`: whether kernel launches are the limit;
`--no-graphs` skips it). Random uint8 images and labels: no loader, no decoding; a random-weight model
(nothing is downloaded).
"""

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402

from dsd.core.masks import Pruner  # noqa: E402
from dsd.engine import distributed, trainer  # noqa: E402
from dsd.engine.epoch import _step  # noqa: E402
from dsd.tracks.vision import metric as vision_metric  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("device", help="cuda, or cpu for a smoke run")
parser.add_argument("batch_size", type=int, help="0: the row's")
parser.add_argument("row", nargs="?", default="googlenet")
parser.add_argument("--steps", type=int, default=0, help="steps per timing (0: 40 on a GPU, 2 on the CPU)")
parser.add_argument("--no-graphs", action="store_true", help="skip the step compiled with CUDA graphs")
args = parser.parse_args()
device_name, batch_size, row = args.device, args.batch_size, args.row
tmp = Path(tempfile.mkdtemp())
atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the config's data folder: each run left one in /tmp
gpu_bench.write_jpegs(tmp, 8)
config = gpu_bench.paper_config(tmp, [row], device_name, batch_size, 1)
exp, spec = config.experiment(row), config.phase(row, 0, "sparse1")
sparse = spec.recipe["sparse1"]
device, _, _ = distributed.setup(config.options.device)
state = trainer.build(exp, spec, device, sparse.lr)
pruner = Pruner(state.model, sparse.sparsity, exclude=exp.prune.exclude, include=exp.prune.include)
state.model.train()
size = exp.train.batch_size
images, labels = (
    torch.randint(0, 255, (size, 3, 224, 224), dtype=torch.uint8),
    torch.randint(0, 1000, (size,)),
)
if device.type == "cuda":
    images, labels = images.pin_memory(), labels.pin_memory()
batch = (images, labels)
on_gpu = device.type == "cuda"


def sync() -> None:
    gpu_bench.synchronize(device)


pending, losses = None, []


def step(read: str = "trainer's") -> None:
    """read: "trainer's" (one step late with a fused optimizer, `gpu_bench.trainer_step`), "waiting" (after
    the forward pass, before backward) or "none"."""
    global pending
    with distributed.autocast(state.dtype):
        loss = vision_metric.loss(state.model, batch, device)
    if read == "none":
        _step(state, loss, exp.train.grad_clip)
    else:
        pending = gpu_bench.trainer_step(state, loss, exp.train.grad_clip, pending, losses, read == "waiting")


def timed(n: int, **kwargs) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step(**kwargs)
    sync()
    return (time.perf_counter() - start) / n * 1e3


steps = args.steps or (40 if on_gpu else 2)
print(f"{row}: batch {size}, {state.dtype}, cudnn.benchmark {torch.backends.cudnn.benchmark}", flush=True)
for _ in range(10 if on_gpu else 1):
    step()
state.pruner = pruner
print(f"step, pruner on: {timed(steps):.1f} ms; loss read before backward: {timed(steps, read='waiting'):.1f} ms; "
      f"no loss read: {timed(steps, read='none'):.1f} ms", flush=True)  # fmt: skip
state.pruner = None
print(f"step, pruner off: {timed(steps):.1f} ms", flush=True)
state.pruner = pruner
fused = state.optimizer  # the trainer's (make_optimizer); torch's own default on CUDA is foreach
state.optimizer = type(fused)(state.model.parameters(), **{**fused.defaults, "fused": None, "foreach": True})
state.optimizer.state = fused.state  # the same momentum buffers
print(
    f"step, foreach optimizer instead of fused (the loss read then waits): {timed(steps):.1f} ms", flush=True
)
state.optimizer = fused
parts = dict.fromkeys(("forward", "backward", "optimizer", "pruner"), 0.0)
for _ in range(steps):
    sync()
    t0 = time.perf_counter()
    with distributed.autocast(state.dtype):
        loss = vision_metric.loss(state.model, batch, device)
    float(loss.detach())
    sync()
    t1 = time.perf_counter()
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    sync()
    t2 = time.perf_counter()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    sync()
    t3 = time.perf_counter()
    pruner.step(state.optimizer)
    sync()
    t4 = time.perf_counter()
    for part, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3), ("pruner", t3, t4)):
        parts[part] += (b - a) / steps * 1e3
print("parts ms:", {part: round(ms, 2) for part, ms in parts.items()}, flush=True)


def relayout(layout: torch.memory_format, mask_dtype=None) -> None:
    """Model, masks and (emptied) optimizer state in `layout`; the batch follows the model (`in_layout_of`)."""
    state.model.to(memory_format=layout)
    state.optimizer.state.clear()  # momentum buffers are made again, in the new layout, at the next step
    named = dict(state.model.named_parameters())
    pruner.masks = {
        n: m.to(dtype=mask_dtype or m.dtype, memory_format=layout if m.dim() == 4 else torch.preserve_format)
        for n, m in pruner.masks.items()
    }
    pruner._refresh_lists()  # the fused lists the masking reads
    for name, mask in pruner.masks.items():
        assert mask.stride() == named[name].stride(), name


layout = (
    torch.channels_last if distributed.prefers_channels_last(state.model, device) else torch.contiguous_format
)
other = torch.contiguous_format if layout == torch.channels_last else torch.channels_last
relayout(other)
for _ in range(3):
    step()
print(f"step, model and batch {'NCHW' if other == torch.contiguous_format else 'channels-last'} instead: "
      f"{timed(steps):.1f} ms", flush=True)  # fmt: skip
relayout(layout, mask_dtype=next(state.model.parameters()).dtype)
print(f"step, float masks: {timed(steps):.1f} ms", flush=True)
relayout(layout, mask_dtype=torch.bool)  # the trainer's masks again, for the profile and the graphs
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
with profile(activities=activities) as prof:
    for _ in range(5 if on_gpu else 1):
        step()
    sync()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
if on_gpu:
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))
if on_gpu and not args.no_graphs:
    # CUDA graphs replay the step's kernels without the host launching each one: a much shorter step here means
    # the host's launches, not the kernels, are the limit
    state.model = torch.compile(state.model, mode="reduce-overhead")
    try:
        for _ in range(5):
            step()
        print(f"step, compiled with CUDA graphs: {timed(steps):.1f} ms", flush=True)
    except Exception as err:  # noqa: BLE001 - a finding to print, not a failure of the profile above
        print(f"step, compiled with CUDA graphs: failed ({type(err).__name__}: {err})", flush=True)
