"""DCTransformer benchmarks: sampler speed with and without KV caches, training tokens/s with ZeRO-2 on 2 ranks
against a plain torch loop.

    .venv/bin/python bench/dctransformer.py [--triples 1000] [--train-steps 12]

Sampling: one 64x64 shape scene encoded at q=95 gives a real sequence of >= 1000 triples; the sampler replays its
first ``--triples`` triples (teacher forcing through ``generate``: every decoder step, mask and draw is computed)
in one chunk, once with the three decoders' KV caches and once recomputing the chunk prefix at every triple.
Training: `dgm train` machinery (embedded Ray, 2 workers, DeepSpeed ZeRO-2, fp32, gloo) on configs/dct_shapes.yaml
with small shards; tokens/s = steps/s x global batch x expected target triples per chunk (exact for the data).
Its reference: the same network, data, global batch and steps trained by a plain torch loop in this process, one
thread (the family's train_step, AdamW, gradient clipping 1.0; no Ray, no DeepSpeed, no streaming: the decoded
samples are held in memory), timed before and after the spine run (the reference rate is the mean of the two).
``spine_over_reference`` is what the spine's 2 ranks of one thread each gain over one plain process on one core:
2 at best. (Not 2 threads in one process: on this shared machine its steps stalled for ~2 s at times, presumably
when a neighbour held a core, so it measured the load, not the loop.)
Learning on held-out scenes (bits, samples, colourisation, super-resolution): bench/dctransformer_quality.py.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline.codecs import dct_codec  # noqa: E402
from data_pipeline.codecs.dct_config import DCTCodecConfig  # noqa: E402
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource  # noqa: E402
from trainer.dct.sampling import Conditioning, DrawSettings, generate  # noqa: E402
from trainer.families.dctransformer import DCTransformerConfig, DCTransformerFamily  # noqa: E402
from trainer.transformer import TransformerConfig  # noqa: E402

if TYPE_CHECKING:
    from launch.config import ExperimentConfig


def sampling_speed(triples: int) -> dict[str, float]:
    codec = DCTCodecConfig(resolution=64, quality=95)
    src = ShapesSource(ShapesConfig(num_samples=64, resolution=64, seed=0))
    seqs = dct_codec.encode([src.sample(i).image for i in range(64)], codec)
    seq = max(seqs, key=len)
    if len(seq) <= triples:
        raise SystemExit(f"longest sequence has {len(seq)} triples, need > {triples}")
    teacher = torch.from_numpy(seq[:triples].astype(np.int64))[None]
    info = {"codec": {"name": "dct", "settings": codec.to_dict()}}
    cfg = DCTransformerConfig(chunk_size=triples, encoder=TransformerConfig(n_layer=2, n_head=4, d_model=128))
    fam = DCTransformerFamily(cfg, info)
    torch.manual_seed(0)
    model = fam.build_modules()["model"].eval()
    out = {}
    for name, cache in (("cached", True), ("recompute", False)):
        t = time.perf_counter()
        got = generate(model, 1, fam.space, triples, triples, Conditioning(), DrawSettings(),
                       torch.Generator().manual_seed(0), use_cache=cache, teacher=teacher)
        dt = time.perf_counter() - t
        assert got.shape[1] == triples
        out[f"{name}_triples_per_s"] = triples / dt
        print(f"[sample] {name}: {triples} triples in {dt:.2f}s = {triples / dt:.1f} triples/s", flush=True)
    out["speedup"] = out["cached_triples_per_s"] / out["recompute_triples_per_s"]
    return out


def reference_rate(cfg: ExperimentConfig, info: dict, samples: list[dict], steps: int) -> float:
    """Steps/s of the plain torch loop (the module docstring), one thread, from its second step to its last."""
    from dctransformer_quality import PlainEngine  # bench/, beside this script

    from trainer.families.base import StepContext

    fam = DCTransformerFamily(cfg.model, info)
    torch.manual_seed(0)
    engine = PlainEngine(fam.build_modules()["model"].train(), cfg.trainer.optim.lr, steps)
    batch, times, cpu = cfg.data.stream.global_batch, [], torch.device("cpu")
    for step in range(steps):
        picked = [samples[(step * batch + i) % len(samples)] for i in range(batch)]
        fam.train_step({"model": engine}, fam.collate(picked), StepContext(step, 0, 1, cpu, torch.float32))
        times.append(time.perf_counter())
    return (steps - 1) / (times[-1] - times[0])


def training_speed(steps: int) -> dict[str, object]:
    from data_pipeline.manifest import load_manifest
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from data_pipeline.stream import RankStream, StreamConfig
    from launch.config import load_config
    from launch.train import ensure_ray, run_training
    from trainer.families.dctransformer import codec_config
    from trainer.loop import data_info

    with tempfile.TemporaryDirectory(prefix="dct-bench-") as tmp:
        url = os.path.join(tmp, "train")
        prepare_dataset(PrepareConfig(output=url, source="shapes", codec="dct", parallel=False,
                                      source_settings={"num_samples": 512, "resolution": 32, "seed": 0,
                                                       "max_objects": 4},
                                      codec_settings={"resolution": 32, "quality": 50, "value_range": 256},
                                      samples_per_shard=128), report=lambda _: None)
        cfg, raw = load_config(os.path.join(ROOT, "configs", "dct_shapes.yaml"), [
            f"run_dir={tmp}/run", f"data.train={url}", "data.eval=", f"trainer.steps={steps}", "trainer.log_every=4",
            f"trainer.sample_every={steps + 1}", f"trainer.checkpoint_every={steps + 1}",
            f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=2"])
        manifest = load_manifest(url)
        codec = dct_codec.DCTCodec(codec_config({"codec": manifest.codec}))
        stream = RankStream(manifest, StreamConfig(global_batch=64, drop_last=False), codec.decode, 0, 1)
        samples = [s for b in stream.iterate(1) for s in b]
        info = data_info(manifest)
        print(f"[train] reference: plain torch loop, {steps} steps, one thread", flush=True)
        ref_before = reference_rate(cfg, info, samples, steps)
        ensure_ray("", object_store_mb=200)
        summary = run_training(cfg, raw)
        steps_per_s = float(summary.get("steps_per_s", 0.0))
        if steps_per_s <= 0:  # the worker group's summary may come back without it: use rank 0's step timestamps
            with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
                times = [json.loads(line)["time"] for line in f if '"train"' in line]
            steps_per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        tree = workers_tree()
        ref_after = reference_rate(cfg, info, samples, steps)
    chunk, batch = cfg.model.chunk_size, cfg.data.stream.global_batch
    lengths = np.array([len(s["tokens"]) for s in samples])
    n_chunks = -(-lengths // chunk)
    per_chunk = float(np.mean(lengths / n_chunks))  # uniform chunk choice: E[targets] = L / #chunks
    ref = (ref_before + ref_after) / 2
    print(f"[train] spine {steps_per_s:.2f} steps/s, reference {ref_before:.2f} before / {ref_after:.2f} after",
          flush=True)
    return {"train_steps_per_s": steps_per_s, "train_samples_per_s": steps_per_s * batch,
            "train_tokens_per_s": steps_per_s * batch * per_chunk, "mean_triples_per_chunk": per_chunk,
            "zero_stage": cfg.zero.stage, "ranks": cfg.cluster.workers, "global_batch": batch,
            "reference_steps_per_s_before": ref_before, "reference_steps_per_s_after": ref_after,
            "reference_tokens_per_s": ref * batch * per_chunk,
            "spine_over_reference": steps_per_s / ref if ref > 0 else 0.0, **tree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triples", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    if args.triples < 1:
        parser.error(f"--triples {args.triples}: at least one triple to replay")
    if args.train_steps < 2 and not args.skip_train:
        parser.error(f"--train-steps {args.train_steps}: the rates are timed from the second step on, so at least 2")
    use_checkout()
    torch.set_num_threads(1)
    result: dict = {"triples": args.triples}
    if not args.skip_sampling:
        result.update(sampling_speed(args.triples))
    if not args.skip_train:
        result.update(training_speed(args.train_steps))
    if "ray" in sys.modules:  # Ray's workers print to this stdout asynchronously: stop it before the JSON line
        sys.modules["ray"].shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
