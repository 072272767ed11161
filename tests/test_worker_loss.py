"""Surviving worker loss: a SIGKILLed rank makes Ray Train restart the group, which resumes from the latest
complete checkpoint; the final weights equal an uninterrupted run's. Past the restart limit: a clear failure."""

from __future__ import annotations

import json
import os
import re
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


def test_restart_limit_then_one_line_naming_the_killed_rank(ray_local, digits_data, tmp_path):
    run = str(tmp_path / "fail")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_when, args=(run, 0, 3, killed))
    killer.start()
    cfg, raw = config(run, digits_data, "cluster.max_failures=0", steps=400)
    with pytest.raises(TrainingFailed, match=r"training failed after 0 restart\(s\) allowed by cluster.max_failures"
                       ) as failed:
        run_training(cfg, raw)
    killer.join()
    assert killed
    message = str(failed.value)
    assert "\n" not in message
    assert re.search(rf"rank 0: its worker process \(pid {killed[0]}\)( on \S+)? died without a Python error: "
                     "killed", message), message
    if "rank 1:" in message:  # the survivor fails in its next collective, unless Ray tears it down first
        assert "rank 1: RuntimeError:" in message and message.endswith("(a consequence: its peer is gone)"), message


def test_the_error_named_is_the_ranks_own_under_rays_wrappers():
    """Ray hands a dead worker over as a failed health check around the actor's death report, a user error as a
    traceback holder around the exception: the message names what is inside."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

    from data_pipeline.manifest import DatasetError
    from launch.train import user_error_of

    died = RayActorError(error_msg=(
        "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 4242\n"
        "\tip: 10.0.0.3\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: ..."))
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")

    class GroupError(RuntimeError):
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    out = user_error_of(GroupError({0: gloo, 1: WorkerHealthCheckFailedError("A worker health check failed.",
                                                                             died)}), 0)
    assert str(out) == ("training failed after 0 restart(s) allowed by cluster.max_failures: rank 1: its worker "
                        "process (pid 4242) on 10.0.0.3 died without a Python error: killed (a signal, the OOM killer) or "
                        "crashed; rank 0: RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection "
                        "reset by peer (a consequence: its peer is gone)")
    bad = DatasetError("shard s-0.tar: sha256 mismatch")
    wrapped = UserExceptionWithTraceback(bad, "Traceback (most recent call last):\n  ...\nDatasetError: shard")
    assert user_error_of(GroupError({0: gloo, 1: wrapped}), 2) is bad
    # ranks that met other user errors (each reads its own shards): the lowest rank's is raised, the others said
    same, other = DatasetError("shard s-0.tar: sha256 mismatch"), DatasetError("shard s-3.tar: truncated")
    out = user_error_of(GroupError({2: other, 1: same, 0: UserExceptionWithTraceback(bad, "Traceback ...")}), 2)
    assert out is bad and out.__notes__ == ["rank 2 met another: DatasetError: shard s-3.tar: truncated"]
    plain = user_error_of(GroupError({1: UserExceptionWithTraceback(ValueError("nan loss"), "Traceback ...")}), 2)
    assert str(plain).endswith("rank 1: ValueError: nan loss")
    node = RayActorError(error_msg=(
        "The actor died because its node has died. Node Id: 8e2f\n\tclass_name: RayTrainWorker\n\tpid: 77\n"
        "\tip: 10.0.0.7\nThe actor never ran - it was cancelled before it started running."))
    lost = user_error_of(GroupError({2: WorkerHealthCheckFailedError("A worker health check failed.", node)}), 0)
    assert str(lost).endswith("rank 2: its worker process (pid 77) on 10.0.0.7 was lost with its node (the machine "
                              "stopped, was preempted, or lost the network)")


def test_ray_train_keeps_its_own_console_level_and_dgm_debug_raises_it(monkeypatch):
    """Its INFO records are all a user sees of a worker group waiting for resources or restarting."""
    from launch.train import ray_train_log_level

    monkeypatch.delenv("DGM_DEBUG", raising=False)
    assert ray_train_log_level() == "INFO"
    monkeypatch.setenv("DGM_DEBUG", "1")
    assert ray_train_log_level() == "DEBUG"


def test_the_cli_says_the_other_ranks_errors_under_the_first(monkeypatch, capsys):
    from data_pipeline.manifest import DatasetError
    from launch import cli

    def fail(args):
        error = DatasetError("shard s-0.tar: sha256 mismatch")
        error.add_note("rank 2 met another: DatasetError: shard s-3.tar: truncated")
        raise error

    monkeypatch.setattr(cli, "cmd_train", fail)
    assert cli.main(["train", "configs/dct_shapes.yaml"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dgm train: error: shard s-0.tar: sha256 mismatch",
        "dgm train: error: rank 2 met another: DatasetError: shard s-3.tar: truncated"]
