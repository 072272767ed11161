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
