"""Checkpoint upload to S3 off the critical path: a process killed mid-upload never leaves ``latest`` pointing at
an incomplete checkpoint, and the previous one still loads. Real DeepSpeed (one rank), real S3 API (moto)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipeline import storage

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, sys, time
import deepspeed, torch
from sharding.zero import ScheduleConfig, ZeroConfig, deepspeed_config
from trainer.checkpoint import CheckpointMeta, CheckpointStore

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
cfg = deepspeed_config(ZeroConfig(stage=2), ScheduleConfig(warmup_steps=0, total_steps=10), global_batch=4,
                       world_size=1, lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
store = CheckpointStore(sys.argv[1], staging=sys.argv[2])
meta = lambda step: CheckpointMeta(step=step, stream_state={"epoch": 0, "batch": step}, world_size=1, family="x",
                                   engines=["model"], zero_stage=2, config={}, data_info={})
mode = sys.argv[3]
if mode == "first":
    store.save(1, {"model": engine}, meta(1))
    store.wait()
    print("SAVED", flush=True)
elif mode == "crash":
    store.save(2, {"model": engine}, meta(2))
    print("STAGED", flush=True)
    time.sleep(600)
else:
    tag = store.latest()
    loaded = store.load(tag, {"model": engine}, expect_family="x")
    print("LOADED", tag, loaded.step, flush=True)
"""


def _run(args, **kw):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_crash_mid_upload_keeps_latest_on_the_complete_checkpoint(s3_bucket, flaky_s3, tmp_path):
    root = f"{s3_bucket}/ckpt"
    first = _run([root, str(tmp_path / "a"), "first"])
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "SAVED" in out, out
    assert storage.read_bytes(f"{root}/latest") == b"step-00000001"

    flaky_s3.fail_next(40, status=503)  # slow the next upload down: every request answers 503 for a while
    crash = _run([root, str(tmp_path / "b"), "crash"])
    deadline = time.time() + 300
    while flaky_s3.errors_injected < 3 and time.time() < deadline and crash.poll() is None:
        time.sleep(0.05)
    assert flaky_s3.errors_injected >= 3, crash.communicate()[0]
    crash.send_signal(signal.SIGKILL)
    crash.wait()
    flaky_s3.reset()

    assert storage.read_bytes(f"{root}/latest") == b"step-00000001"
    assert not storage.exists(f"{root}/step-00000002/_uploaded/rank0")
    again = _run([root, str(tmp_path / "c"), "load"])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "LOADED step-00000001 1" in out, out


TWO_RANKS = r"""
import datetime, os, sys, time, torch.distributed as dist, torch.multiprocessing as mp
from data_pipeline.s3 import S3Settings, configure_s3
from trainer.checkpoint import CheckpointMeta, CheckpointStore

def worker(rank, port, root, staging, out, async_upload):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    if rank == 1:  # this rank's uploads fail at once: nothing listens there
        configure_s3(S3Settings(endpoint_url=f"http://127.0.0.1:{sys.argv[6]}", max_attempts=1, connect_timeout=1))
    store = CheckpointStore(root, rank=rank, world_size=2, staging=staging, async_upload=async_upload)
    meta = lambda step: CheckpointMeta(step=step, stream_state={}, world_size=2, family="x", engines=[],
                                       zero_stage=2, config={}, data_info={})
    try:
        store.save(1, {}, meta(1))
        store.save(2, {}, meta(2))  # where an upload of step 1 that failed in the background is found
        outcome = "no error"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
        start = time.monotonic()  # what the training loop does next: no waiting for a marker that never comes
        store.finish_after_failure(timeout_s=120)
        with open(f"{out}/rank{rank}.wait", "w") as f:
            f.write(f"{time.monotonic() - start:.1f}")
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()

if __name__ == "__main__":
    port, root, staging, out, mode = sys.argv[1:6]
    mp.spawn(worker, args=(int(port), root, staging, out, mode == "async"), nprocs=2, join=True)
"""


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_an_upload_that_fails_on_one_rank_fails_the_save_on_every_rank(s3_bucket, tmp_path, mode):
    """Under torchrun nothing ends the other ranks when one raises: they waited in the save's barrier until the
    process group's timeout. Every rank must raise, and name the rank whose upload failed. A subprocess of its own:
    forking from the test process (which holds a Ray driver) breaks Ray."""
    from tests.fixtures_s3 import free_port

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    args = [str(free_port()), f"{s3_bucket}/ckpt", str(tmp_path / "staging"), str(tmp_path), mode, str(free_port())]
    done = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank1.startswith(f"CheckpointError: checkpoint upload to {s3_bucket}/ckpt failed"), rank1
    assert rank0.startswith(f"CheckpointError: checkpoint upload to {s3_bucket}/ckpt failed on rank 1: {s3_bucket}/ckpt/"
                            "step-00000001/"), rank0  # the cause, as rank 1 met it
    assert not storage.exists(f"{s3_bucket}/ckpt/latest")  # no checkpoint was complete on both ranks
    waits = [float((tmp_path / f"rank{r}.wait").read_text()) for r in (0, 1)]
    assert max(waits) < 20, waits  # rank 0's finalizer saw rank 1's failure marker (it waited out 600 s before)


class _FileEngine:
    """What CheckpointStore needs of a DeepSpeed engine to save: files under path/tag."""

    def save_checkpoint(self, path: str, tag: str, save_latest: bool, client_state: dict) -> None:
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        with open(os.path.join(path, tag, "w.pt"), "wb") as f:
            f.write(b"x" * 100)


@pytest.mark.parametrize("failures", [1, 100])
def test_an_s3_error_moving_latest_is_retried_then_raised_by_wait(s3_bucket, tmp_path, monkeypatch, failures):
    """Rank 0 moves latest in a background thread: an S3 error that outlasted boto3's retries killed it, and the
    run ended as finished with latest naming the checkpoint before its last one."""
    import threading

    from trainer import checkpoint
    from trainer.checkpoint import CheckpointError, CheckpointMeta, CheckpointStore

    real, left = storage.list_prefix, {"n": 0}

    def flaky_list(url: str) -> list[str]:
        if "_uploaded" in url and left["n"] > 0 and threading.current_thread() is not threading.main_thread():
            left["n"] -= 1
            raise storage.StorageError(url, "cannot reach S3 endpoint (injected)")
        return real(url)

    monkeypatch.setattr(checkpoint.storage, "list_prefix", flaky_list)
    monkeypatch.setattr(checkpoint, "FINALIZE_RETRY_S", (0.01, 0.02))
    root = f"{s3_bucket}/ckpt"
    store = CheckpointStore(root, staging=str(tmp_path / "staging"))

    def meta(step: int) -> CheckpointMeta:
        return CheckpointMeta(step=step, stream_state={"epoch": 0, "batch": step}, world_size=1, family="image_gpt",
                              engines=["model"], zero_stage=1, config={}, data_info={})

    store.save(10, {"model": _FileEngine()}, meta(10))
    store.wait()
    left["n"] = failures
    store.save(20, {"model": _FileEngine()}, meta(20))
    if failures == 1:
        store.wait()
        assert storage.read_bytes(f"{root}/latest") == b"step-00000020"
    else:
        with pytest.raises(CheckpointError, match=r"step-00000020: could not check its ranks' markers or move "
                                                  r"'latest' to it \(3 tries"):
            store.wait()
        assert storage.read_bytes(f"{root}/latest") == b"step-00000010"
