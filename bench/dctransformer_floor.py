"""The floor for an unconditional DCTransformer's sample statistics: what a perfect model would score. Sets of
``--samples`` fresh scenes (seeds 4, 5, ...) through the codec are scored against the held-out scenes exactly as
samples are (bench/dctransformer_quality.py), by the analyser and by the scene counter; their mean and max over
``--seeds`` sets are the reference a model's figures are read against (bench/README.md, runs 9 and 10).

    .venv/bin/python bench/dctransformer_floor.py --samples 1024 --eval 512 --seeds 8

Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dctransformer_quality import Experiment, scene_stats, tv  # noqa: E402  (bench/, beside this script)

from data_pipeline.codecs import dct_codec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--eval", type=int, default=512, help="held-out scenes (seed 1)")
    p.add_argument("--samples", type=int, default=1024, help="scenes per fresh set (as many as the samples scored)")
    p.add_argument("--seeds", type=int, default=8, help="fresh sets, seeds 4 .. 3 + seeds")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    exp = Experiment(argparse.Namespace(eval_only=True, train=1, eval=a.eval, samples=a.samples, workers=a.workers,
                                        quality=a.quality, device="cpu", counter=True))
    held = dct_codec.decode(exp.held_tok, exp.codec)
    d_count, d_col = scene_stats(held)
    names = ("analyser_count_tv", "analyser_colour_tv", "counter_count_tv", "counter_colour_tv")
    rows = []
    for seed in range(4, 4 + a.seeds):
        fresh = exp.fresh_data(a.samples, seed)
        f_count, f_col = scene_stats(fresh)
        c = exp.counter_scores("fresh", fresh, held)
        rows.append([tv(f_count, d_count), tv(f_col, d_col), c["fresh_counter_count_tv"], c["fresh_counter_colour_tv"]])
        print(f"[floor] seed {seed}: {dict(zip(names, np.round(rows[-1], 3).tolist(), strict=True))}", flush=True)
    r = np.array(rows)
    print(json.dumps({**vars(a), **{f"{n}_mean": round(float(m), 4) for n, m in zip(names, r.mean(0), strict=True)},
                      **{f"{n}_max": round(float(m), 4) for n, m in zip(names, r.max(0), strict=True)}}))


if __name__ == "__main__":
    main()
