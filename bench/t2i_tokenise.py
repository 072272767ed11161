"""Image tokenisation job: images/s with 1 and 2 Ray workers on the same scene shards, against the same per-shard
work done in-process without Ray (the reference), using the dVAE of configs/t2i_dvae.yaml.

    .venv/bin/python bench/t2i_tokenise.py [--images 2048] [--shard 128] [--export runs/t2i/dvae/export]

Without --export the dVAE is the config's model randomly initialised (same size and cost as a trained one). Each
job's rate is given from the moment its actors are ready (each loaded the export once) and, separately, over its
whole wall time including that start. Last stdout line: one JSON object with images/s for each setting, the 2-vs-1
worker scaling ratios and the Ray-vs-in-process ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from data_pipeline.caption_tokenizer import TOKENIZER_FILE  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.prepare import PrepareConfig, prepare_dataset  # noqa: E402
from launch.config import load_config  # noqa: E402
from trainer.dalle.tokenise_job import TokeniserWorker, plan_output, tokenise_dataset  # noqa: E402
from trainer.export import write_export  # noqa: E402
from trainer.families import family_class  # noqa: E402


def log(msg: str) -> None:
    print(f"[t2i_tokenise] {msg}", file=sys.stderr, flush=True)


def scenes(folder: str, images: int, shard: int, vocab_size: int) -> str:
    """Train-split scenes and tokenizer as configs/t2i_dvae.yaml prepares them, ``images`` of them."""
    cfg, _ = load_config(os.path.join(ROOT, "configs", "t2i_dvae.yaml"))
    spec = cfg.data.prepare
    if vocab_size:
        spec.tokenizer.vocab_size = vocab_size
    prepare_dataset(PrepareConfig(output=folder, source=spec.source,
                                  source_settings={**spec.splits["train"], "num_samples": images},
                                  codec=spec.codec, codec_settings=spec.codec_settings, samples_per_shard=shard,
                                  parallel=False, **spec.tokenizer_settings("train", folder)), report=lambda _: None)
    return folder


def random_export(folder: str) -> str:
    cfg, _ = load_config(os.path.join(ROOT, "configs", "t2i_dvae.yaml"))
    torch.manual_seed(0)
    family = family_class(cfg.family)(cfg.model, {"image_shape": [32, 32, 3]})
    modules = family.build_modules()
    return write_export(folder, family, {name: m.state_dict() for name, m in modules.items()})


def in_process(data: str, export: str, out: str, batch_size: int) -> float:
    """The job's per-shard work (read, decode, encode, write) in this process, one thread, no Ray."""
    manifest = load_manifest(data)
    with open(os.path.join(data, TOKENIZER_FILE), "rb") as f:
        tokenizer = f.read()
    worker = TokeniserWorker(export, tokenizer, manifest.codec, batch_size)
    start = time.perf_counter()
    for shard in plan_output(manifest, manifest.shards[0].count, "bench"):
        worker.write(shard, out)
    return manifest.total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=0, help="caption tokenizer size (default: the config's)")
    parser.add_argument("--export", default="", help="a trained dVAE export (default: the config's, random init)")
    args = parser.parse_args()
    for name in ("images", "shard", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    use_checkout()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    import ray

    with tempfile.TemporaryDirectory(prefix="t2i-tokenise-") as tmp:
        data = scenes(os.path.join(tmp, "scenes"), args.images, args.shard, args.vocab_size)
        export = args.export or random_export(os.path.join(tmp, "dvae"))
        log(f"{args.images} images in shards of {args.shard}; dVAE {'given' if args.export else 'random init'}")
        result: dict[str, object] = {"images": args.images, "samples_per_shard": args.shard,
                                     "batch_size": args.batch_size,
                                     "dvae": "trained export" if args.export else "configs/t2i_dvae.yaml, random init"}
        result["inprocess_images_per_s"] = in_process(data, export, os.path.join(tmp, "ref"), args.batch_size)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 << 20,
                 configure_logging=False)
        for workers in (1, 2):
            ready: list[float] = []

            def report(line: str, ready: list[float] = ready) -> None:
                if "workers ready" in line:
                    ready.append(time.perf_counter())
                log(line)

            start = time.perf_counter()
            tokenise_dataset(data, export, os.path.join(tmp, f"out-{workers}"), workers=workers,
                             batch_size=args.batch_size, report=report)
            end = time.perf_counter()
            result[f"ray_{workers}w_startup_s"] = ready[0] - start
            result[f"ray_{workers}w_images_per_s"] = args.images / (end - ready[0])
            result[f"ray_{workers}w_images_per_s_with_startup"] = args.images / (end - start)
        result.update(workers_tree())
        ray.shutdown()
    result["scaling_2w_over_1w"] = result["ray_2w_images_per_s"] / result["ray_1w_images_per_s"]
    result["scaling_2w_over_1w_with_startup"] = (result["ray_2w_images_per_s_with_startup"]
                                                 / result["ray_1w_images_per_s_with_startup"])
    result["ray_1w_over_inprocess"] = result["ray_1w_images_per_s"] / result["inprocess_images_per_s"]
    with open("/proc/loadavg") as f:
        result["loadavg_before_after"] = [load_before, f.read().split()[:3]]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
