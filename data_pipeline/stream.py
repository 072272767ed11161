"""Streaming reader: one rank's micro-batches, in the exact global order of sharding.sample_order.

Each loader worker reads a few canonical partitions sequentially through their shards (webdataset's tar
iterator), keeps one shuffle block per partition in memory, and yields its share of each global batch. The rank
concatenates its workers' shares in worker order, so the result does not depend on how many workers there are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipeline import storage
from data_pipeline.manifest import DatasetError, Manifest
from data_pipeline.shard_cache import ChecksumMismatchError
from sharding.sample_order import (
    EpochOrder,
    StreamState,
    check_batch_split,
    rank_partitions,
    worker_partitions,
)

log = logging.getLogger(__name__)

Decoder = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class StreamConfig:
    """How a dataset is streamed; everything that fixes the global order is here, and none of it is the world size."""

    global_batch: int = 64
    partitions: int = 12
    shuffle_block: int = 256
    shuffle_shards: bool = True
    drop_last: bool = True
    seed: int = 0
    num_workers: int = 0
    on_corrupt: str = "error"
    verify_sha256: bool = True
    cache_dir: str = ""
    cache_max_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.stream.on_corrupt must be 'error' or 'skip', got {self.on_corrupt!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.stream.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2**32:  # the order's generators take 32 bits: seeds 2**32 apart were one order
            raise ValueError(f"data.stream.seed must be in 0..2**32-1, got {self.seed}")
        if self.cache_max_bytes < 1:
            raise ValueError(f"data.stream.cache_max_bytes must be >= 1 (the shard cache's size in bytes), got "
                             f"{self.cache_max_bytes}")
        for name in ("global_batch", "partitions", "shuffle_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.stream.{name} must be >= 1, got {getattr(self, name)}")


_REPAIR = "; `dgm prepare CONFIG --verify` (a token shard: `dgm tokenize CONFIG --verify`) rewrites a damaged shard"


class ShardUnavailableError(DatasetError):
    """A shard that storage cannot serve now (access denied, outage, missing bucket, unreadable file): not a
    corrupt shard, so data.stream.on_corrupt=skip never skips it (skipping would train on empty batches)."""


class ShardOpener:
    """Opens shards for reading: local files directly, remote ones through the shard cache; checks sha256 once.

    ``reported`` holds the shards already reported as skipped (on_corrupt=skip), so each is warned about and
    counted once however many partitions and epochs cross it; what is skipped is decided by each partition
    reader alone, so it never depends on which partitions share a worker.
    """

    def __init__(self, manifest: Manifest, config: StreamConfig) -> None:
        self.manifest = manifest
        self.config = config
        self.verified: dict[int, tuple[int, int, int]] = {}
        """Shard -> the (inode, size, mtime) its local file had when its bytes matched the manifest's sha256: a file
        replaced or rewritten while the run goes on (a `dgm prepare --overwrite` into a live run's folder) is
        hashed again when next opened instead of read against the manifest's counts and offsets."""
        self.reported: set[int] = set()
        self._cache: storage.ShardCache | None = None

    def _open(self, i: int) -> BinaryIO:
        """Shard ``i`` opened for reading; remote shards through the cache's open(), which fetches again if another
        process evicts the entry before it is opened."""
        url = self.manifest.shard_url(i)
        info = self.manifest.shards[i]
        if storage.is_remote(url):
            if self._cache is None:
                cache_dir = self.config.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dgm", "shards")
                self._cache = storage.ShardCache(cache_dir, self.config.cache_max_bytes)
            try:
                f = self._cache.open(url, info.sha256, verify=self.config.verify_sha256)
            except storage.StorageNotFoundError as e:
                raise DatasetError(f"shard {url}: missing (listed in the manifest, not in storage)") from e
            except ChecksumMismatchError as e:
                raise DatasetError(f"shard {url}: {e.problem}{_REPAIR}") from e
            except storage.StorageError as e:
                raise ShardUnavailableError(f"shard {url}: cannot be read: {e.problem}") from e
            return f
        try:
            path = storage.local_path(url)
        except storage.StorageError as e:
            raise ShardUnavailableError(f"shard {url}: cannot be read: {e.problem}") from e
        if not os.path.exists(path):
            raise DatasetError(f"shard {url}: missing (listed in the manifest, not on disk)")
        try:
            f = open(path, "rb")
            if self.config.verify_sha256:
                self._check_local(i, f)
            return f
        except OSError as e:
            raise ShardUnavailableError(f"shard {url}: cannot be read: {e.strerror or e}") from e

    def _check_local(self, i: int, f: BinaryIO) -> None:
        """Hash the open file (so a file renamed over the path later is not what was checked) unless this very
        version of it was checked before; closes ``f`` when it fails."""
        info = self.manifest.shards[i]
        try:
            stat = os.fstat(f.fileno())
            version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if self.verified.get(i) == version:
                return
            actual = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
        except BaseException:
            f.close()
            raise
        if actual != info.sha256:
            f.close()
            changed = " (changed since this run first read it)" if i in self.verified else ""
            raise DatasetError(f"shard {self.manifest.shard_url(i)}: sha256 mismatch{changed} (manifest "
                               f"{info.sha256[:12]}..., file {actual[:12]}...){_REPAIR}")
        self.verified[i] = version

    def samples(self, i: int, offset: int) -> Iterator[dict[str, Any]]:
        """Raw samples of shard ``i`` from member group ``offset`` on; a short or broken shard is a DatasetError."""
        url = self.manifest.shard_url(i)
        info = self.manifest.shards[i]
        expected = info.count
        stride = int(self.manifest.extra.get("index_stride", 0))
        seen, start = 0, 0
        if stride and info.offsets:
            k = min(offset // stride, len(info.offsets) - 1)
            seen, start = k * stride, info.offsets[k]
        f = self._open(i)
        try:
            with f:
                f.seek(start)
                groups = group_by_keys({**m, "__url__": url} for m in tar_file_iterator(f))
                for sample in groups:
                    # the reader stops asking after the manifest's last sample: look past it here, or a manifest
                    # that counts too few (or an offset that points at an earlier sample) drops samples silently
                    if seen == expected - 1 and (extra := next(groups, None)) is not None:
                        raise DatasetError(f"shard {url}: holds more samples than the manifest's {expected} "
                                           f"({extra['__key__']} follows its last; or an index offset points at "
                                           "the wrong sample)")
                    if seen >= offset:
                        yield sample
                    seen += 1
        except DatasetError:
            raise
        except OSError as e:
            if e.errno is not None:  # the system's own read failure (EIO from a failing disk): not the shard's bytes
                raise ShardUnavailableError(f"shard {url}: cannot be read at sample {seen} of {expected} "
                                            f"({e.strerror or e})") from e
            raise DatasetError(f"shard {url}: corrupt or truncated at sample {seen} of {expected} ({e})") from e
        except (tarfile.TarError, ValueError) as e:
            raise DatasetError(f"shard {url}: corrupt or truncated at sample {seen} of {expected} ({e})") from e
        if seen != expected:
            raise DatasetError(f"shard {url}: holds {seen} samples, the manifest says {expected} (truncated?)")


class PartitionReader:
    """Reads one canonical partition of one epoch, block by block, in its shuffled order."""

    def __init__(self, order: EpochOrder, partition: int, opener: ShardOpener, decode: Decoder, skip_bad: bool):
        self.order, self.partition, self.opener = order, partition, opener
        self.decode, self.skip_bad = decode, skip_bad
        self.block = -1
        self.buffer: dict[int, dict[str, Any] | None] = {}
        self._cursor: Iterator[dict[str, Any]] | None = None
        self._cursor_shard = -1
        self._cursor_pos = -1
        self._cursor_end = -1
        self.bad_shards: set[int] = set()
        self.newly_skipped: list[int] = []

    def _open_at(self, e: int) -> None:
        shard, offset = self.order.locate(e)
        self._cursor_shard = shard
        self._cursor_end = self.order.shard_span(shard)[1]
        self._cursor_pos = e
        self._cursor = self.opener.samples(shard, offset) if shard not in self.bad_shards else None

    def _next_raw(self) -> tuple[int, dict[str, Any] | None]:
        e = self._cursor_pos
        if e >= self._cursor_end:
            self._open_at(e)
        shard = self._cursor_shard
        self._cursor_pos += 1
        if self._cursor is None:
            return e, None
        url = self.opener.manifest.shard_url(shard)
        try:
            raw = next(self._cursor, None)
            if raw is None:
                raise DatasetError(f"shard {url}: ended before its sample at position {e - self._cursor_start()}")
            sample = self.decode(raw)
            sample["key"] = raw["__key__"]
            return e, sample
        except ShardUnavailableError:
            raise
        except (DatasetError, ValueError) as err:
            problem = str(err) if str(err).startswith("shard ") else f"shard {url}: {err}"
            if not self.skip_bad:
                raise DatasetError(problem) from err
            self.bad_shards.add(shard)
            if shard not in self.opener.reported:
                log.warning("data.stream.on_corrupt=skip: skipping %s", problem)
                self.opener.reported.add(shard)
                self.newly_skipped.append(shard)
            self._cursor = None
            return e, None

    def _replay_from(self, lo: int) -> int:
        """Where a reader that starts at ``lo`` opens its shard. A reader running from the partition's start meets
        a shard damaged mid-way at the damage and (on_corrupt=skip) drops the rest of it; a resumed one that
        jumped to ``lo`` past the damage would use samples the uninterrupted run never saw. So under skip it
        replays the shard from where this partition first reads it, and meets the damage at the same sample."""
        if not self.skip_bad:  # under error the uninterrupted run stopped at the damage: no resume lies past it
            return lo
        shard, _ = self.order.locate(lo)
        return max(self.order.shard_span(shard)[0], self.order.starts[self.partition])

    def _cursor_start(self) -> int:
        return self.order.shard_span(self._cursor_shard)[0]

    def _load_block(self, block: int) -> None:
        lo, hi = self.order.block_span(self.partition, block)
        if self._cursor_pos != lo:
            self._open_at(self._replay_from(lo))
            while self._cursor_pos < lo:  # read and decoded, then dropped: see _replay_from
                self._next_raw()
        self.buffer = {}
        while self._cursor_pos < hi:
            e, sample = self._next_raw()
            self.buffer[e] = sample
        self.block = block

    def items(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Decoded samples for stream items ``[start, stop)``, each with ``key`` and ``valid``."""
        out = []
        for i in range(start, stop):
            e, valid = self.order.item_position(self.partition, i)
            block = (e - self.order.starts[self.partition]) // self.order.shuffle_block
            if block != self.block:
                self._load_block(block)
            sample = self.buffer[e]
            if sample is not None:
                out.append({**sample, "valid": valid})
        return out


def epoch_order(manifest: Manifest, config: StreamConfig, epoch: int) -> EpochOrder:
    """The layout of one epoch of a dataset under a stream config."""
    c = config
    return EpochOrder(
        manifest.shard_counts, seed=c.seed, epoch=epoch, global_batch=c.global_batch, partitions=c.partitions,
        shuffle_block=c.shuffle_block, shuffle_shards=c.shuffle_shards, drop_last=c.drop_last,
    )


def _as_is(item: Any) -> Any:
    """Shares cross from workers as pickled numpy: torch's default would turn every small array into its own
    shared-memory tensor, which costs more than decoding the sample."""
    return item


Share = tuple[int, int, list[dict[str, Any]], list[int]]  # (epoch, batch, samples, shards first skipped meanwhile)


class _WorkerShares(IterableDataset):
    """One loader worker's share of every global batch from ``start`` on, across epochs (one worker start-up
    for the whole run, not one per epoch)."""

    def __init__(self, manifest: Manifest, config: StreamConfig, decode: Decoder, start: StreamState,
                 max_epochs: int | None, owned: range):
        super().__init__()
        self.manifest, self.config, self.decode = manifest, config, decode
        self.start, self.max_epochs, self.owned = start, max_epochs, owned

    def __iter__(self) -> Iterator[Share | _WorkerFailure]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield from self._shares(1, 0)
            return
        try:
            yield from self._shares(info.num_workers, info.id)
        except DatasetError as e:  # handed to the main process whole: a loader would wrap it in its traceback
            yield _WorkerFailure(e)

    def _shares(self, workers: int, worker: int) -> Iterator[Share]:
        opener = ShardOpener(self.manifest, self.config)
        epoch, first = self.start.epoch, self.start.batch
        while self.max_epochs is None or epoch < self.start.epoch + self.max_epochs:
            order = epoch_order(self.manifest, self.config, epoch)
            readers = [
                PartitionReader(order, p, opener, self.decode, self.config.on_corrupt == "skip")
                for p in worker_partitions(self.owned, workers, worker)
            ]
            for b in range(first, order.num_batches):
                samples: list[dict[str, Any]] = []
                for r in readers:
                    samples.extend(r.items(*order.batch_range(r.partition, b)))
                skipped = [i for r in readers for i in r.newly_skipped]
                for r in readers:
                    r.newly_skipped.clear()
                yield epoch, b, samples, skipped
            epoch, first = epoch + 1, 0


@dataclass
class _WorkerFailure:
    """A loader worker's data error, raised again as it is by the rank's stream (the loader would raise its own
    exception holding the worker's whole traceback as text: one named line is what the user should read)."""

    error: DatasetError


def _loader_seed(seed: int, state: StreamState) -> int:
    """The loader's own seed: fixed by the stream seed and the position it starts from, never by other RNG use."""
    digest = hashlib.sha256(f"dgm-loader\n{seed}\n{state.epoch}\n{state.batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RankStream:
    """The micro-batches (lists of decoded samples) of one rank, epoch after epoch, resumable from a StreamState."""

    def __init__(self, manifest: Manifest, config: StreamConfig, decode: Decoder, rank: int = 0, world_size: int = 1,
                 state: StreamState | None = None):
        check_batch_split(config.global_batch, world_size)
        self.owned = rank_partitions(config.partitions, world_size, rank)
        self.manifest, self.config, self.decode = manifest, config, decode
        self.state = state or StreamState()
        self.skipped: set[int] = set()
        self._stand_in: dict[str, Any] | None = None  # a decoded sample for a micro-batch that was all skipped

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards this rank skipped as corrupt or missing (data.stream.on_corrupt=skip)."""
        return len(self.skipped)

    def epoch_order(self, epoch: int) -> EpochOrder:
        return epoch_order(self.manifest, self.config, epoch)

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_order(self.state.epoch).num_batches

    def _shares(self, max_epochs: int | None) -> Iterator[Share]:
        shares = _WorkerShares(self.manifest, self.config, self.decode, self.state, max_epochs, self.owned)
        workers = self.config.num_workers
        if workers == 0:
            yield from shares
            return
        # Starting a loader draws its workers' base seed from a generator: torch's global one by default, which
        # would shift every later random draw (dropout masks) depending on whether the run was resumed.
        loader = DataLoader(shares, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            generator=torch.Generator().manual_seed(_loader_seed(self.config.seed, self.state)))
        pending: list[Share] = []
        for item in loader:
            if isinstance(item, _WorkerFailure):
                raise item.error
            pending.append(item)
            if len(pending) == workers:
                if any(p[:2] != pending[0][:2] for p in pending):
                    raise RuntimeError(f"loader workers out of step: {[p[:2] for p in pending]}")
                yield (*pending[0][:2], [s for p in pending for s in p[2]], [i for p in pending for i in p[3]])
                pending = []

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self.iterate()

    def iterate(self, max_epochs: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Micro-batches from the current state on; after each yield, ``state`` points at the next batch."""
        totals: dict[int, int] = {}
        for epoch, b, samples, skipped in self._shares(max_epochs):
            self.skipped.update(skipped)
            if epoch not in totals:
                totals = {epoch: self.epoch_order(epoch).num_batches}
            self.state = StreamState(epoch, b + 1) if b + 1 < totals[epoch] else StreamState(epoch + 1, 0)
            if samples:
                self._stand_in = samples[-1]
            else:  # every sample skipped (on_corrupt=skip): the rank still takes part in the step, at weight 0
                samples = [{**self._placeholder(), "valid": False}]
            yield samples

    def _placeholder(self) -> dict[str, Any]:
        """A decoded sample to stand in, marked invalid, for a micro-batch whose samples were all skipped: the
        families weigh a rank's loss by its valid samples (``StepContext.batch_share``), so it adds nothing, but
        the rank joins the step's collectives, which an empty batch could not even be collated for."""
        if self._stand_in is None:
            opener = ShardOpener(self.manifest, self.config)
            for i in range(len(self.manifest.shards)):
                try:
                    raw = next(opener.samples(i, 0))
                    self._stand_in = {**self.decode(raw), "key": raw["__key__"]}
                    break
                except (DatasetError, ValueError, StopIteration):
                    continue
            else:
                raise DatasetError(f"{self.manifest.url}: no shard holds a readable sample (all were skipped)")
        return self._stand_in
