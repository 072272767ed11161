"""What the old chunk-loss bias cost a trained unconditional DCTransformer: its samples, and the same samples
resampled by their number of chunks (bench/README.md, "The chunk-loss bias").

Until Nov 27 2026 the training loss did not weight an image's one trained chunk by its number of chunks n(x), so a
model fitted q(x) proportional to p(x) / n(x). Sampling-importance-resampling undoes a known reweighting: draw N
sequences from q, keep N draws with replacement with probability proportional to n(x), which is a sample of p
as N grows. If the object-count error of the weights trained that way comes from the bias, the resampled draws'
counts move to the data's; the plain draws are the baseline, scored the same way in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/dctransformer_reweight.py --weights runs/dct_quality/g10b_unconditional.pt \\
        [--samples 2048] [--eval 512]

Both sets are scored by the scene counter and the analyser against the held-out scenes through the codec (count
and colour total variation), as bench/dctransformer_quality.py does. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dctransformer_bands import add_model_args, check_model_args, load_model  # noqa: E402  (bench/)
from dctransformer_quality import counter_stats, scene_stats, scenes, tv  # noqa: E402
from scene_counter import load_or_train  # noqa: E402

from data_pipeline.codecs import dct_codec  # noqa: E402


def scores(images: np.ndarray, counter, data: dict) -> dict[str, float]:
    """Count and colour TV against the data, by both instruments, and the mean counts."""
    counts, colours = counter.predict(images)
    c_count, c_colour = counter_stats(counts, colours)
    a_count, a_colour = scene_stats(images)
    return {"counter_count_tv": round(tv(c_count, data["c_count"]), 3),
            "counter_colour_tv": round(tv(c_colour, data["c_colour"]), 3),
            "counter_mean": round(float(counts.mean()), 3),
            "counter_five_or_more": round(float((counts >= 5).mean()), 3),
            "analyser_count_tv": round(tv(a_count, data["a_count"]), 3),
            "analyser_colour_tv": round(tv(a_colour, data["a_colour"]), 3),
            "analyser_mean": round(sum(k * v for k, v in a_count.items()) / len(images), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--samples", type=int, default=2048, help="draws from the model (and resampled draws)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    check_model_args(p, a)
    if a.samples < 2:
        p.error(f"--samples must be >= 2, got {a.samples}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    codec, fam, model = load_model(a)
    _, held = scenes(1, 0, a.eval, codec)
    counter, _ = load_or_train(a.quality)
    data_images = dct_codec.decode([h.astype(np.int64) for h in held], codec)
    c_count, c_colour = counter_stats(*counter.predict(data_images))
    a_count, a_colour = scene_stats(data_images)
    data = {"c_count": c_count, "c_colour": c_colour, "a_count": a_count, "a_colour": a_colour}

    start = time.perf_counter()
    seq, cond = fam.sample_tokens(model, a.samples, torch.Generator().manual_seed(a.seed))
    print(f"[reweight] {a.samples} draws in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    images = fam.tokens_to_rgb(seq, cond)
    lengths = (seq[:, :, 0] != fam.space.c_pad).sum(1)  # rows up to and with the EOS, as training counts them
    n_chunks = ((lengths + a.chunk - 1) // a.chunk).double()
    picked = torch.multinomial(n_chunks / n_chunks.sum(), a.samples, replacement=True,
                               generator=torch.Generator().manual_seed(a.seed + 1)).numpy()
    held_lengths = np.array([len(h) for h in held])
    result = {**vars(a), "draw_seconds": round(time.perf_counter() - start, 1),
              "data_mean_triples": round(float(held_lengths.mean()), 1),
              "draws_mean_triples": round(float(lengths.double().mean()), 1),
              "resampled_mean_triples": round(float(lengths[picked].double().mean()), 1),
              "resampled_distinct": int(len(set(picked.tolist()))),
              **{f"draws_{k}": v for k, v in scores(images, counter, data).items()},
              **{f"resampled_{k}": v for k, v in scores(images[picked], counter, data).items()}}
    for prefix in ("draws", "resampled"):
        print(f"[reweight] {prefix}: " + ", ".join(f"{k[len(prefix) + 1:]} {v}" for k, v in result.items()
                                                   if k.startswith(prefix + "_")), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
