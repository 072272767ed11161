"""The held-out metrics' reduction over ranks: weighted by real samples, over the union of the ranks' metrics."""

from __future__ import annotations

import ast
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.loop import _mean_across_ranks, _weighted_mean_across_ranks

# rank 0 saw a metric rank 1 did not (e.g. label accuracy, only where every label is known), and more samples
PER_RANK = [({"loss": 2.0 * 30, "label_accuracy": 0.5 * 30}, {"loss": 30.0, "label_accuracy": 30.0}),
            ({"loss": 5.0 * 10}, {"loss": 10.0})]


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = _weighted_mean_across_ranks(*PER_RANK[rank], world=2)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(sorted(result.items())))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_metrics_and_sample_counts_agree_on_weighted_means(tmp_path) -> None:
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert len(results) == 1
    got = dict(ast.literal_eval(results.pop()))
    assert got["loss"] == pytest.approx((2.0 * 30 + 5.0 * 10) / 40) and got["label_accuracy"] == pytest.approx(0.5)


def test_one_rank_drops_metrics_of_no_weight() -> None:
    assert _weighted_mean_across_ranks({"a": 3.0, "b": 0.0}, {"a": 2.0, "b": 0.0}, world=1) == {"a": 1.5}


TRAIN_METRICS = [{"loss": 2.0, "acc_labelled": 0.5}, {"loss": 4.0, "bits": 7.0}]


def _train_rank(rank: int, init_file: str, out_dir: str, same: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        try:
            result = repr(sorted(_mean_across_ranks(TRAIN_METRICS[0 if same else rank]).items()))
        except RuntimeError as e:
            result = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_train_metrics_of_other_names_on_another_rank_fail_on_every_rank(tmp_path, same: bool) -> None:
    mp.start_processes(_train_rank, args=(str(tmp_path / "init"), str(tmp_path), same), nprocs=2,
                       start_method="spawn")
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if same:
        assert results[0] == results[1] == repr([("acc_labelled", 0.5), ("loss", 2.0)])
    else:
        assert "train_step returned other metric names on another rank (this rank: ['acc_labelled', 'loss'])" \
            in results[0] and "(this rank: ['bits', 'loss'])" in results[1]
