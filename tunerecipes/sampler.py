"""A distributed sampler that can start an epoch part-way through, so a resumed run sees exactly the samples the
interrupted one had not reached yet."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch) that skips the epoch's first ``global_offset`` samples.

    The offset counts samples over all ranks: rank r takes positions r, r + world, ... of the epoch's order, so
    skipping ``global_offset / world`` of its own positions on every rank skips the same leading samples for any
    world size that divides the offset.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._skip = 0

    def start_epoch(self, epoch: int, global_offset: int = 0) -> None:
        if global_offset % self.num_replicas:
            raise ValueError(
                f"cannot resume {global_offset} samples into epoch {epoch} with {self.num_replicas} ranks: "
                "the offset must divide evenly (resume with the world size that wrote the checkpoint)"
            )
        self.set_epoch(epoch)
        self._skip = global_offset // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self._skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self._skip)


def epoch_batches(loader: DataLoader, epoch: int, global_offset: int = 0) -> Iterator[Any]:
    """The batches of ``epoch`` from ``global_offset`` on, drawing nothing from the global RNG.

    Every ``iter(DataLoader)`` draws a worker base seed from ``loader.generator``, the global CPU generator when the
    loader has none. A resumed run creates its epoch's iterator once more than the uninterrupted run (at the resume
    step), so its global RNG stream (dropout, ...) and every later checkpoint's RNG state would differ from there on.
    The loader's own generator, seeded from the sampler's seed and the epoch, draws the same base seed however often
    an epoch's iterator is created.
    """
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler) or loader.generator is None:
        raise ValueError("epoch_batches needs a DataLoader with a ResumableSampler and a generator of its own")
    sampler.start_epoch(epoch, global_offset)
    loader.generator.manual_seed(sampler.seed + epoch)
    return iter(loader)
