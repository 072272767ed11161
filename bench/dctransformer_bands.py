"""Where a DCTransformer's samples put their coefficients, against held-out data: triples per image by luma /
chroma and by zigzag frequency band, and how many of them are +-1 (bench/README.md, "Where the extra triples
come from").

    OMP_NUM_THREADS=1 .venv/bin/python bench/dctransformer_bands.py --weights runs/dct_quality/g9a_unconditional.pt \\
        --d-model 256 --layers 4 --heads 4 [--samples 128] [--top-p 0.8 --value-top-p 1.0]

Last stdout line: one JSON object, the bands of the data and of the draws and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dctransformer_quality import MODELS, load_weights, scenes  # noqa: E402  (bench/, beside this script)

from data_pipeline.codecs.dct_config import DCTCodecConfig  # noqa: E402
from data_pipeline.codecs.dct_tables import CHANNEL_SLOT, CHANNEL_ZIGZAG, NUM_LUMA_SLOTS  # noqa: E402
from trainer.dct.model import DecoderSizes  # noqa: E402
from trainer.families.dctransformer import DCTransformerConfig, DCTransformerFamily  # noqa: E402
from trainer.transformer import TransformerConfig  # noqa: E402

BANDS = ((0, 0), (1, 5), (6, 14), (15, 27), (28, 63))


def bands(sequences: list[np.ndarray], value_range: int) -> dict[str, float]:
    """Mean regular triples per image: in all, luma, chroma, per zigzag band, and of magnitude 1 per band."""
    body = [s[s[:, 0] < 384] for s in sequences]
    ch = np.concatenate([b[:, 0] for b in body])
    tok = np.concatenate([b[:, 2] for b in body]).astype(np.int64)
    magnitude = np.abs(tok - value_range + (tok >= value_range))
    freq, n = CHANNEL_ZIGZAG[ch], len(sequences)
    luma = CHANNEL_SLOT[ch] < NUM_LUMA_SLOTS
    out = {"triples": len(ch) / n, "luma": float(luma.sum()) / n, "chroma": float((~luma).sum()) / n}
    for lo, hi in BANDS:
        band = (freq >= lo) & (freq <= hi)
        out[f"zigzag_{lo}_{hi}"] = float(band.sum()) / n
        out[f"zigzag_{lo}_{hi}_ones"] = float((band & (magnitude == 1)).sum()) / n
    return {k: round(v, 2) for k, v in out.items()}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The trained unconditional model to read (run 8's config A by default) and the held-out scenes to read it on."""
    p.add_argument("--weights", required=True, help="an unconditional state dict saved by dctransformer_quality.py")
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval", type=int, default=256, help="held-out scenes (seed 1)")


def check_model_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``add_model_args``' counts and sizes, refused as one usage line before any scene or weight is read."""
    for name in ("eval", "chunk", "d_model", "layers", "heads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if a.d_model % a.heads:
        p.error(f"--d-model {a.d_model} --heads {a.heads}: the width must be a multiple of the heads")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality {a.quality}: JPEG quality runs from 1 to 100")


def load_model(a: argparse.Namespace) -> tuple[DCTCodecConfig, DCTransformerFamily, torch.nn.Module]:
    """The codec, family and trained network (eval mode, CPU) that ``add_model_args``' arguments name."""
    codec = DCTCodecConfig(resolution=32, quality=a.quality, value_range=256)
    cfg = DCTransformerConfig(chunk_size=a.chunk, encoder=TransformerConfig(n_layer=a.layers, n_head=a.heads,
                                                                             d_model=a.d_model),
                              decoders=DecoderSizes(a.layers, a.layers, a.layers), **MODELS["unconditional"])
    fam = DCTransformerFamily(cfg, {"codec": {"name": "dct", "settings": codec.to_dict()}})
    model = fam.build_modules()["model"]
    load_weights(model, a.weights, a)
    return codec, fam, model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--value-top-p", type=float, default=None)
    a = p.parse_args()
    check_model_args(p, a)
    if a.samples < 1:
        p.error(f"--samples {a.samples}: at least one draw")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    codec, fam, model = load_model(a)
    _, held = scenes(1, 0, a.eval, codec)
    data = bands([t.astype(np.int64) for t in held], codec.value_range)
    seq, _ = fam.sample_tokens(model, a.samples, torch.Generator().manual_seed(0), temperature=a.temperature,
                               top_p=a.top_p, value_top_p=a.value_top_p)
    drawn = bands([s.numpy() for s in seq], codec.value_range)
    print(f"[bands] data {data}\n[bands] draws {drawn}", flush=True)
    ratios = {f"{k}_draws_over_data": round(drawn[k] / data[k], 3) for k in data if data[k]}
    print(json.dumps({**vars(a), "data": data, "draws": drawn, **ratios}))


if __name__ == "__main__":
    main()
