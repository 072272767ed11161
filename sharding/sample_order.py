"""The deterministic global sample order and how ranks and loader workers divide it.

The order is a pure function of (shard sample counts, seed, epoch, global batch size, partitions): it never
depends on the world size or the number of loader workers, so a run can stop and continue on a different number
of ranks and see exactly the global batches an uninterrupted run would have seen.

How one epoch is laid out:

1. The shards are put in an order drawn from (seed, epoch); concatenated, they form the epoch sequence E.
2. E is cut into ``P`` canonical partitions, contiguous slices of E (so a partition reads few shards, in order).
3. Inside a partition, samples are shuffled within blocks of ``shuffle_block`` consecutive samples (a bounded
   buffer, drawn from (seed, epoch, partition, block)).
4. Global batch ``b`` takes ``take[p]`` consecutive samples from each partition ``p`` in partition order, where
   ``take[p]`` is ``G // P`` plus one for ``G % P`` partitions spread evenly (Bresenham). Partition lengths are
   sized to match, so all partitions run out together.
5. Rank ``r`` of ``W`` gets the contiguous slice of the global batch made by partitions
   ``[r*P/W, (r+1)*P/W)``; its loader workers split those partitions among themselves. Concatenating the ranks'
   micro-batches in rank order gives back the global batch.

With ``drop_last`` the samples that do not fill a whole global batch are left out of that epoch (which ones
changes every epoch with the shard order). Without it, the epoch ends with one more batch in which every
partition pads its share with copies flagged invalid, so every rank still yields the same number of batches and
each real sample is seen exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np


class OrderError(ValueError):
    """A sample-order request that cannot be satisfied (bad sizes, world size not dividing partitions...)."""


@dataclass(frozen=True)
class StreamState:
    """Where a stream stands: the next global batch to produce is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StreamState:
        if not isinstance(data, dict) or set(data) != {"epoch", "batch"}:
            raise OrderError(f"stream state must be a dict with keys epoch and batch, got {data!r}")
        epoch, batch = data["epoch"], data["batch"]
        if not (isinstance(epoch, int) and isinstance(batch, int)) or epoch < 0 or batch < 0:
            raise OrderError(f"stream state needs non-negative integers, got {data!r}")
        return cls(epoch=epoch, batch=batch)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@lru_cache(maxsize=64)
def _block_perm(seed: int, epoch: int, partition: int, block: int, n: int) -> np.ndarray:
    return _rng(seed, epoch, partition, block).permutation(n)


