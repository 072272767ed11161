"""dVAE reconstructions of held-out shape scenes: PSNR, codebook use, and whether the analyser still finds the objects.

    python bench/dvae_recon.py EXPORT_DIR DATA_DIR [--limit N]

Every held-out scene is tokenised (argmax codes) and decoded; the rule-based analyser
(data_pipeline.sources.shape_analysis.caption_matches) scores the original and the reconstruction against the
scene's ground-truth attributes. The originals' score is the reference the reconstructions are measured against.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's code, not whatever tree the venv's editable install names

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline.codecs import build_codec  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.sources.shape_analysis import caption_matches  # noqa: E402
from data_pipeline.stream import RankStream, StreamConfig  # noqa: E402
from trainer.export import load_export  # noqa: E402
from trainer.families.dvae import code_stats, psnr_db  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("data")
    ap.add_argument("--limit", type=int, default=0, help="at most this many scenes (0: all)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if args.batch < 1 or args.limit < 0:
        ap.error(f"--batch {args.batch} --limit {args.limit}: the batch must be at least 1, the limit 0 (all) or more")
    torch.set_num_threads(1)
    family, modules, _ = load_export(args.export)
    manifest = load_manifest(args.data)
    cfg = StreamConfig(global_batch=args.batch, partitions=1, drop_last=False, shuffle_shards=False)
    stream = RankStream(manifest, cfg, build_codec(manifest.codec["name"], manifest.codec.get("settings", {})).decode,
                        0, 1)
    psnrs, tokens_all = [], []
    scores: dict[str, dict[str, list[float]]] = {"original": {}, "reconstruction": {}}
    started, n = time.perf_counter(), 0
    for samples in stream.iterate(max_epochs=1):
        samples = [s for s in samples if s.get("valid", True)]
        if args.limit:
            samples = samples[: args.limit - n]
        if not samples:
            break
        images = np.stack([s["image"] for s in samples])
        tokens = family.encode_tokens(modules, images)
        recon = family.decode_tokens(modules, tokens)
        psnrs += psnr_db(recon, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).tolist()
        tokens_all.append(tokens.flatten())
        recon_u8 = (recon.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        for s, orig, rec in zip(samples, images, recon_u8, strict=True):
            for name, img in (("original", orig), ("reconstruction", rec)):
                res = caption_matches(img, s["attributes"])
                for key in ("all", "object", "count", "colour", "shape", "size"):
                    if res.get(key) is not None:
                        scores[name].setdefault(key, []).append(float(res[key]))
        n += len(samples)
        if args.limit and n >= args.limit:
            break
    stats = code_stats(torch.cat(tokens_all), family.num_codes)
    out = {
        "scenes": n,
        "psnr_db": float(np.mean(psnrs)),
        "codebook_perplexity": stats["perplexity"],
        "codebook_usage": stats["usage"],
        "analyser": {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in scores.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out["analyser_all_ratio"] = out["analyser"]["reconstruction"]["all"] / max(out["analyser"]["original"]["all"], 1e-9)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
