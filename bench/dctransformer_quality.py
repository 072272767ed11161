"""DCTransformer learning on held-out 32x32 shape scenes: bits, sample statistics, colourisation, super-resolution.

    .venv/bin/python bench/dctransformer_quality.py --models unconditional,no_context --steps 2000

Each model is trained in this process with plain torch AdamW (one-cycle schedule) through the family's own
``train_step`` (no Ray/DeepSpeed: the learning is the same code, only cheaper to run here) on scenes of seed 0 and
scored on held-out scenes of seed 1:

- ``unconditional`` / ``no_context``: held-out bits per image (every chunk of every sequence, exact NLL); the
  no-context model is the same network with the encoder's input zeroed, so it sees only the triples of its own
  chunk. Samples (``--sample-temperature``, ``--sample-top-k``, ``--sample-top-p``) are scored by the model itself
  (their bits per image: at temperature 1 an estimate of the model's entropy, near the held-out bits when sampling
  and training agree) and parsed by the scenes' analyser (shape_analysis):
  object-count and colour histograms against the held-out images through the same codec (what a perfect model
  of the sequences would produce) and against the raw held-out images; the total-variation distance of two
  disjoint halves of the held-out set is printed as a sampling-noise floor, and the distance of as many fresh
  data scenes as samples (``fresh_data_*``: a perfect model's figure at these set sizes) as the tighter one.
- ``colourise``: given all luma, the chroma is drawn (``--cond-temperature``, 0 = argmax; ``--cond-samples K``
  averages K draws in pixel space, the posterior-mean estimate that PSNR rewards); RGB PSNR against
  the raw image, with grey chroma (the luma alone through the codec) as the naive baseline.
- ``superres`` / ``superres_full``: given the 2x box-downsampled image, the residual sequence (target minus the
  bicubic hint's coefficients; ``superres_full``: the target's own sequence) is drawn; RGB and luma (Y) PSNR against
  bicubic upsampling of the same low-resolution image. 4:2:0 chroma caps the codec's RGB PSNR below bicubic's
  at this size, so the Y PSNR (luma is not subsampled) is the comparison the codec allows; both are printed with
  the codec's ceiling (the original image through the codec).

Trained weights go to runs/dct_quality/<model>.pt (``--eval-only`` rescores them; ``--init PREFIX`` continues
training from runs/dct_quality/<PREFIX><model>.pt with a fresh optimiser and schedule). On a lent GPU:
``--device cuda --amp bf16`` (autocast; the loss stays float32), ``--minutes M`` (train for a wall-clock budget,
the one-cycle schedule stretched over it), ``--workers N`` (scene generation and encoding in N processes); the
training speed is printed as triples/s and, from a FLOP count of one step (torch's FlopCounterMode), achieved
TFLOP/s and model FLOPs utilisation against ``--peak-tflops``. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from multiprocessing import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scene_counter import COLOURS, load_or_train  # noqa: E402  (bench/, beside this script)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from data_pipeline.codecs import dct_codec  # noqa: E402
from data_pipeline.codecs.dct_config import DCTCodecConfig  # noqa: E402
from data_pipeline.codecs.dct_tables import CHANNEL_SLOT, NUM_LUMA_SLOTS  # noqa: E402
from data_pipeline.sources.shape_analysis import analyse_scene  # noqa: E402
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource  # noqa: E402
from trainer.dct.model import DecoderSizes  # noqa: E402
from trainer.families.base import StepContext  # noqa: E402
from trainer.families.dctransformer import DCTransformerConfig, DCTransformerFamily  # noqa: E402
from trainer.images import save_grid  # noqa: E402
from trainer.transformer import TransformerConfig  # noqa: E402

MODELS = {"unconditional": {}, "no_context": {"use_context": False}, "colourise": {"mode": "colourise"},
          "superres": {"mode": "superres"}, "superres_full": {"mode": "superres", "superres_target": "full"}}
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
OUT = os.path.join(ROOT, "runs", "dct_quality")


def load_weights(model: torch.nn.Module, path: str, a: argparse.Namespace) -> None:
    """``path``'s state dict into ``model``. A file of another network or kind stops the run with one line naming
    the file and the network the arguments built (torch would dump every mismatched tensor)."""
    built = f"--d-model {a.d_model} --layers {a.layers} --heads {a.heads} --chunk {a.chunk}"
    try:
        state = torch.load(path, map_location=next(model.parameters()).device)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such weights file") from None
    except Exception as e:  # a pickle, zip or torch error: not a file torch.save wrote
        said = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise SystemExit(f"{path}: not a torch state dict ({type(e).__name__}: {said})") from None
    own = model.state_dict()
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: holds a {type(state).__name__}, not a DCTransformer state dict")
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    if unexpected or missing or wrong:
        said = []
        if wrong:
            k = wrong[0]
            said.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} here)")
        if missing:
            said.append(f"{len(missing)} of the network's tensors missing")
        if unexpected:
            said.append(f"keys the network does not have ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
        raise SystemExit(f"{path}: not weights of the network these arguments build ({built}): {'; '.join(said)}. "
                         "Give the sizes it was trained with (bench/README.md names each run's)")
    model.load_state_dict(state)


def one_cycle(progress: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of a wall-clock budget: linear warm-up over the first 5%,
    then cosine to zero (OneCycleLR's outline as a function of the fraction done; beta1 stays fixed)."""
    if progress < 0.05:
        return 0.04 + 0.96 * progress / 0.05
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (progress - 0.05) / 0.95)))


