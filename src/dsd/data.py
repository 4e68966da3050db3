"""Data loaders with a reproducible order: the order of epoch e depends only on (seed, e).

That is what makes a resumed phase replay exactly the batches an uninterrupted one would have seen, and
what lets every DDP rank agree on the permutation (DistributedSampler with set_epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler


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
) -> DataLoader:
    """Training loaders shuffle with a generator seeded from (seed, epoch); evaluation loaders keep order.

    Under torch.distributed every rank gets its shard of the same permutation. `order` fixes the sequence
    instead (not sharded). Pinned memory is used when CUDA is there.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sampler: Sampler | None = None
    dist = distributed()
    if order is not None:
        sampler = FixedOrderSampler(order)
    elif dist is not None and train:
        sampler = DistributedSampler(dataset, num_replicas=dist[1], rank=dist[0], shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
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
