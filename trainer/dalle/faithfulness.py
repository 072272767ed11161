"""Does a generated image show what its caption says? The text-to-image family's headline measurement.

For held-out captions of the shape scenes the prior draws ``candidates`` images each; the scenes' rule-based analyser
(``caption_matches``) checks every image against its caption: colours, shapes and sizes mentioned, objects matched
with all their stated attributes, relations, the count, and "all" (every applicable check passed). Three readings:

- ``sampled``: the mean over every candidate (no reranking);
- ``reranked``: the candidate the contrastive model scores highest for the caption (what `dgm sample` shows first);
- ``shuffled``: as many images drawn for another held-out caption, scored against the original one: what the
  analyser reports when the picture ignores the caption. Faithful generation must clearly beat it.

    python -m trainer.dalle.faithfulness PRIOR_EXPORT CLIP_EXPORT EVAL_DATASET [--captions 48] [--candidates 8]

prints progress on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data_pipeline.codecs import build_codec
from data_pipeline.manifest import load_manifest
from data_pipeline.sources.shape_analysis import caption_matches
from data_pipeline.stream import ShardOpener, StreamConfig
from trainer.export import load_export

ATTRIBUTES = ("colour", "shape", "size", "object", "relation", "count", "all")


def held_out_captions(dataset_url: str, n: int) -> list[str]:
    """The first ``n`` non-empty captions of a dataset, in shard order (deterministic)."""
    manifest = load_manifest(dataset_url)
    codec = build_codec(manifest.codec["name"], manifest.codec.get("settings", {}))
    opener = ShardOpener(manifest, StreamConfig())
    captions: list[str] = []
    for i in range(len(manifest.shards)):
        for fields in opener.samples(i, 0):
            caption = codec.decode(fields).get("caption", "")
            if caption:
                captions.append(caption)
            if len(captions) == n:
                return captions
    if not captions:
        raise ValueError(f"{dataset_url}: no captions in this dataset (prepare it with the caption kept)")
    return captions


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8, as the analyser reads scenes."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def scores_of(image: np.ndarray, caption: str) -> dict[str, float | None]:
    hits = caption_matches(image, caption)
    return {k: hits.get(k) for k in ATTRIBUTES}


def mean_scores(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Per-attribute means over the rows where the attribute applies (None when it never does)."""
    out: dict[str, float | None] = {}
    for k in ATTRIBUTES:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def other_captions(texts: list[str]) -> list[str]:
    """For each caption, the next one (cyclically) whose text differs: the shuffled baseline must draw for another
    caption, and procedural captions repeat, so a shift by one position could pair a caption with itself."""
    if len(set(texts)) < 2:
        raise ValueError("the shuffled baseline needs at least two different held-out captions")
    n = len(texts)
    return [next(texts[(i + k) % n] for k in range(1, n) if texts[(i + k) % n] != text)
            for i, text in enumerate(texts)]


def evaluate(prior_export: str, clip_export: str, dataset_url: str, *, captions: int = 48, candidates: int = 8,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> dict[str, Any]:
    if captions < 1 or candidates < 1:  # 0 read every caption of the data set: hours of sampling
        raise ValueError(f"faithfulness: captions and candidates must be >= 1, got {captions} and {candidates}")
    family, modules, _ = load_export(prior_export)
    clip_family, clip_modules, _ = load_export(clip_export)
    texts = held_out_captions(dataset_url, captions)
    shuffled = other_captions(texts)
    gen = torch.Generator().manual_seed(seed)
    sampled, reranked, shuffled_rows, top_scores = [], [], [], []
    start = time.time()
    for i, (caption, other) in enumerate(zip(texts, shuffled, strict=True)):
        options = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        images = family.sample_images(modules, candidates, gen, prompt=[caption] * candidates, **options)
        with torch.no_grad():
            clip = clip_family.score(clip_modules, images, [caption] * candidates)
        pixels = to_uint8(images)
        rows = [scores_of(p, caption) for p in pixels]
        sampled.extend(rows)
        reranked.append(rows[int(clip.argmax())])
        top_scores.append(float(clip.max()))
        wrong = family.sample_images(modules, candidates, gen, prompt=[other] * candidates, **options)
        shuffled_rows.extend(scores_of(p, caption) for p in to_uint8(wrong))
        done = i + 1
        rate = done / (time.time() - start)
        print(f"[faithfulness] {done}/{len(texts)} captions, {rate * candidates:.2f} images/s, "
              f"ETA {(len(texts) - done) / rate:.0f}s", file=sys.stderr, flush=True)
    return {
        "captions": len(texts),
        "candidates": candidates,
        "temperature": temperature,
        "sampled": mean_scores(sampled),
        "reranked": mean_scores(reranked),
        "shuffled": mean_scores(shuffled_rows),
        "mean_top_clip_score": float(np.mean(top_scores)),
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prior_export", help="export folder of a trained `dalle` run")
    p.add_argument("clip_export", help="export folder of a trained `contrastive` run (the reranker)")
    p.add_argument("dataset", help="held-out image dataset with captions (e.g. runs/t2i/data/eval)")
    p.add_argument("--captions", type=int, default=48)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for flag, value in (("--captions", a.captions), ("--candidates", a.candidates)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    torch.set_num_threads(1)
    result = evaluate(a.prior_export, a.clip_export, a.dataset, captions=a.captions, candidates=a.candidates,
                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