class PlainEngine:
    """The Engine protocol over a torch module and AdamW with a one-cycle learning rate: torch's OneCycleLR over
    ``steps`` (the schedule of runs 1-7), or ``one_cycle`` of ``progress`` (set by the caller) when ``steps`` is
    None. ``autocast`` (bf16 on a GPU) wraps the forward only, so the loss computed from the logits stays float32."""

    def __init__(self, module: torch.nn.Module, lr: float, steps: int | None,
                 autocast: torch.dtype | None = None) -> None:
        self.module, self.lr, self.progress = module, lr, 0.0
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.sched = None
        if steps:
            self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        else:
            self.set_lr()
        device = next(module.parameters()).device.type
        self.autocast = (lambda: torch.autocast(device, dtype=autocast)) if autocast else nullcontext

    def set_lr(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr * one_cycle(self.progress)

    def __call__(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        else:
            self.set_lr()


def psnr_each(a: np.ndarray, b: np.ndarray, luma: bool = False) -> np.ndarray:
    """PSNR in dB of every image (RGB, or luma Y = .299R + .587G + .114B)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if luma:
        a, b = a @ LUMA_WEIGHTS, b @ LUMA_WEIGHTS
    mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def psnr(a: np.ndarray, b: np.ndarray, luma: bool = False) -> float:
    """Mean over images of the PSNR in dB."""
    return float(np.mean(psnr_each(a, b, luma)))


def paired(model: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Per-image PSNR differences: mean, its standard error, and the share of images where the model wins."""
    d = model - baseline
    return {"mean_gain_db": float(d.mean()), "gain_stderr_db": float(d.std(ddof=1) / np.sqrt(len(d))),
            "images_won": float((d > 0).mean())}


def scene_stats(images: np.ndarray) -> tuple[Counter, Counter]:
    objs = [analyse_scene(im) for im in images]
    return Counter(len(o) for o in objs), Counter(o["colour"] for ob in objs for o in ob)


def share(counts: Counter) -> dict[str, float]:
    """Each key's fraction of the total (an empty counter gives no keys)."""
    total = max(sum(counts.values()), 1)
    return {k: v / total for k, v in sorted(counts.items())}


def tv(a: Counter, b: Counter) -> float:
    sa, sb = share(a), share(b)
    return 0.5 * sum(abs(sa.get(k, 0.0) - sb.get(k, 0.0)) for k in set(sa) | set(sb))


def counter_stats(counts: np.ndarray, colours: np.ndarray) -> tuple[Counter, Counter]:
    """Histograms of total counts and of objects per colour from the scene counter's per-image predictions."""
    return Counter(counts.tolist()), Counter({c: int(colours[:, i].sum()) for i, c in enumerate(COLOURS)})


def rounded_share(counts: Counter) -> str:
    return json.dumps({k: round(v, 3) for k, v in share(counts).items()})


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_strip(images: np.ndarray, name: str) -> None:
    Image.fromarray(np.concatenate(list(images[:16]), axis=1)).save(os.path.join(OUT, name))


def scene_source(seed: int, n: int) -> ShapesSource:
    """The bench's scenes: 32x32, 2-4 objects (seed 0 trains, seed 1 is held out)."""
    return ShapesSource(ShapesConfig(num_samples=n, resolution=32, seed=seed, max_objects=4))


def scenes(seed: int, start: int, stop: int, codec: DCTCodecConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scenes start..stop-1 of ``seed`` and their codec sequences."""
    src = scene_source(seed, stop)
    rgb = np.stack([src.sample(i).image for i in range(start, stop)])
    return rgb, dct_codec.encode(list(rgb), codec)


def scenes_parallel(seed: int, n: int, codec: DCTCodecConfig, workers: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``scenes`` in ``workers`` processes (sample i depends on (seed, i) alone, so the split changes nothing)."""
    if workers <= 1 or n < 1000:
        return scenes(seed, 0, n, codec)
    edges = np.linspace(0, n, workers + 1).astype(int)
    with Pool(workers) as pool:
        parts = pool.starmap(scenes, [(seed, int(a), int(b), codec) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]


class Experiment:
    """Data, family construction, training and scoring shared by every model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.speed: dict[str, dict[str, float]] = {}
        self.codec = DCTCodecConfig(resolution=32, quality=args.quality, value_range=256)
        self.info = {"codec": {"name": "dct", "settings": self.codec.to_dict()},
                     "source": {"name": "shapes", "settings": {"num_samples": args.eval, "resolution": 32,
                                                               "seed": 1, "max_objects": 4}}}
        n_train = 1 if args.eval_only else args.train  # rescoring needs no training scenes
        self.train_rgb, self.train_tok = scenes_parallel(0, n_train, self.codec, args.workers)
        self.held_rgb, self.held_tok = scenes_parallel(1, args.eval, self.codec, args.workers)
        print(f"[quality] q={args.quality}: {args.train} train / {args.eval} held-out scenes, "
              f"{np.mean([len(t) for t in self.train_tok]):.1f} / {np.mean([len(t) for t in self.held_tok]):.1f} "
              "triples per image", flush=True)

    def family(self, name: str) -> DCTransformerFamily:
        a = self.args
        cfg = DCTransformerConfig(chunk_size=a.chunk, encoder=TransformerConfig(n_layer=a.layers, n_head=a.heads,
                                                                                 d_model=a.d_model),
                                  decoders=DecoderSizes(a.layers, a.layers, a.layers), **MODELS[name])
        return DCTransformerFamily(cfg, self.info)

    def batches(self, fam: DCTransformerFamily, tokens: list[np.ndarray], rgb: np.ndarray) -> dict[str, torch.Tensor]:
        """Every sequence's collated form once (targets, conditioning), to be sliced per step."""
        seqs = [torch.from_numpy(t.astype(np.int64)) for t in tokens]
        full = fam.conditioning(seqs, None, rgb)
        full["valid"] = torch.ones(len(seqs), dtype=torch.bool)
        return full

    def take(self, full: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(idx).to(next(iter(full.values())).device)
        out = {k: v[t] for k, v in full.items()}
        out["tokens"] = out["tokens"][:, : int(out["lengths"].max())]
        return {k: v.to(self.device) for k, v in out.items()}

    def step_flops(self, fam: DCTransformerFamily, engine: PlainEngine, batch: dict[str, torch.Tensor]) -> int:
        """Floating-point operations of one training step (forward + backward, matrix products and attention),
        counted by running it under FlopCounterMode; weights, optimiser and schedule are restored afterwards."""
        state = {k: v.clone() for k, v in engine.module.state_dict().items()}
        opt_state = engine.opt.state_dict()
        sched_state = engine.sched.state_dict() if engine.sched is not None else None
        counter = FlopCounterMode(display=False)
        with counter:
            fam.train_step({"model": engine}, batch, StepContext(0, 0, 1, self.device, torch.float32))
        engine.module.load_state_dict(state)
        engine.opt.load_state_dict(opt_state)
        if sched_state is not None:
            engine.sched.load_state_dict(sched_state)
        return counter.get_total_flops()

    def train(self, name: str) -> tuple[DCTransformerFamily, torch.nn.Module]:
        a = self.args
        fam = self.family(name)
        torch.manual_seed(0)
        model = fam.build_modules()["model"].to(self.device)
        path = os.path.join(OUT, f"{a.tag}{name}.pt")
        if a.eval_only:
            load_weights(model, path, a)
            return fam, model.eval()
        if a.init:
            load_weights(model, os.path.join(OUT, f"{a.init}{name}.pt"), a)
            print(f"[quality] {name}: continuing from {a.init}{name}.pt (fresh optimiser and schedule)", flush=True)
        full = {k: v.to(self.device) for k, v in self.batches(fam, self.train_tok, self.train_rgb).items()}
        budget = a.minutes * 60
        engine = PlainEngine(model, a.lr, None if budget else a.steps, torch.bfloat16 if a.amp == "bf16" else None)
        rng = np.random.default_rng(0)
        flops = self.step_flops(fam, engine, self.take(full, np.arange(a.batch)))
        t0, ema, step, triples = time.perf_counter(), None, 0, 0
        while (step < a.steps) if not budget else (time.perf_counter() - t0 < budget):
            elapsed = time.perf_counter() - t0
            engine.progress = elapsed / budget if budget else 0.0
            b = self.take(full, rng.choice(a.train, a.batch, replace=False))
            m = fam.train_step({"model": engine}, b, StepContext(step, 0, 1, self.device, torch.float32))
            triples += int(torch.clamp(b["lengths"] - fam.random_starts(b["lengths"], 1_000_003 * step),
                                       max=fam.config.chunk_size).sum())
            ema = m["bits_per_triple"] if ema is None else 0.98 * ema + 0.02 * m["bits_per_triple"]
            if step % 200 == 0:
                left = budget - elapsed if budget else (a.steps - step) * elapsed / max(step, 1)
                print(f"[quality] {name} step {step} bits/triple (ema) {ema:.3f} ({elapsed:.0f}s, "
                      f"{step / max(elapsed, 1e-9):.1f} steps/s, ETA {left:.0f}s)", flush=True)
            step += 1
        seconds = time.perf_counter() - t0
        self.speed[name] = {"train_steps": step, "train_steps_per_s": step / seconds,
                            "train_triples_per_s": triples / seconds,
                            "train_tflops_per_s": flops * step / seconds / 1e12}
        if a.peak_tflops:
            self.speed[name]["train_mfu"] = self.speed[name]["train_tflops_per_s"] / a.peak_tflops
        print(f"[quality] {name}: {step} steps in {seconds:.0f}s, {json.dumps(self.speed[name])}", flush=True)
        torch.save(model.state_dict(), path)
        return fam, model.eval()

    def bits(self, fam: DCTransformerFamily, model: torch.nn.Module, tokens: list[np.ndarray], rgb: np.ndarray
             ) -> tuple[float, float]:
        """Exact bits per image and per triple of ``tokens`` under ``model``."""
        full = self.batches(fam, tokens, rgb)
        nats, triples = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(tokens), 32):
                b = self.take(full, np.arange(i, min(i + 32, len(tokens))))
                nats += float(fam.sequence_nll(model, b).sum())
                triples += float(b["lengths"].sum())
        bits = nats / np.log(2)
        return bits / len(tokens), bits / triples

    def fresh_data(self, n: int, seed: int = 4) -> np.ndarray:
        """``n`` new scenes (seed 4 and up: no other set uses them) through the codec: what a perfect model's ``n``
        samples look like. Their distance to the held-out scenes is the floor for the samples' distance at these
        sizes (bench/dctransformer_floor.py: its spread over seeds); the halves floor compares two sets of eval/2
        and so sits higher."""
        _, tokens = scenes_parallel(seed, n, self.codec, self.args.workers)
        return dct_codec.decode(tokens, self.codec)

    def counter_scores(self, name: str, samples: np.ndarray, held_codec: np.ndarray) -> dict[str, float | str]:
        """The scene counter's histograms of the samples against its histograms of the held-out scenes through the
        codec (halves: its sampling floor), and its own error: accuracy on its validation scenes and the distance
        between its held-out histograms and the held-out scenes' true ones."""
        counter, validation = load_or_train(self.args.quality)
        s_count, s_col = counter_stats(*counter.predict(samples))
        half = len(held_codec) // 2
        h1, h2 = (counter_stats(*counter.predict(held_codec[sl])) for sl in (slice(0, half), slice(half, None)))
        h_count, h_col = h1[0] + h2[0], h1[1] + h2[1]
        src = scene_source(1, len(held_codec))
        objs = [src.sample(i).attributes["objects"] for i in range(len(held_codec))]
        t_count, t_col = Counter(len(o) for o in objs), Counter(ob["colour"] for o in objs for ob in o)
        return {f"{name}_counter_count_hist": json.dumps(dict(sorted(s_count.items()))),
                "data_counter_count_hist": json.dumps(dict(sorted(h_count.items()))),
                f"{name}_counter_colour_share": rounded_share(s_col),
                f"{name}_counter_count_tv": tv(s_count, h_count), f"{name}_counter_colour_tv": tv(s_col, h_col),
                f"{name}_counter_mean_count": float(sum(k * v for k, v in s_count.items()) / len(samples)),
                "counter_halves_count_tv": tv(h1[0], h2[0]), "counter_halves_colour_tv": tv(h1[1], h2[1]),
                "counter_bias_count_tv": tv(h_count, t_count), "counter_bias_colour_tv": tv(h_col, t_col),
                **{f"counter_validation_{k}": v for k, v in validation.items()}}

    def score(self, name: str, fam: DCTransformerFamily, model: torch.nn.Module) -> dict[str, float | str]:
        a = self.args
        out: dict[str, float | str] = {}
        out[f"{name}_bits_per_image"], out[f"{name}_bits_per_triple"] = self.bits(fam, model, self.held_tok,
                                                                                  self.held_rgb)
        gen = torch.Generator(self.device).manual_seed(0)
        if fam.config.mode == "unconditional":
            seq, cond = fam.sample_tokens(model, a.samples, gen, temperature=a.sample_temperature,
                                          top_k=a.sample_top_k, top_p=a.sample_top_p,
                                          value_temperature=a.sample_value_temperature,
                                          value_top_p=a.sample_value_top_p)
            imgs = fam.tokens_to_rgb(seq, cond)
            drawn = [s[s[:, 0] != fam.space.c_pad] for s in seq.cpu().numpy()]
            # Sampler consistency: at temperature 1 the samples' bits under the model estimate its entropy, which
            # a calibrated model keeps near the held-out bits; a far larger figure means sampling != training.
            out[f"{name}_sample_bits_per_image"] = self.bits(fam, model, drawn, imgs)[0]
            out[f"{name}_sample_mean_triples"] = float(np.mean([len(s) for s in drawn]))
            out["data_mean_triples"] = float(np.mean([len(t) for t in self.held_tok]))
            save_strip(imgs, f"{a.tag}{name}_samples.png")
            save_grid(torch.from_numpy(imgs[:64]).permute(0, 3, 1, 2).float() / 255,
                      os.path.join(OUT, f"{a.tag}{name}_samples_grid.png"), nrow=8)
            s_count, s_col = scene_stats(imgs)
            r_count, r_col = scene_stats(self.held_rgb)
            held_codec, half = dct_codec.decode(self.held_tok, self.codec), a.eval // 2
            h1, h2 = scene_stats(held_codec[:half]), scene_stats(held_codec[half:])
            d_count, d_col = h1[0] + h2[0], h1[1] + h2[1]
            out.update({f"{name}_count_hist": json.dumps(dict(sorted(s_count.items()))),
                        "data_codec_count_hist": json.dumps(dict(sorted(d_count.items()))),
                        "data_raw_count_hist": json.dumps(dict(sorted(r_count.items()))),
                        f"{name}_colour_share": rounded_share(s_col), "data_codec_colour_share": rounded_share(d_col),
                        f"{name}_count_tv_vs_codec_data": tv(s_count, d_count),
                        f"{name}_count_tv_vs_raw_data": tv(s_count, r_count),
                        f"{name}_colour_tv_vs_codec_data": tv(s_col, d_col),
                        f"{name}_colour_tv_vs_raw_data": tv(s_col, r_col),
                        f"{name}_mean_count": sum(k * v for k, v in s_count.items()) / a.samples,
                        "data_codec_mean_count": sum(k * v for k, v in d_count.items()) / a.eval,
                        "held_out_halves_count_tv": tv(h1[0], h2[0]), "held_out_halves_colour_tv": tv(h1[1], h2[1])})
            np.savez_compressed(os.path.join(OUT, f"{a.tag}{name}_samples.npz"), images=imgs)
            fresh = self.fresh_data(a.samples)
            f_count, f_col = scene_stats(fresh)
            out.update({"fresh_data_count_tv": tv(f_count, d_count), "fresh_data_colour_tv": tv(f_col, d_col)})
            if a.counter:
                out.update(self.counter_scores(name, imgs, held_codec))
                out.update({k.replace(f"{name}_", "fresh_data_", 1): v
                            for k, v in self.counter_scores(name, fresh, held_codec).items()
                            if k in (f"{name}_counter_count_tv", f"{name}_counter_colour_tv")})
            return out
        n = min(a.conditional, a.eval)
        truth = self.held_rgb[:n]
        given = fam.low_resolution(truth) if fam.config.mode == "superres" else truth  # as trained: originals'
        imgs = to_uint8(fam.sample_images({"model": model}, n, gen, images=given, temperature=a.cond_temperature,
                                          mean_of=a.cond_samples))
        save_strip(np.concatenate([truth[:8], imgs[:8]]), f"{a.tag}{name}_samples.png")
        ceiling = dct_codec.decode(self.held_tok[:n], self.codec)
        out[f"{name}_psnr"], out["codec_ceiling_psnr"] = psnr(imgs, truth), psnr(ceiling, truth)
        if name == "colourise":
            luma = [t[(CHANNEL_SLOT[np.minimum(t[:, 0], 383)] < NUM_LUMA_SLOTS) | (t[:, 0] >= 384)]
                    for t in self.held_tok[:n]]
            grey = dct_codec.decode(luma, self.codec)
            out["grey_chroma_psnr"] = psnr(grey, truth)
            out.update({f"vs_grey_{k}": v for k, v in paired(psnr_each(imgs, truth), psnr_each(grey, truth)).items()})
        else:
            small = truth.reshape(n, 16, 2, 16, 2, 3).astype(np.float32).mean(axis=(2, 4))
            small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
            bicubic = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in small])
            hint = dct_codec.decode(dct_codec.encode(list(bicubic), self.codec), self.codec)
            out.update({"bicubic_psnr": psnr(bicubic, truth), "bicubic_psnr_y": psnr(bicubic, truth, True),
                        "superres_psnr_y": psnr(imgs, truth, True), "hint_through_codec_psnr": psnr(hint, truth),
                        "hint_through_codec_psnr_y": psnr(hint, truth, True),
                        "codec_ceiling_psnr_y": psnr(ceiling, truth, True)})
            out.update({f"vs_bicubic_y_{k}": v for k, v in
                        paired(psnr_each(imgs, truth, True), psnr_each(bicubic, truth, True)).items()})
        return out


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Counts, sizes and model names checked before minutes of scene generation, as one usage line each."""
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models {a.models}: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    for name in ("steps", "batch", "chunk", "d_model", "layers", "heads", "train", "samples", "conditional",
                 "cond_samples", "workers"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if a.eval < 2:
        p.error(f"--eval {a.eval}: at least 2 held-out scenes (its two halves give the noise floor)")
    if a.d_model % a.heads:
        p.error(f"--d-model {a.d_model} --heads {a.heads}: the width must be a multiple of the heads")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality {a.quality}: JPEG quality runs from 1 to 100")
    if not a.eval_only and a.batch > a.train:
        p.error(f"--batch {a.batch} --train {a.train}: a batch is drawn from the training scenes without "
                "replacement, so it cannot be larger than --train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="unconditional,no_context,colourise,superres")
    p.add_argument("--quality", type=int, default=90, help="codec quality of every sequence")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="encoder and each decoder")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--conditional", type=int, default=64, help="held-out images scored by PSNR")
    p.add_argument("--sample-temperature", type=float, default=1.0)
    p.add_argument("--sample-top-k", type=int, default=0, help="unconditional draws: keep the k likeliest (0: all)")
    p.add_argument("--sample-top-p", type=float, default=1.0, help="unconditional draws: nucleus mass (1: all)")
    p.add_argument("--sample-value-temperature", type=float, default=None,
                   help="unconditional draws: the value decoder's temperature (default: --sample-temperature)")
    p.add_argument("--sample-value-top-p", type=float, default=None,
                   help="unconditional draws: the value decoder's nucleus mass (default: --sample-top-p)")
    p.add_argument("--cond-temperature", type=float, default=0.0, help="0: argmax")
    p.add_argument("--cond-samples", type=int, default=1,
                   help="> 1: the conditional output is the pixel mean of this many draws (a posterior-mean estimate)")
    p.add_argument("--counter", action="store_true",
                   help="also score unconditional samples with the scene counter (bench/scene_counter.py, a CNN)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device to train and sample on (cuda on a lent GPU)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast of the forward pass")
    p.add_argument("--minutes", type=float, default=0.0, help="> 0: train for this wall-clock time, not --steps")
    p.add_argument("--workers", type=int, default=1, help="processes generating and encoding the scenes")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak rate for --amp's dtype: > 0 adds model FLOPs utilisation")
    p.add_argument("--tag", default="", metavar="PREFIX",
                   help="names this run's weights and sample strips runs/dct_quality/<PREFIX><model>.*")
    p.add_argument("--init", default="", metavar="PREFIX",
                   help="continue training from runs/dct_quality/<PREFIX><model>.pt (the weights of an earlier run)")
    args = p.parse_args()
    check_args(p, args)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    exp = Experiment(args)
    result: dict = {k: v for k, v in vars(args).items()}
    for name in args.models.split(","):
        t = time.perf_counter()
        fam, model = exp.train(name)
        result[f"{name}_train_s"] = time.perf_counter() - t
        result.update({f"{name}_{k}": v for k, v in exp.speed.get(name, {}).items()})
        result.update(exp.score(name, fam, model))
        print(f"[quality] {name}: {json.dumps({k: v for k, v in result.items() if k.startswith(name)})}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
