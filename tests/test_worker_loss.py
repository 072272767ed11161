"""Surviving worker loss: a SIGKILLed rank makes Ray Train restart the group, which resumes from the latest
complete checkpoint; the final weights equal an uninterrupted run's. Past the restart limit: a clear failure."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from launch.export import export_checkpoint
from launch.train import TrainingFailed, run_training
from tests.test_train_spine import config, train
from trainer.export import load_export

pytestmark = pytest.mark.slow


def _kill_rank_when(run_dir: str, rank: int, min_step: int, killed: list[int]) -> None:
    """Wait until the run has logged ``min_step``, then SIGKILL the process serving ``rank``."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip()]
            if steps and max(steps) >= min_step:
                pid = int(open(os.path.join(run_dir, "workers", f"rank{rank}.pid")).read())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def _weights(run_dir: str, out: str) -> dict[str, torch.Tensor]:
    export_checkpoint(os.path.join(run_dir, "checkpoints"), out)
    _, modules, _ = load_export(out)
    return modules["model"].state_dict()


def test_killed_worker_resumes_and_ends_with_the_uninterrupted_weights(ray_local, digits_data, tmp_path):
    steps = ("trainer.checkpoint_every=8",)
    ref = str(tmp_path / "ref")
    train(ref, digits_data, *steps, steps=40)
    run = str(tmp_path / "killed")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_when, args=(run, 1, 12, killed))
    killer.start()
    train(run, digits_data, *steps, "cluster.max_failures=2", steps=40)
    killer.join()
    assert killed, "the worker was never killed"
    assert int(open(os.path.join(run, "workers", "rank1.pid")).read()) != killed[0]
    a, b = _weights(ref, str(tmp_path / "ea")), _weights(run, str(tmp_path / "eb"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_restart_limit_then_a_clear_failure(ray_local, digits_data, tmp_path):
    run = str(tmp_path / "fail")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_when, args=(run, 0, 3, killed))
    killer.start()
    cfg, raw = config(run, digits_data, "cluster.max_failures=0", steps=400)
    with pytest.raises(TrainingFailed, match=r"training failed after 0 restart\(s\) allowed by cluster.max_failures"):
        run_training(cfg, raw)
    killer.join()
    assert killed
