"""Data loaders with a reproducible order: the order of epoch e depends only on (seed, e).

That is what makes a resumed phase replay exactly the batches an uninterrupted one would have seen, and
what lets every DDP rank agree on the permutation.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from dsd import gpus


def epoch_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from a run seed and (phase index, epoch, ...), stable across Python versions."""
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


class FixedOrderSampler(Sampler[int]):
    """Indices in a given order (SortaGrad's length-sorted first epoch, say)."""

    def __init__(self, order: Sequence[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class PackedStrings(Sequence[str]):
    """Strings held as one array of their UTF-8 bytes and one of offsets: no object per string. A forked loader
    worker shares its parent's pages until it writes one, and reading a string from a list writes the string's
    reference count; so a data set's list of a million paths or transcripts, read item by item, became a copy in
    every worker (ImageNet's 1.28M training paths: ~220 MB per worker). Arrays have nothing to count."""

    def __init__(self, strings):
        encoded = [s.encode() for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"string {index} of {len(self)}")
        index = index % len(self)
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes().decode()


_temp_dir = None  # in a loader worker: multiprocessing's temporary folder (sharing a batch's memory needs it)


def _worker_init(parent: int, worker_id: int) -> None:
    """A loader worker dies with its job. A job ends with os._exit, so no worker is told to stop; torch's own
    watchdog compares the parent pid with the one the worker saw at its start, which a worker scheduled late
    (under load) reads after its parent exited: it then waited for work forever, holding the job's pipes.
    It ignores Ctrl-C, which a terminal sends its whole process group: the job alone decides (it checkpoints at
    the next step, resume.StopSignal, whose handler the worker would otherwise have inherited)."""
    global _temp_dir
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _temp_dir = multiprocessing.util.get_temp_dir()
    signal.signal(signal.SIGHUP, _leave)
    gpus._die_with(parent, signal.SIGHUP)


def _leave(signum, frame) -> None:
    """The job is gone: exit now, removing the temporary folder (a SIGKILL left one /tmp/pymp-* per worker),
    without the normal exit's joining of queues to a parent that reads no more."""
    shutil.rmtree(_temp_dir, ignore_errors=True)
    os._exit(0)


def distributed() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def train_order(
    n: int, batch_size: int, seed: int, epoch: int, order: Sequence[int] | None = None, skip_batches: int = 0
) -> tuple[list[tuple[int, int]], int]:
    """(dataset index, position in the epoch) of the samples this process trains on, in order, and its batch size.

    The epoch's order is shuffled with a generator seeded from (seed, epoch), or `order` (SortaGrad), less the
    first `skip_batches` global batches (mid-epoch resume). Under torch.distributed `batch_size` is the global
    batch: each rank takes its contiguous slice of every global batch (incomplete last batch dropped so ranks
    stay in step), so N ranks reproduce one process's batches.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sequence = list(order) if order is not None else list(RandomSampler(range(n), generator=generator))
    keyed = [(index, position) for position, index in enumerate(sequence)][skip_batches * batch_size :]
    dist = distributed()
    if dist is None:
        return keyed, batch_size
    rank, world = dist
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} ranks")
    per_rank = batch_size // world
    full = len(keyed) - len(keyed) % batch_size
    keyed = [
        key
        for start in range(0, full, batch_size)
        for key in keyed[start + rank * per_rank : start + (rank + 1) * per_rank]
    ]
    return keyed, per_rank


def rank_batches(order: Sequence[int], batch_size: int) -> list[int]:
    """An evaluation's `order` in batches of `batch_size`, of which this rank takes batches r, r + N, ... under
    torch.distributed (one process: all of them): each item is scored once, in the batch one process scores it
    in (the same padding and batch shape: on the same kernels, one process's outputs to the last bit)."""
    dist = distributed()
    if dist is None:
        return list(order)
    rank, world = dist
    starts = range(rank * batch_size, len(order), world * batch_size)
    return [index for start in starts for index in order[start : start + batch_size]]


class EpochSampler(Sampler[tuple[int, int]]):
    """The sampler of a persistent loader: `set_epoch` before each epoch; yields (index, sample seed) pairs.

    The seed is a function of (run seed, epoch, the sample's position in the epoch), so a sample's augmentation
    does not depend on which worker process draws it, how many there are, or whether the epoch was resumed.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.global_batch, self.seed, self.keys = n, batch_size, seed, []
        # the order (a list of the data set's size) is drawn by set_epoch, once per epoch
        dist = distributed()
        self.batch_size = batch_size // dist[1] if dist else batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0, order: Sequence[int] | None = None) -> None:
        keyed, self.batch_size = train_order(self.n, self.global_batch, self.seed, epoch, order, skip_batches)
        self.keys = [(index, epoch_seed(self.seed, epoch, position)) for index, position in keyed]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def persistent_loader(
    dataset: Dataset, batch_size: int, *, seed: int, workers: int, collate_fn: Callable | None = None
) -> DataLoader:
    """One training loader for many epochs: worker processes start once (their start-up and the dataset's
    copy are paid once per phase, not per epoch). The dataset takes (index, seed) keys (EpochSampler)."""
    sampler = EpochSampler(len(dataset), batch_size, seed)
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_initialized(),  # a GPU job's model is there first; a CPU job starts no CUDA
        persistent_workers=workers > 0,
        worker_init_fn=partial(_worker_init, os.getpid()),
        # the workers' base seed from a generator of its own: drawn from torch's global one, it would shift
        # dropout's draws by one in an epoch that a resumed job starts its workers in (not bitwise resumable)
        generator=torch.Generator().manual_seed(seed),
    )


def loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    collate_fn: Callable | None = None,
    workers: int = 0,
    order: Sequence[int] | None = None,
    skip_batches: int = 0,
    shard: bool = False,
) -> DataLoader:
    """Training loaders shuffle with a generator seeded from (seed, epoch); evaluation loaders keep order.

    `order` fixes the sequence instead (SortaGrad; in evaluation, speech's utterances by length).
    `skip_batches` drops the first batches of exactly that order (mid-epoch resume). Under torch.distributed, see
    `train_order`. Pinned memory on CUDA.
    `shard` (evaluation): under torch.distributed each rank reads every N-th sample, each sample exactly once
    (no padding), for metrics that the caller sums over ranks.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sampler: Sampler | None = None
    if train:
        keyed, batch_size = train_order(len(dataset), batch_size, seed, epoch, order, skip_batches)
        sampler = FixedOrderSampler([index for index, _ in keyed])
    elif shard and (dist := distributed()) is not None:
        rank, world = dist
        sampler = FixedOrderSampler(range(rank, len(dataset), world))
    elif order is not None:
        sampler = FixedOrderSampler(order)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_initialized(),  # a GPU job's model is there first; a CPU job starts no CUDA
        persistent_workers=False,
        worker_init_fn=partial(_worker_init, os.getpid()),
        generator=generator,
    )
