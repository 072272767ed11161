"""The global order: a pure function of the data and seed, never of the world size or worker count."""

import hashlib

import pytest

from sharding.sample_order import (
    EpochOrder,
    OrderError,
    StreamState,
    check_batch_split,
    layout_changed,
    rank_partitions,
    spread,
    worker_partitions,
)
from trainer.checkpoint import CheckpointError
from trainer.loop import resume_position

COUNTS = [37, 40, 40, 40, 40, 40, 23]  # 260 samples in 7 shards: no world size or worker count divides 7


def order(epoch=0, drop_last=False, batch=24, partitions=12, block=16, counts=COUNTS):
    return EpochOrder(counts, seed=3, epoch=epoch, global_batch=batch, partitions=partitions,
                      shuffle_block=block, drop_last=drop_last)


def epoch_positions(o: EpochOrder) -> list[tuple[int, bool]]:
    return [pos for b in range(o.num_batches) for pos in o.global_batch_positions(b)]


def test_spread_is_even_and_nests():
    assert spread(10, 4) == [2, 3, 2, 3]
    assert sum(spread(24, 12)) == 24
    take = spread(30, 12)
    for w in (1, 2, 3, 6):  # any W dividing both 12 and 30 gets 30/W per group of 12/W partitions
        per = 12 // w
        assert all(sum(take[r * per:(r + 1) * per]) == 30 // w for r in range(w))


def test_every_sample_once_with_padding():
    o = order(drop_last=False)
    pos = epoch_positions(o)
    real = [e for e, valid in pos if valid]
    assert sorted(real) == list(range(sum(COUNTS)))
    assert len(pos) == o.num_batches * 24
    assert o.num_batches == -(-sum(COUNTS) // 24)


@pytest.mark.parametrize("partitions", [1, 5, 6, 7, 12, 13])
def test_every_sample_once_for_any_batch_and_leftover(partitions):
    """A partition's share of the last, partial batch never exceeds what that batch reads from it
    (G=20, P=12 used to lose one of 1797 samples)."""
    for batch in range(1, 40):
        for total in range(batch, 3 * batch):
            o = EpochOrder([total], seed=1, epoch=0, global_batch=batch, partitions=partitions, shuffle_block=7,
                           drop_last=False)
            real = [e for e, valid in epoch_positions(o) if valid]
            assert sorted(real) == list(range(total)), (batch, partitions, total)


@pytest.mark.parametrize("counts, batch, digest", [
    ([1618], 64, "edd3a1b366387fb7"), ([700, 597, 500], 20, "dd5c96fba9463dd0")])
def test_drop_last_orders_are_those_of_earlier_versions(counts, batch, digest):
    """The leftover fix changes no drop_last order (digests of the positions the layout before it gave), so their
    checkpoints resume into the same samples."""
    o = EpochOrder(counts, seed=5, epoch=1, global_batch=batch, partitions=12, shuffle_block=16, drop_last=True)
    positions = [p for b in range(o.num_batches) for p in o.global_batch_positions(b)]
    assert hashlib.sha256(repr(positions).encode()).hexdigest()[:16] == digest


def test_a_checkpoint_of_the_old_layout_is_not_resumed_into_other_samples():
    """Without drop_last the layout changed where the old split of the leftover differed: the order records it,
    so a position saved under the old one is refused (or, with next_epoch, left at the epoch's end)."""
    assert layout_changed(1618, 64, 12, drop_last=False)
    assert not layout_changed(1618, 64, 12, drop_last=True) and not layout_changed(140, 24, 12, drop_last=False)
    old = {"data": "x", "drop_last": False}
    with pytest.raises(CheckpointError, match=r"the epoch layout .*: None -> 2026-11-27"):
        resume_position(old, {**old, "layout": "2026-11-27"}, StreamState(3, 10), "ckpt", "error")
    assert resume_position(old, {**old, "layout": "2026-11-27"}, StreamState(3, 10), "ckpt",
                           "next_epoch") == StreamState(4, 0)


def test_drop_last_keeps_full_batches_only():
    o = order(drop_last=True)
    pos = epoch_positions(o)
    assert all(valid for _, valid in pos)
    assert len(pos) == (sum(COUNTS) // 24) * 24
    assert len(set(e for e, _ in pos)) == len(pos)


def test_order_changes_with_epoch_and_seed_but_is_reproducible():
    a, b = epoch_positions(order(epoch=0)), epoch_positions(order(epoch=1))
    a, b = [e for e, v in a if v], [e for e, v in b if v]
    assert a != b and sorted(a) == sorted(b)
    assert a == [e for e, v in epoch_positions(order(epoch=0)) if v]


def test_shuffle_is_bounded_by_the_block():
    o = order(drop_last=True, block=8)
    for p in range(o.partitions):
        for i in range(o.real_lengths[p]):
            e, _ = o.item_position(p, i)
            assert abs((e - o.starts[p]) - i) < 8


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("workers", [1, 2])
def test_rank_slices_rebuild_the_global_batch(world, workers):
    o = order(drop_last=False)
    per_rank = check_batch_split(24, world)
    for b in range(o.num_batches):
        rebuilt = []
        for r in range(world):
            owned = rank_partitions(12, world, r)
            mine = []
            for w in range(workers):
                for p in worker_partitions(owned, workers, w):
                    mine.extend(o.partition_indices(p, *o.batch_range(p, b)))
            assert len(mine) == per_rank
            rebuilt.extend(mine)
        assert rebuilt == o.global_batch_positions(b)


def test_bad_requests_are_named():
    with pytest.raises(OrderError, match="does not divide data.stream.partitions"):
        rank_partitions(12, 5, 0)
    with pytest.raises(OrderError, match="not divisible by world size"):
        check_batch_split(24, 5)
    with pytest.raises(OrderError, match="fewer than one global batch"):
        order(counts=[3, 4])
    with pytest.raises(OrderError, match="stream state"):
        StreamState.from_dict({"epoch": -1, "batch": 0})
    assert StreamState.from_dict({"epoch": 2, "batch": 5}) == StreamState(2, 5)


def test_a_resume_under_another_sample_order_is_refused_or_starts_the_next_epoch():
    from sharding.sample_order import StreamState
    from trainer.checkpoint import CheckpointError
    from trainer.loop import resume_position

    saved = {"data": "100 samples, shards ab", "global_batch": 32, "seed": 0}
    state = StreamState(2, 7)
    assert resume_position(saved, dict(saved), state, "ckpt", "error") == state
    assert resume_position({}, dict(saved), state, "ckpt", "error") == state  # checkpoints from before the check
    with pytest.raises(CheckpointError, match=r"ckpt was trained on another sample order \(the data set: 100 "
                                              r"samples, shards ab -> 90 samples, shards cd; data.stream.global_batch: "
                                              r"32 -> 64\)"):
        resume_position(saved, {**saved, "data": "90 samples, shards cd", "global_batch": 64}, state, "ckpt", "error")
    assert resume_position(saved, {**saved, "seed": 1}, state, "ckpt", "next_epoch") == StreamState(3, 0)


def test_shards_are_read_in_a_seeded_order_that_changes_every_epoch():
    """Every other order test is in epoch-sequence positions, which do not depend on the shard order: never
    shuffling shards, or shuffling them the same way every epoch, passed them all."""
    orders = [order(epoch=e).shard_order for e in range(4)]
    assert all(sorted(o) == list(range(len(COUNTS))) for o in orders)
    assert len({tuple(o) for o in orders}) == 4 and tuple(range(len(COUNTS))) not in {tuple(o) for o in orders}
    assert order(epoch=2).shard_order == orders[2]  # reproducible
    o = order(epoch=1)
    first = o.shard_order[0]
    assert o.locate(0) == (first, 0) and o.locate(COUNTS[first]) == (o.shard_order[1], 0)
    assert o.shard_span(first) == (0, COUNTS[first])
    plain = EpochOrder(COUNTS, seed=3, epoch=1, global_batch=24, partitions=12, shuffle_shards=False)
    assert plain.shard_order == list(range(len(COUNTS))) and plain.locate(37) == (1, 0)
