"""Streaming throughput: samples/s and MB/s from local shards and from S3 (moto on loopback), 1 and 2 loader
workers, 64x64 RGB shape scenes; plus the rate at which the digits image-GPT job (configs/digits_igpt.yaml, the
`make demo` job until 2026-11-26; the keys keep the name "demo") consumes samples, measured here too.

    .venv/bin/python bench/stream_throughput.py [--samples 4096] [--rounds 5] [--skip-train]

Local and S3 are read in turns, ``--rounds`` epochs each per worker count (local first in the first round, then
alternating), so bursts of background load on this shared machine land on both sides; each rate is the median over
the rounds and s3_over_local the median of the per-round ratios (``*_rounds``: every round's).
Last stdout line: one JSON object with every figure and the ratios (S3/local, loader/demo consumption).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline.codecs import build_codec  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.prepare import PrepareConfig, prepare_dataset  # noqa: E402
from data_pipeline.stream import RankStream, StreamConfig  # noqa: E402


def log(msg: str) -> None:
    print(f"[stream_throughput] {msg}", file=sys.stderr, flush=True)


def measure(url: str, workers: int, cache_dir: str, epochs: int = 1) -> dict[str, float]:
    m = load_manifest(url)
    cfg = StreamConfig(global_batch=64, partitions=12, shuffle_block=256, num_workers=workers, cache_dir=cache_dir)
    stream = RankStream(m, cfg, build_codec(m.codec["name"], m.codec["settings"]).decode, 0, 1)
    start = time.perf_counter()
    n = sum(len(b) for b in stream.iterate(max_epochs=epochs))
    dt = time.perf_counter() - start
    total_bytes = sum(s.bytes for s in m.shards) * n / m.total
    return {"samples_per_s": n / dt, "mb_per_s": total_bytes / dt / 1e6, "seconds": dt, "samples": n}


def demo_data(folder: str) -> str:
    """The digits job's training data, written as `dgm prepare configs/digits_igpt.yaml` writes it."""
    from launch.config import load_config

    cfg, _ = load_config(os.path.join(ROOT, "configs", "digits_igpt.yaml"))
    spec = cfg.data.prepare
    prepare_dataset(PrepareConfig(output=folder, source=spec.source, source_settings=spec.splits["train"],
                                  codec=spec.codec, codec_settings=spec.codec_settings,
                                  samples_per_shard=spec.samples_per_shard, parallel=False), report=lambda _: None)
    return folder


def demo_consumption(steps: int, data: str) -> float:
    """Samples/s the digits job consumes (2 ranks, ZeRO-2 via Ray), from a short run of its config."""
    from launch.config import load_config
    from launch.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg, raw = load_config(os.path.join(ROOT, "configs", "digits_igpt.yaml"), [
            f"run_dir={tmp}/run", f"data.train={data}", "data.eval=", f"trainer.steps={steps}",
            f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=1",
            f"trainer.sample_every={steps}", f"trainer.checkpoint_every={steps}", f"trainer.log_every={steps}"])
        summary = run_training(cfg, raw)
        return summary["steps_per_s"] * cfg.data.stream.global_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5, help="epochs read per source and worker count, in turns")
    args = ap.parse_args()
    if args.samples < 64:
        ap.error(f"--samples {args.samples}: the stream's global batch is 64, so at least 64 scenes")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least one round")
    if args.train_steps < 2 and not args.skip_train:
        ap.error(f"--train-steps {args.train_steps}: the rate is timed from the second step on, so at least 2")
    use_checkout()
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update({"DGM_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=os.environ["DGM_S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    results: dict[str, object] = {"rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "scenes")
        settings = {"num_samples": args.samples, "resolution": 64, "seed": 0}
        for out in (local, "s3://bench/scenes"):
            log(f"preparing {args.samples} 64x64 shape scenes at {out}")
            prepare_dataset(PrepareConfig(output=out, source="shapes", source_settings=settings,
                                          samples_per_shard=256, parallel=False), report=lambda _: None)
        sources, median = {"local": local, "s3": "s3://bench/scenes"}, statistics.median
        for workers in (1, 2):
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
            for r in range(args.rounds):
                for name in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                    rounds[name].append(measure(sources[name], workers, tempfile.mkdtemp(dir=tmp)))
                    got = rounds[name][-1]
                    log(f"round {r + 1}: {name} {workers} worker(s): {got['samples_per_s']:.0f} samples/s "
                        f"{got['mb_per_s']:.1f} MB/s")
            for name, runs in rounds.items():
                results[f"{name}_w{workers}_samples_per_s"] = round(median(x["samples_per_s"] for x in runs), 1)
                results[f"{name}_w{workers}_mb_per_s"] = round(median(x["mb_per_s"] for x in runs), 2)
                results[f"{name}_w{workers}_samples_per_s_rounds"] = [round(x["samples_per_s"], 1) for x in runs]
            ratios = [s3["samples_per_s"] / lo["samples_per_s"] for s3, lo in zip(rounds["s3"], rounds["local"],
                                                                                      strict=True)]
            results[f"s3_over_local_w{workers}"] = round(median(ratios), 3)
            results[f"s3_over_local_w{workers}_rounds"] = [round(x, 3) for x in ratios]
        server.stop()
        digits = demo_data(os.path.join(tmp, "demo-data"))
        r = measure(digits, 1, tmp, epochs=5)
        log(f"demo data, 1 worker, 5 epochs: {r['samples_per_s']:.0f} samples/s")
        results["demo_data_loader_w1_samples_per_s"] = round(r["samples_per_s"], 1)
        if not args.skip_train:
            log(f"measuring the demo's consumption ({args.train_steps} steps, 2 ranks, ZeRO-2)")
            consumed = demo_consumption(args.train_steps, digits)
            results["demo_consumes_samples_per_s"] = round(consumed, 1)
            results["demo_loader_w1_over_demo_consumption"] = round(r["samples_per_s"] / consumed, 2)
            results.update(workers_tree())
    results["machine"] = f"{os.cpu_count()} CPU cores, no GPU"
    if "ray" in sys.modules:  # Ray's workers print to this stdout asynchronously: stop it before the JSON line
        sys.modules["ray"].shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
