"""DCTransformer benchmarks: sampler speed with and without KV caches, training tokens/s with ZeRO-2 on 2 ranks.

    .venv/bin/python bench/dctransformer.py [--triples 1000] [--train-steps 12]

Sampling: one 64x64 shape scene encoded at q=95 gives a real sequence of >= 1000 triples; the sampler replays its
first ``--triples`` triples (teacher forcing through ``generate``: every decoder step, mask and draw is computed)
in one chunk, once with the three decoders' KV caches and once recomputing the chunk prefix at every triple.
Training: `dgm train` machinery (embedded Ray, 2 workers, DeepSpeed ZeRO-2, fp32, gloo) on configs/dct_shapes.yaml
with small shards; tokens/s = steps/s x global batch x expected target triples per chunk (exact for the data).
Quality (``--quality-steps N``, off by default): small models trained in this process with plain torch AdamW
through the family's own ``train_step`` (no Ray/DeepSpeed: the learning is the same code, only faster to run
here) on 32x32 shape scenes, scored on held-out scenes (another seed): bits per image against the same model with
the encoder's input zeroed (``use_context: false``); unconditional samples' object counts and colours from the
scenes' analyser against the held-out data's; colourisation PSNR against grey chroma; 2x super-resolution PSNR
against bicubic upsampling of the same low-resolution image.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

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


def training_speed(steps: int) -> dict[str, float]:
    from data_pipeline.manifest import load_manifest
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from launch.config import load_config
    from launch.train import ensure_ray, run_training

    tmp = tempfile.mkdtemp(prefix="dct-bench-")
    url = os.path.join(tmp, "train")
    prepare_dataset(PrepareConfig(output=url, source="shapes", codec="dct", parallel=False,
                                  source_settings={"num_samples": 512, "resolution": 32, "seed": 0, "max_objects": 4},
                                  codec_settings={"resolution": 32, "quality": 50, "value_range": 256},
                                  samples_per_shard=128), report=lambda _: None)
    cfg, raw = load_config(os.path.join(ROOT, "configs", "dct_shapes.yaml"), [
        f"run_dir={tmp}/run", f"data.train={url}", "data.eval=", f"trainer.steps={steps}", "trainer.log_every=4",
        f"trainer.sample_every={steps + 1}", f"trainer.checkpoint_every={steps + 1}",
        f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=2"])
    ensure_ray("", object_store_mb=200)
    summary = run_training(cfg, raw)
    chunk, batch = cfg.model.chunk_size, cfg.data.stream.global_batch
    manifest = load_manifest(url)
    from data_pipeline.stream import RankStream, StreamConfig
    from trainer.families.dctransformer import codec_config

    codec = dct_codec.DCTCodec(codec_config({"codec": manifest.codec}))
    stream = RankStream(manifest, StreamConfig(global_batch=64, drop_last=False), codec.decode, 0, 1)
    lengths = np.array([len(s["tokens"]) for b in stream.iterate(1) for s in b])
    n_chunks = -(-lengths // chunk)
    per_chunk = float(np.mean(lengths / n_chunks))  # uniform chunk choice: E[targets] = L / #chunks
    steps_per_s = float(summary.get("steps_per_s", 0.0))
    if steps_per_s <= 0:  # the worker group's summary may come back without it: use rank 0's step timestamps
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            times = [json.loads(line)["time"] for line in f if '"train"' in line]
        steps_per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"train_steps_per_s": steps_per_s, "train_samples_per_s": steps_per_s * batch,
            "train_tokens_per_s": steps_per_s * batch * per_chunk, "mean_triples_per_chunk": per_chunk,
            "zero_stage": cfg.zero.stage, "ranks": cfg.cluster.workers, "global_batch": batch}


class PlainEngine:
    """The Engine protocol over a torch module and AdamW (what DeepSpeed does, minus the distribution)."""

    def __init__(self, module: torch.nn.Module, lr: float, steps: int) -> None:
        self.module = module
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=steps, pct_start=0.05)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def quality(steps: int, batch: int, n_train: int, n_eval: int, n_samples: int) -> dict[str, float]:
    from collections import Counter

    from PIL import Image

    from data_pipeline.sources.shape_analysis import analyse_scene
    from trainer.families.base import StepContext

    codec = DCTCodecConfig(resolution=32, quality=50, value_range=256)
    info = {"codec": {"name": "dct", "settings": codec.to_dict()},
            "source": {"name": "shapes", "settings": {"num_samples": n_eval, "resolution": 32, "seed": 1,
                                                      "max_objects": 4}}}
    train_src = ShapesSource(ShapesConfig(num_samples=n_train, resolution=32, seed=0, max_objects=4))
    eval_src = ShapesSource(ShapesConfig(num_samples=n_eval, resolution=32, seed=1, max_objects=4))
    train = [train_src.sample(i) for i in range(n_train)]
    held = [eval_src.sample(i) for i in range(n_eval)]
    train_tok = dct_codec.encode([s.image for s in train], codec)
    held_tok = dct_codec.encode([s.image for s in held], codec)
    held_rgb = np.stack([s.image for s in held])
    print(f"[quality] {n_train} train / {n_eval} held-out scenes, mean {np.mean([len(t) for t in held_tok]):.1f} "
          "triples per held-out image", flush=True)
    out: dict[str, float] = {}

    def fit(**kw) -> tuple[DCTransformerFamily, torch.nn.Module]:
        cfg = DCTransformerConfig(chunk_size=64, encoder=TransformerConfig(n_layer=2, n_head=4, d_model=96), **kw)
        fam = DCTransformerFamily(cfg, info)
        torch.manual_seed(0)
        model = fam.build_modules()["model"]
        engine = PlainEngine(model, 2e-3, steps)
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for step in range(steps):
            idx = rng.choice(n_train, batch, replace=False)
            b = fam.collate([{"tokens": train_tok[i], "label": train[i].label} for i in idx])
            m = fam.train_step({"model": engine}, b, StepContext(step, 0, 1, torch.device("cpu"), torch.float32))
            if step % 100 == 0 or step == steps - 1:
                print(f"[quality] {kw} step {step} loss {m['loss']:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)
        return fam, model.eval()

    def held_bits(fam: DCTransformerFamily, model: torch.nn.Module) -> float:
        vals = []
        for i in range(0, n_eval, 32):
            b = fam.collate([{"tokens": t} for t in held_tok[i:i + 32]])
            vals.append(fam.evaluate({"model": model}, b)["bits_per_image"] * len(held_tok[i:i + 32]))
        return sum(vals) / n_eval

    fam, model = fit()
    out["bits_per_image"] = held_bits(fam, model)
    out["bits_per_triple"] = out["bits_per_image"] / float(np.mean([len(t) for t in held_tok]))
    gen = torch.Generator().manual_seed(0)
    imgs = (fam.sample_images({"model": model}, n_samples, gen).permute(0, 2, 3, 1).numpy() * 255).round()
    imgs = imgs.astype(np.uint8)
    Image.fromarray(np.concatenate(list(imgs[:16]), axis=1)).save(os.path.join(ROOT, "runs", "dct_quality_samples.png"))
    s_objs = [analyse_scene(im) for im in imgs]
    d_objs = [analyse_scene(s.image) for s in held]
    s_counts, d_counts = Counter(len(o) for o in s_objs), Counter(len(o) for o in d_objs)
    keys = set(s_counts) | set(d_counts)
    out["count_tv"] = 0.5 * sum(abs(s_counts[k] / n_samples - d_counts[k] / n_eval) for k in keys)
    out["sample_mean_count"] = float(np.mean([len(o) for o in s_objs]))
    out["data_mean_count"] = float(np.mean([len(o) for o in d_objs]))
    s_col = Counter(o["colour"] for objs in s_objs for o in objs)
    d_col = Counter(o["colour"] for objs in d_objs for o in objs)
    ns, nd = max(sum(s_col.values()), 1), max(sum(d_col.values()), 1)
    out["colour_tv"] = 0.5 * sum(abs(s_col[k] / ns - d_col[k] / nd) for k in set(s_col) | set(d_col))
    out["sample_count_hist"] = json.dumps(dict(sorted(s_counts.items())))
    out["data_count_hist"] = json.dumps(dict(sorted(d_counts.items())))

    fam0, model0 = fit(use_context=False)
    out["baseline_no_context_bits_per_image"] = held_bits(fam0, model0)

    n_cond = min(32, n_eval)
    famc, modelc = fit(mode="colourise")
    rgb = famc.sample_images({"model": modelc}, n_cond, torch.Generator().manual_seed(0),
                             images=held_rgb[:n_cond], temperature=0.5)
    out["colourise_psnr"] = psnr((rgb.permute(0, 2, 3, 1).numpy() * 255).round(), held_rgb[:n_cond])
    grey = [t[np.isin(t[:, 0] % 6, [0, 1, 2, 3]) | (t[:, 0] >= 384)] for t in held_tok[:n_cond]]
    out["grey_chroma_psnr"] = psnr(dct_codec.decode(grey, codec), held_rgb[:n_cond])
    out["jpeg_q50_psnr"] = psnr(dct_codec.decode(held_tok[:n_cond], codec), held_rgb[:n_cond])

    fams, models = fit(mode="superres")
    rgb = fams.sample_images({"model": models}, n_cond, torch.Generator().manual_seed(0),
                             images=held_rgb[:n_cond], temperature=0.5)
    out["superres_psnr"] = psnr((rgb.permute(0, 2, 3, 1).numpy() * 255).round(), held_rgb[:n_cond])
    small = held_rgb[:n_cond].reshape(n_cond, 16, 2, 16, 2, 3).astype(np.float32).mean(axis=(2, 4))
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    bicubic = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in small])
    out["bicubic_psnr"] = psnr(bicubic, held_rgb[:n_cond])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triples", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--quality-steps", type=int, default=0, help="> 0: train and score the quality models")
    parser.add_argument("--quality-batch", type=int, default=16)
    parser.add_argument("--quality-train", type=int, default=2048)
    parser.add_argument("--quality-eval", type=int, default=128)
    parser.add_argument("--quality-samples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict = {"triples": args.triples}
    if not args.skip_sampling:
        result.update(sampling_speed(args.triples))
    if not args.skip_train:
        result.update(training_speed(args.train_steps))
    if args.quality_steps > 0:
        os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
        result.update(quality(args.quality_steps, args.quality_batch, args.quality_train, args.quality_eval,
                              args.quality_samples))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
