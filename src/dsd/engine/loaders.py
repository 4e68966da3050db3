"""Data loaders with a reproducible order: the order of epoch e depends only on (seed, e).

That is what makes a resumed phase replay exactly the batches an uninterrupted one would have seen, and
what lets every DDP rank agree on the permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler


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


def distributed() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


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

    `order` fixes the sequence instead (SortaGrad). `skip_batches` drops the first batches of exactly that
    order (mid-epoch resume). Under torch.distributed, `batch_size` is the global batch: each rank takes its
    contiguous slice of every global batch of the same order a single process would see (incomplete last
    batch dropped so ranks stay in step), so N ranks reproduce one process's batches. Pinned memory on CUDA.
    `shard` (evaluation): under torch.distributed each rank reads every N-th sample, each sample exactly once
    (no padding), for metrics that the caller sums over ranks.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sampler: Sampler | None = None
    if train:
        sequence = list(order) if order is not None else list(RandomSampler(dataset, generator=generator))
        sequence = sequence[skip_batches * batch_size :]
        dist = distributed()
        if dist is not None:
            rank, world = dist
            if batch_size % world:
                raise ValueError(f"batch size {batch_size} is not divisible by the {world} ranks")
            per_rank = batch_size // world
            full = len(sequence) - len(sequence) % batch_size
            sequence = [
                i
                for start in range(0, full, batch_size)
                for i in sequence[start + rank * per_rank : start + (rank + 1) * per_rank]
            ]
            batch_size = per_rank
        sampler = FixedOrderSampler(sequence)
    elif shard and (dist := distributed()) is not None:
        rank, world = dist
        sampler = FixedOrderSampler(range(rank, len(dataset), world))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
    )
