"""Held-out evaluation of a contrastive (reranker) export: retrieval and the one-attribute hard-negative check.

    python -m trainer.dalle.clip_eval runs/t2i/clip/export runs/t2i/data/eval [--batch 64] [--limit 512]

Prints one JSON object: top-1 image->text and text->image retrieval accuracy within batches of ``--batch`` held-out
scenes, and per kind of change (colour, shape, size, count, relation) the share of scenes whose true caption scores
above the same caption with one such word changed (a caption certainly false for the scene). The training loop's
``hard_negative_acc`` is the same check with one kind drawn per scene.
"""

from __future__ import annotations

import argparse
import json
import zlib
from typing import Any

import numpy as np
import torch

from data_pipeline.codecs import build_codec
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import RankStream, StreamConfig
from trainer.dalle.contrastive import retrieval_accuracy
from trainer.dalle.hard_negatives import KINDS, perturbations
from trainer.export import load_export


def held_out_samples(data_url: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` samples of a data set in its stored order (decoded, padding copies dropped); a data set
    smaller than ``limit`` gives all its samples."""
    manifest = load_manifest(data_url)
    codec = build_codec(manifest.codec["name"], manifest.codec.get("settings", {}))
    cfg = StreamConfig(global_batch=min(limit, manifest.total), partitions=1, shuffle_block=1, num_workers=0, drop_last=False,
                       shuffle_shards=False)
    out: list[dict[str, Any]] = []
    for batch in RankStream(manifest, cfg, codec.decode).iterate(max_epochs=1):
        out.extend(s for s in batch if s.get("valid", True))
        if len(out) >= limit:
            break
    return out[:limit]


@torch.no_grad()
def evaluate_export(export_dir: str, data_url: str, batch: int = 64, limit: int = 512) -> dict[str, Any]:
    if batch < 1 or limit < 1:
        raise ValueError(f"clip_eval: --batch and --limit must be >= 1, got {batch} and {limit}")
    family, modules, _ = load_export(export_dir)
    model = modules["model"]
    samples = held_out_samples(data_url, limit)
    if not samples or any("attributes" not in s or "caption" not in s for s in samples):
        raise ValueError(f"{data_url}: the hard-negative check needs scenes with captions and attributes kept")
    i2t, t2i = [], []
    for start in range(0, len(samples) - batch + 1, batch):
        collated = family.collate(samples[start:start + batch])
        sim = (model.encode_images(collated["images"])
               @ model.encode_texts(collated["text"], collated["text_mask"]).t())
        image_to_text, text_to_image = retrieval_accuracy(sim, collated["caption_key"])
        i2t.append(image_to_text)
        t2i.append(text_to_image)
    wins: dict[str, list[bool]] = {k: [] for k in KINDS}
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        images = family.collate(chunk)["images"]
        false_captions = [perturbations(s["caption"], s["attributes"], family.max_count) for s in chunk]
        for kind in KINDS:
            rows, wrong = [], []
            for i, s in enumerate(chunk):
                options = false_captions[i].get(kind)
                if options:
                    rng = np.random.default_rng(zlib.crc32(s["key"].encode()))
                    rows.append(i)
                    wrong.append(options[int(rng.integers(len(options)))])
            if rows:
                true = family.score(modules, images[rows], [chunk[i]["caption"] for i in rows])
                false = family.score(modules, images[rows], wrong)
                wins[kind].extend((true > false).tolist())
    every = [w for ws in wins.values() for w in ws]
    return {
        "export": export_dir, "data": data_url, "scenes": len(samples), "batch": batch,
        "image_to_text_acc": float(np.mean(i2t)) if i2t else None,
        "text_to_image_acc": float(np.mean(t2i)) if t2i else None,
        "hard_negative_acc": {k: {"share": float(np.mean(w)), "n": len(w)} for k, w in wins.items() if w},
        "hard_negative_acc_all": float(np.mean(every)) if every else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="export folder of a trained `contrastive` run")
    p.add_argument("data", help="held-out scene shards (image codec, caption and attributes kept)")
    p.add_argument("--batch", type=int, default=64, help="scenes per in-batch retrieval")
    p.add_argument("--limit", type=int, default=512, help="held-out scenes to use")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(evaluate_export(args.export, args.data, args.batch, args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