def spread(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` integers differing by at most one, extras spread evenly (Bresenham),
    so any run of ``parts/k`` consecutive entries holds ``total/k`` when ``k`` divides both."""
    return [((p + 1) * total) // parts - (p * total) // parts for p in range(parts)]


def leftover_tails(leftover: int, take: Sequence[int], drop_last: bool) -> list[int]:
    """Each partition's share of the samples past the last full global batch.

    Kept (no ``drop_last``), they fill the first ``leftover`` slots of one more batch, so partition p gets the part
    that falls in its own ``take[p]`` slots: never more, or the last batch could not read it all. Dropped, they
    are split evenly, as every layout before 2026-11-27 did for both (which lost samples without ``drop_last``),
    so that orders and checkpoints of ``drop_last`` runs are unchanged.
    """
    if drop_last:
        return spread(leftover, len(take))
    slots = np.concatenate([[0], np.cumsum(take)])
    total = int(slots[-1])
    return [int(slots[p + 1] * leftover // total - slots[p] * leftover // total) for p in range(len(take))]


def layout_changed(total: int, global_batch: int, partitions: int, drop_last: bool) -> bool:
    """Whether this epoch layout differs from the one before 2026-11-27 (only without ``drop_last``, and only
    where the old split of the leftover differed): a checkpoint's position then means other samples."""
    take = spread(global_batch, partitions)
    leftover = total % global_batch
    return not drop_last and leftover_tails(leftover, take, False) != spread(leftover, partitions)


class EpochOrder:
    """The layout of one epoch: which samples each partition holds and in what order."""

    def __init__(
        self,
        shard_counts: Sequence[int],
        *,
        seed: int,
        epoch: int,
        global_batch: int,
        partitions: int,
        shuffle_block: int = 256,
        shuffle_shards: bool = True,
        drop_last: bool = True,
    ) -> None:
        counts = [int(c) for c in shard_counts]
        if not counts or any(c < 0 for c in counts):
            raise OrderError(f"shard sample counts must be non-negative and not empty, got {counts[:8]}")
        total = sum(counts)
        if global_batch < 1 or partitions < 1 or shuffle_block < 1:
            raise OrderError(
                f"global_batch ({global_batch}), partitions ({partitions}) and shuffle_block ({shuffle_block})"
                " must be >= 1"
            )
        if total < global_batch:
            raise OrderError(f"the dataset has {total} samples, fewer than one global batch of {global_batch}")
        self.seed, self.epoch = seed, epoch
        self.global_batch, self.partitions = global_batch, partitions
        self.shuffle_block = shuffle_block
        self.drop_last = drop_last
        self.take = spread(global_batch, partitions)
        self.full_batches = total // global_batch
        leftover = total - self.full_batches * global_batch
        self.num_batches = self.full_batches + (1 if leftover and not drop_last else 0)
        tails = leftover_tails(leftover, self.take, drop_last)
        # Partition p holds full_batches * take[p] samples, plus its share of the leftover.
        self.lengths = [self.full_batches * t + lt for t, lt in zip(self.take, tails, strict=True)]
        self.real_lengths = [
            self.full_batches * t + (lt if not drop_last else 0) for t, lt in zip(self.take, tails, strict=True)
        ]
        shard_ids = np.arange(len(counts))
        if shuffle_shards:
            shard_ids = _rng(seed, epoch, 0x5EED).permutation(len(counts))
        self.shard_order = [int(s) for s in shard_ids]
        ordered_counts = np.array([counts[s] for s in self.shard_order], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(ordered_counts)])
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])[:-1].tolist()

    def locate(self, e: int) -> tuple[int, int]:
        """Shard id and member offset of position ``e`` of the epoch sequence E."""
        i = int(np.searchsorted(self._shard_starts, e, side="right")) - 1
        return self.shard_order[i], int(e - self._shard_starts[i])

    def shard_span(self, shard: int) -> tuple[int, int]:
        """Epoch-sequence range ``[start, stop)`` that a shard occupies this epoch."""
        i = self.shard_order.index(shard)
        return int(self._shard_starts[i]), int(self._shard_starts[i + 1])

    def block_permutation(self, partition: int, block: int) -> np.ndarray:
        """Order of the samples inside one shuffle block of a partition."""
        n = min(self.shuffle_block, self.lengths[partition] - block * self.shuffle_block)
        return _block_perm(self.seed, self.epoch, partition, block, n)

    def item_position(self, partition: int, item: int) -> tuple[int, bool]:
        """Epoch-sequence position of one stream item of a partition, and whether it is a real sample.

        Items past the partition's real samples (the last batch's padding) repeat its last real item, flagged
        invalid, so a reader only ever needs the block it already holds.
        """
        real = self.real_lengths[partition]
        valid = item < real
        block, inner = divmod(item if valid else real - 1, self.shuffle_block)
        perm = self.block_permutation(partition, block)
        return self.starts[partition] + block * self.shuffle_block + int(perm[inner]), valid

    def partition_indices(self, partition: int, start: int, stop: int) -> list[tuple[int, bool]]:
        """Epoch-sequence positions of stream items ``[start, stop)`` of a partition, with validity."""
        return [self.item_position(partition, i) for i in range(start, stop)]

    def block_span(self, partition: int, block: int) -> tuple[int, int]:
        """Epoch-sequence range ``[start, stop)`` that one shuffle block of a partition covers."""
        lo = self.starts[partition] + block * self.shuffle_block
        hi = self.starts[partition] + min((block + 1) * self.shuffle_block, self.lengths[partition])
        return lo, hi

    def batch_range(self, partition: int, batch: int) -> tuple[int, int]:
        """Stream items ``[start, stop)`` of a partition that go into global batch ``batch``."""
        t = self.take[partition]
        return batch * t, (batch + 1) * t

    def global_batch_positions(self, batch: int) -> list[tuple[int, bool]]:
        """The whole global batch as epoch-sequence positions, in partition order (the reference order)."""
        out: list[tuple[int, bool]] = []
        for p in range(self.partitions):
            out.extend(self.partition_indices(p, *self.batch_range(p, batch)))
        return out


def rank_partitions(partitions: int, world_size: int, rank: int) -> range:
    """The canonical partitions a rank reads; the world size must divide the number of partitions."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise OrderError(f"rank {rank} is not in a world of size {world_size}")
    if partitions % world_size:
        raise OrderError(
            f"world size {world_size} does not divide data.stream.partitions={partitions}; pick a partition count that"
            " every world size you plan to use divides (the default 12 serves 1, 2, 3, 4, 6 and 12 ranks)"
        )
    per = partitions // world_size
    return range(rank * per, (rank + 1) * per)


def worker_partitions(owned: range, num_workers: int, worker: int) -> range:
    """Split a rank's partitions among its loader workers (uneven splits are fine: workers yield sub-batches)."""
    n = len(owned)
    lo, hi = (worker * n) // num_workers, ((worker + 1) * n) // num_workers
    return range(owned.start + lo, owned.start + hi)


def check_batch_split(global_batch: int, world_size: int) -> int:
    """Samples per rank per global batch; the world size must divide the global batch."""
    if global_batch % world_size:
        raise OrderError(f"global batch {global_batch} is not divisible by world size {world_size}")
    return global_batch // world_size
