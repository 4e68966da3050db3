"""Device choice and the process group of DDP ranks (NCCL on CUDA, gloo on the CPU), started by `dsd.gpus`
(a file store: $DSD_RENDEZVOUS) or by torchrun (env://)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch

from dsd.errors import ConfigError


def rank_zero() -> bool:
    """Whether this process is a job's first (or only) one, from the launcher's environment."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """A line on stderr from one process of a job: rank 0's (every DDP rank comes to the same conclusion)."""
    if rank_zero():
        print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        # paper.yaml's setting on a machine without a GPU (or with CUDA_VISIBLE_DEVICES empty): one line
        raise ConfigError("config.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of a job (None: fp32). fp16 needs a GradScaler, bf16 does not."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        # bf16 in hardware (Ampere on); torch's default also counts the slow emulation older GPUs have
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def fast_kernels(device: torch.device, fixed_shapes: bool) -> None:
    """On CUDA: TF32 for fp32 matmuls and cuDNN's convolutions and recurrent layers (`cudnn.allow_tf32` covers
    both); cuDNN's autotuner where input shapes repeat (it tunes again for every new shape, which
    variable-length speech batches would pay every step)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = fixed_shapes


def prefers_channels_last(model: torch.nn.Module, device: torch.device | None = None) -> bool:
    """Channels-last pays off where 2-D convolutions are most of the layers (the CNNs, VGG-16's large FC
    layers notwithstanding), not where recurrent or linear layers are (Deep Speech 2's two convolutions).
    On the CPU not for nets with a strided 1x1 convolution of fewer than 8 input channels: torch 2.11's CPU
    backward of those corrupts the heap in channels-last (a width-4 mini ResNet's downsample)."""
    kinds = [
        m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.RNNBase))
    ]
    convs = [m for m in kinds if isinstance(m, torch.nn.Conv2d)]
    if device is not None and device.type == "cpu" and any(_narrow_strided_pointwise(m) for m in convs):
        return False
    return len(convs) > len(kinds) / 2


def _narrow_strided_pointwise(conv: torch.nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride != (1, 1) and conv.in_channels < 8


def setup(device_name: str) -> tuple[torch.device, int, int]:
    """Join the process group when started as one of several ranks. Returns (device, rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=os.environ.get("DSD_RENDEZVOUS", "env://"),
            rank=int(os.environ["RANK"]),
            world_size=world,
        )
    return device, torch.distributed.get_rank(), world


def step_flags(loss: torch.Tensor, stop: bool, world: int) -> torch.Tensor:
    """[the loss is not finite, a stop signal arrived] on some rank, as 1.0 / 0.0 on the device; nothing
    waits for it. One all-reduce carries both, so every rank skips the same steps and stops at the same step."""
    not_finite = (~torch.isfinite(loss.detach())).float().reshape(1)
    flags = torch.cat([not_finite, torch.full((1,), float(stop), device=not_finite.device)])
    if world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """Whether `flag` is true on some rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def rank0_buffers(model: torch.nn.Module, world: int) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), those its checkpoint holds. DDP
    sends them from rank 0 at the start of each forward pass only, so after an epoch's last step each rank
    holds the statistics of its own last slice: its share of a sharded validation would score other weights
    than the checkpoint's."""
    if world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world


def gather_strided(local: list) -> list:
    """Per-item results of a sharded evaluation (rank r read items r, r + N, ...) in the split's order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    world = torch.distributed.get_world_size()
    parts = from_every_rank(local, world)
    merged: list = [None] * sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        merged[rank::world] = part
    return merged


def in_split_order(indices: list[int], values: list, gather: bool = False) -> list:
    """Per-item results (`values[k]` is item `indices[k]`'s) in the split's order. With `gather`, under
    torch.distributed, those of an evaluation sharded over the ranks: every rank's items, on every rank."""
    parts = [(indices, values)]
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = from_every_rank(parts[0], torch.distributed.get_world_size())
    out: list = [None] * sum(len(part) for part, _ in parts)
    for part, part_values in parts:
        for index, value in zip(part, part_values, strict=True):
            out[index] = value
    return out


def from_every_rank(value, world: int) -> list:
    """`value` of each rank, in rank order, on every rank (one process: a list of its own)."""
    if world == 1:
        return [value]
    values: list = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


_firsts = itertools.count()  # keys of their own for each `rank_zero_first` (alike on every rank)


def rank_zero_first(work: Callable[[], object], rank: int, world: int) -> None:
    """`work` on rank 0, then on the other ranks: a cache it builds (a speech row's features) is built once, not
    by every rank at once, each with a process per core. They wait on the rendezvous store, not in a
    collective, whose timeout (NCCL's 10 minutes) a real corpus's features outlast. If rank 0 fails, its
    launcher (dsd.gpus, torchrun) ends the others."""
    if world == 1:
        work()
        return
    store, key = torch.distributed.distributed_c10d._get_default_store(), f"dsd/first-done/{next(_firsts)}"
    if rank == 0:
        work()
        store.set(key, "1")
    else:
        store.wait([key], timedelta(days=7))
        work()


_phases_ended = itertools.count()  # keys of their own for each phase a process ends (alike on every rank)


def end_together(rank: int, world: int) -> None:
    """The ranks end when rank 0 has written its last file (a gloo rank whose peer had already torn its group down
    can abort at exit). They wait on the rendezvous store, not in a collective: rank 0's last work, a checkpoint's
    upload say, can outlast a collective's timeout (NCCL's 10 minutes) but not this wait. Rank 0 leaves last,
    once every rank has seen its word: some launches (env:// without torchrun) host the store in rank 0. A rank
    that fails is not waited for: its launcher (dsd.gpus, torchrun) ends the others."""
    if world == 1:
        return
    store, n = torch.distributed.distributed_c10d._get_default_store(), next(_phases_ended)
    done, left = f"dsd/phase-done/{n}", f"dsd/phase-left/{n}"
    if rank == 0:
        store.set(done, "1")
        with contextlib.suppress(RuntimeError):  # a rank gone meanwhile: rank 0's work is done all the same
            store.wait([left], timedelta(minutes=10))
        return
    store.wait([done], timedelta(days=7))
    if store.add(f"dsd/phase-leaving/{n}", 1) == world - 1:
        store.set(left, "1")


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to `device` without making the host wait: from pinned memory on a GPU, a copy queued
    behind the work already there (from pageable memory it waits for that work)."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
