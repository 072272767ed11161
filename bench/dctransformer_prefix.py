"""Which part of a sequence an unconditional DCTransformer gets wrong: complete held-out scenes from their first
k triples (the channel-major order puts the DC and lowest frequencies of every block first, so a short prefix is
the scene's coarse layout) and score the completions' object counts against the same scenes' (bench/README.md,
"Where the count error comes from").

    OMP_NUM_THREADS=2 .venv/bin/python bench/dctransformer_prefix.py --weights runs/dct_quality/g9b_unconditional.pt \\
        --prefixes 0 32 64 128 [--eval 256]

k = 0 is plain unconditional sampling. For each k: the scene counter's and the analyser's count histograms of the
completions against those of the held-out scenes through the codec (total variation), and the fraction of
completions the counter gives the same count as the scene it started from. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dctransformer_bands import add_model_args, check_model_args, load_model  # noqa: E402  (bench/)
from dctransformer_quality import scene_stats, scenes, tv  # noqa: E402
from scene_counter import load_or_train  # noqa: E402

from data_pipeline.codecs import dct_codec  # noqa: E402
from trainer.dct.sampling import DrawSettings, generate  # noqa: E402


def mean_count(hist: Counter, n: int) -> float:
    return round(sum(k * v for k, v in hist.items()) / n, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prefixes", type=int, nargs="+", default=[0, 32, 64, 128], help="given triples per scene")
    a = p.parse_args()
    check_model_args(p, a)
    if min(a.prefixes) < 0:
        p.error(f"--prefixes {' '.join(map(str, a.prefixes))}: a prefix is a count of given triples, 0 or more")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    codec, fam, model = load_model(a)
    _, held = scenes(1, 0, a.eval, codec)
    counter, validation = load_or_train(a.quality)
    limit = fam.max_triples()
    teacher = torch.tensor(fam.space.pad).repeat(a.eval, limit, 1)
    for i, h in enumerate(held):
        teacher[i, : len(h)] = torch.from_numpy(h.astype(np.int64))
    data = dct_codec.decode([h.astype(np.int64) for h in held], codec)
    data_counts = counter.predict(data)[0]
    data_hist = scene_stats(data)[0]
    cond = fam.sampling_condition(model, a.eval)
    result: dict = {**vars(a), "data_counter_mean": round(float(data_counts.mean()), 3),
                    "data_analyser_mean": mean_count(data_hist, a.eval),
                    **{f"counter_validation_{k}": v for k, v in validation.items()}}
    for k in a.prefixes:
        t = time.perf_counter()
        seq = generate(model, a.eval, fam.space, a.chunk, limit, cond, DrawSettings(), torch.Generator().manual_seed(0),
                       teacher=teacher, teacher_rows=k)
        imgs = fam.tokens_to_rgb(seq, cond)
        counts = counter.predict(imgs)[0]
        hist = scene_stats(imgs)[0]
        row = {"seconds": round(time.perf_counter() - t, 1),
               "triples": round(float((seq[:, :, 0] < fam.space.c_eos).sum(1).float().mean()), 1),
               "counter_count_tv": round(tv(Counter(counts.tolist()), Counter(data_counts.tolist())), 3),
               "counter_same_count": round(float((counts == data_counts).mean()), 3),
               "counter_five_or_more": round(float((counts >= 5).mean()), 3),
               "counter_mean": round(float(counts.mean()), 3),
               "analyser_count_tv": round(tv(hist, data_hist), 3), "analyser_mean": mean_count(hist, a.eval)}
        print(f"[prefix] {k} given triples: {json.dumps(row)}", flush=True)
        result.update({f"prefix{k}_{name}": v for name, v in row.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
