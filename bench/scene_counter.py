"""A small CNN that counts a 32x32 shape scene's objects, in all and per palette colour: the second instrument for
unconditional samples (the issue allows the scenes' analyser or a classifier trained on them).

The rule-based analyser (shape_analysis) accepts an object only when its pixels lie within 70 RGB of a palette
colour; a sample whose object is right but a little off in colour counts as empty. The counter is trained on
scenes *through the same DCT codec* (encode + decode at the bench's quality), with 0-5 objects (blank backgrounds
for 0), so it reads counts as they look after the codec, and it can say 0, 1 or 5 where the held-out data (2-4)
never does. Its held-out accuracy and the distance between its histogram of the held-out scenes and their true
one are printed with every use, so its own error is on the table next to the samples' distance.

    .venv/bin/python bench/scene_counter.py --quality 75    # train (or load) and print its accuracy

Weights are cached as runs/dct_quality/scene_counter_q<quality>.pt (the settings and seeds fix the data; the
training's float sums depend on the thread count, so two trainings agree to about 0.1% of accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from data_pipeline.codecs import dct_codec  # noqa: E402
from data_pipeline.codecs.dct_config import DCTCodecConfig  # noqa: E402
from data_pipeline.sources.shape_language import BACKGROUND, PALETTE  # noqa: E402
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource  # noqa: E402

COLOURS = list(PALETTE)
MAX_COUNT = 5
CACHE = os.path.join(ROOT, "runs", "dct_quality")


class SceneCounter(nn.Module):
    """Four 3x3 conv layers (32 -> 4 px) and two heads: total count 0..5 and, per colour, its count 0..5."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 24, 48, 96, 96]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.count = nn.Linear(96 * 16, MAX_COUNT + 1)
        self.colours = nn.Linear(96 * 16, len(COLOURS) * (MAX_COUNT + 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 32, 32, 3] -> count logits [B, 6], per-colour count logits [B, 6 colours, 6]."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        h = self.features(x)
        return self.count(h), self.colours(h).view(-1, len(COLOURS), MAX_COUNT + 1)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Predicted total counts [N] and per-colour counts [N, 6] of uint8 RGB images [N, 32, 32, 3]."""
        self.eval()
        counts, colours = [], []
        for i in range(0, len(images), batch):
            c, k = self(torch.from_numpy(np.ascontiguousarray(images[i: i + batch])))
            counts.append(c.argmax(-1).numpy())
            colours.append(k.argmax(-1).numpy())
        return np.concatenate(counts), np.concatenate(colours)


def labelled_scenes(n: int, seed: int, quality: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` scenes through the codec with 1-5 objects, every 8th a blank background: (images, counts, per-colour
    counts)."""
    src = ShapesSource(ShapesConfig(num_samples=n, resolution=32, seed=seed, min_objects=1, max_objects=MAX_COUNT))
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    counts = np.zeros(n, dtype=np.int64)
    colours = np.zeros((n, len(COLOURS)), dtype=np.int64)
    for i in range(n):
        if i % 8 == 7:
            images[i] = BACKGROUND
            continue
        s = src.sample(i)
        images[i] = s.image
        counts[i] = s.attributes["count"]
        for o in s.attributes["objects"]:
            colours[i, COLOURS.index(o["colour"])] += 1
    codec = DCTCodecConfig(resolution=32, quality=quality, value_range=256)
    return dct_codec.decode(dct_codec.encode(list(images), codec), codec), counts, colours


def accuracy(model: SceneCounter, images: np.ndarray, counts: np.ndarray, colours: np.ndarray) -> dict[str, float]:
    pc, pk = model.predict(images)
    return {"count_accuracy": float((pc == counts).mean()), "colour_count_accuracy": float((pk == colours).mean()),
            "all_colours_right": float((pk == colours).all(axis=1).mean())}


def train(quality: int, n: int = 24000, epochs: int = 5, seed: int = 2) -> tuple[SceneCounter, dict[str, float]]:
    """Train on ``n`` codec scenes of ``seed``, validate on 2,000 of ``seed + 1``."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    images, counts, colours = labelled_scenes(n, seed, quality)
    val = labelled_scenes(2000, seed + 1, quality)
    model = SceneCounter()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(0)
    step = 0
    for epoch in range(epochs):
        model.train()
        for idx in rng.permutation(n)[: (n // 128) * 128].reshape(-1, 128):
            x = torch.from_numpy(images[idx])
            lc, lk = model(x)
            loss = F.cross_entropy(lc, torch.from_numpy(counts[idx])) + F.cross_entropy(
                lk.reshape(-1, MAX_COUNT + 1), torch.from_numpy(colours[idx]).reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"[counter] epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.3f} {json.dumps(accuracy(model, *val))} "
              f"({time.perf_counter() - t0:.0f}s, ETA {(time.perf_counter() - t0) / step * (steps - step):.0f}s)",
              flush=True)
    return model.eval(), accuracy(model, *val)


def load_or_train(quality: int) -> tuple[SceneCounter, dict[str, float]]:
    """The cached counter for ``quality`` (trained and saved on first use) and its validation accuracy."""
    path = os.path.join(CACHE, f"scene_counter_q{quality}.pt")
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu")
        model = SceneCounter()
        model.load_state_dict(saved["state"])
        return model.eval(), saved["validation"]
    model, val = train(quality)
    os.makedirs(CACHE, exist_ok=True)
    torch.save({"state": model.state_dict(), "validation": val}, path)
    return model, val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=int, default=75)
    a = p.parse_args()
    torch.set_num_threads(1)
    _, val = load_or_train(a.quality)
    print(json.dumps({"quality": a.quality, **val}))


if __name__ == "__main__":
    main()
