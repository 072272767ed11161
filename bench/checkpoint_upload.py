"""Checkpoint upload off the critical path: training step time while an s3:// checkpoint uploads in the background,
against the step time with no upload, and against the time a synchronous upload would block training.

One DeepSpeed rank (ZeRO-2, fp32) of a 14.7M-parameter MLP; S3 is moto's server in its own process on 127.0.0.1.

    .venv/bin/python bench/checkpoint_upload.py [--steps 30]

Last stdout line: one JSON object with the step times, their ratio, and the blocking time avoided.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[checkpoint_upload] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: the medians need at least one step on each side")
    port = free_port()
    # moto stands in for a remote S3: niced, so it does not take the training's 2 cores as a real remote would not.
    moto = subprocess.Popen(["nice", "-n", "19", os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"DGM_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "b",
                       "AWS_DEFAULT_REGION": "us-east-1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"})
    try:
        import boto3
        import deepspeed
        import torch

        from sharding.zero import ScheduleConfig, ZeroConfig, deepspeed_config
        from trainer.checkpoint import CheckpointMeta, CheckpointStore

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 2048),
                                    torch.nn.GELU(), torch.nn.Linear(2048, 1024))
        n_params = sum(p.numel() for p in model.parameters())
        cfg = deepspeed_config(ZeroConfig(stage=2), ScheduleConfig(warmup_steps=1, total_steps=10_000),
                               global_batch=64, world_size=1, lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
        x = torch.randn(64, 1024)

        def step() -> float:
            t = time.perf_counter()
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            return time.perf_counter() - t

        def meta(s: int) -> CheckpointMeta:
            return CheckpointMeta(step=s, stream_state={"epoch": 0, "batch": s}, world_size=1, family="bench",
                                  engines=["model"], zero_stage=2, config={}, data_info={})

        for _ in range(5):
            step()
        base = sorted(step() for _ in range(args.steps))
        with tempfile.TemporaryDirectory() as tmp:
            sync_store = CheckpointStore("s3://bench/sync", staging=tmp, async_upload=False)
            t = time.perf_counter()
            sync_store.save(1, {"model": engine}, meta(1))
            sync_block = time.perf_counter() - t
            store = CheckpointStore("s3://bench/async", staging=tmp)
            t = time.perf_counter()
            store.save(1, {"model": engine}, meta(1))
            async_block = time.perf_counter() - t
            during, overlapped = [], 0
            while len(during) < args.steps:
                during.append(step())
                overlapped += int(store._uploader is not None and store._uploader.is_alive())
            store.wait()
        median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        result = {
            "params": n_params,
            "step_ms_no_upload": round(1000 * median(base), 2),
            "step_ms_upload_in_flight": round(1000 * median(during[:max(overlapped, 1)]), 2),
            "ratio_in_flight_over_none": round(median(during[:max(overlapped, 1)]) / median(base), 3),
            "steps_overlapping_upload": overlapped,
            "save_blocking_s_sync_upload": round(sync_block, 2),
            "save_blocking_s_async_upload": round(async_block, 2),
            "blocking_ratio_async_over_sync": round(async_block / sync_block, 3),
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
        }
        log(f"{result}")
        print(json.dumps(result))
    finally:
        moto.terminate()


if __name__ == "__main__":
    main()
