"""The GAN experiments of the specs, on plain torch in one process (the family's own ``train_step``).

    python -m trainer.gan.experiments regimes     [--iters N] [--every N] [--seed S]   # duality gap, 3 regimes
    python -m trainer.gan.experiments gap_knobs   [--updates N] [--grid LAM:K ...]     # DG^lambda vs lambda, k
    python -m trainer.gan.experiments self_label  [--steps N] [--layout ring|grid]      # 0 / 10 / 100 % labels
    python -m trainer.gan.experiments digits      [--steps N] [--seeds S ...]           # Frechet distances

Each prints progress lines (stderr) and, last, one JSON object with every number (stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy import stats

from data_pipeline.sources.digits import DigitsConfig, DigitsSource
from data_pipeline.sources.mixtures import MixtureConfig, MixtureSource
from trainer.duality_gap import GapConfig, duality_gaps
from trainer.families.base import OptimConfig
from trainer.families.slsa_gan import SLSAGanConfig, SLSAGanFamily
from trainer.gan import metrics
from trainer.gan.plain import InMemoryData, plain_engines, train_plain

GAN_OPTIM = OptimConfig(lr=5e-4, weight_decay=0.0, beta1=0.5, beta2=0.999)
REGIMES = {"1:1": (1, 1), "15D:1G": (15, 1), "1D:15G": (1, 15)}


@dataclass
class RegimeSettings:
    """The setup the three update-ratio regimes share; only the D:G update ratio differs between them.

    Defaults: the spec's (ring radius 2, std 0.02, MLPs 2 x 128, batch 128, Adam beta1 0.5, hinge loss) except
    ``latent_dim`` 8 instead of 100 and ``lr`` 1e-3 instead of 5e-4: with the spec's values the 1:1 run was still at
    6 / 8 modes after 40,000 updates; with these it covers all 8 modes within 10,000 (tuning runs in docs/gan.md).
    Spectral norm on D, a smaller learning rate, a 2-d latent and the BCE loss were tried and were slower."""

    std: float = 0.02
    latent_dim: int = 8
    hidden: int = 128
    layers: int = 2
    loss: str = "hinge"
    spectral_norm: bool = False
    lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 128
    decay_start: float = 0.6      # share of the run's updates after which the learning rates decay linearly ...
    decay_to: float = 0.05        # ... to this fraction at the end (1.0: constant; at 1e-3 the 1:1 run oscillates)

    def lr_factor(self, progress: float) -> float:
        """Learning-rate multiplier at ``progress`` (0 .. 1) of the run."""
        if progress <= self.decay_start:
            return 1.0
        return 1.0 - (1.0 - self.decay_to) * min(1.0, (progress - self.decay_start) / (1.0 - self.decay_start))

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, weight_decay=0.0, beta1=self.beta1, beta2=self.beta2)

    def model(self, mode: str, d_steps: int, g_steps: int, seed: int) -> SLSAGanConfig:
        return SLSAGanConfig(mode=mode, loss=self.loss, d_steps=d_steps, g_steps=g_steps, seed=seed,
                             latent_dim=self.latent_dim, hidden=self.hidden, layers=self.layers,
                             d_spectral_norm=self.spectral_norm)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def mixture_data(cfg: MixtureConfig) -> tuple[InMemoryData, dict[str, Any], MixtureSource]:
    src = MixtureSource(cfg)
    samples = [{"point": s.point, "label": s.label, "key": s.key} for s in map(src.sample, range(len(src)))]
    info = {"codec": {"name": "points"}, "image_shape": [2], "source": {"name": "mixture", "settings": src.settings()}}
    return InMemoryData(samples), info, src


def digits_data(split: str) -> tuple[InMemoryData, dict[str, Any]]:
    src = DigitsSource(DigitsConfig(split=split, holdout_fraction=0.2))
    samples = []
    for i in range(len(src)):
        s = src.sample(i)
        samples.append({"image": s.image, "label": s.label, "key": s.key})
    return InMemoryData(samples), {"codec": {"name": "image"}, "image_shape": [8, 8, 1], "source": {"name": "digits"}}


def modules_of(engines: dict[str, Any]) -> dict[str, torch.nn.Module]:
    return {k: e.module for k, e in engines.items()}


def mixture_report(family: SLSAGanFamily, modules: dict[str, torch.nn.Module], mixture: Any, n: int = 5000,
                   held_out: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Ground truth for a 2-D GAN: JSD to the mixture, modes covered, high-quality share, label accuracy."""
    x, _ = family.generate(modules, n, torch.Generator().manual_seed(4242))
    pts = x.numpy()
    q = metrics.mixture_quality(pts, mixture)
    out = {"jsd": metrics.mixture_jsd(pts, mixture), "modes_covered": q.modes_covered, "high_quality": q.high_quality}
    if held_out is not None and "classifier" in modules:
        with torch.no_grad():
            probs = torch.softmax(modules["classifier"](held_out["x"], use_ema=True), dim=1)
        conf, pred = probs.max(1)
        truth = held_out["label"].numpy()
        k = family.config.num_clusters
        out["label_accuracy"] = metrics.matched_accuracy(truth, pred.numpy(), mixture.num_modes, k)
        used = (conf >= family.config.confidence).numpy()
        out["confident_share"] = float(used.mean())
        out["confident_accuracy"] = (metrics.matched_accuracy(truth[used], pred.numpy()[used], mixture.num_modes, k)
                                     if used.any() else float("nan"))
    return out


def regimes(iters: int, every: int, seed: int, gap: GapConfig, mode: str, setup: RegimeSettings,
            held_out_n: int = 2048) -> dict[str, Any]:
    """The three update-ratio regimes on the 8-mode ring; gap and ground truth at every checkpoint.

    Every regime gets the same number of network updates (D + G): the 1:1 run ``iters`` loop steps, the 15:1
    runs ``iters * 2 / 16``; checkpoints every ``2 * every`` updates."""
    data, info, src = mixture_data(MixtureConfig(num_samples=20000, std=setup.std, seed=seed))
    held, _, _ = mixture_data(MixtureConfig(num_samples=held_out_n, split="holdout", std=setup.std, seed=seed))
    out: dict[str, Any] = {"iters_1to1": iters, "checkpoint_every_updates": 2 * every, "gap": asdict(gap),
                           "mode": mode, "setup": asdict(setup), "runs": {}}
    gap_keys = ("proximal", "plain", "value_gap", "proximal_lb")
    for name, (d, g) in REGIMES.items():
        family = SLSAGanFamily(setup.model(mode, d, g, seed), info)
        engines = plain_engines(family, setup.optim(), seed)
        held_batch = held.all(family)
        chunk = max(1, 2 * every // (d + g))
        groups = [(group, group["lr"]) for e in engines.values() for group in e.optimizer.param_groups]

        def schedule(step: int, _: dict[str, float], d: int = d, g: int = g, groups: list = groups) -> None:
            factor = setup.lr_factor(step * (d + g) / (2 * iters))
            for group, base in groups:
                group["lr"] = base * factor

        rows, done, start = [], 0, time.monotonic()
        while done * (d + g) < 2 * iters:
            train_plain(family, engines, data, chunk, setup.batch_size, seed=seed * 100003 + done, first_step=done,
                        callback=schedule)
            done += chunk
            mods = modules_of(engines)
            res = duality_gaps(mods["generator"], mods["discriminator"], family.gap_game(mods, held_batch), gap)
            row = {"updates": done * (d + g), **mixture_report(family, mods, src.mixture),
                   **{k: getattr(res, k) for k in (*gap_keys, "m1", "m2", "m2_plain", "seconds")}}
            rows.append(row)
            say(f"[{name}] updates {row['updates']}: DG^l {res.proximal:.4f} DG {res.plain:.4f} "
                f"M1-V* {res.value_gap:.4f} JSD {row['jsd']:.3f} modes {row['modes_covered']} "
                f"HQ {row['high_quality']:.2f} ({time.monotonic() - start:.0f}s)")
        out["runs"][name] = rows
    everything = [r for rows in out["runs"].values() for r in rows]
    jsd = np.array([r["jsd"] for r in everything])
    out["correlation_with_jsd"] = {"points": len(everything)}
    for key in gap_keys:
        values = np.array([r[key] for r in everything])
        out["correlation_with_jsd"][key] = {"pearson": float(stats.pearsonr(values, jsd)[0]),
                                            "spearman": float(stats.spearmanr(values, jsd)[0])}
    out["final"] = {name: {k: rows[-1][k] for k in (*gap_keys, "jsd", "modes_covered", "high_quality")}
                    for name, rows in out["runs"].items()}
    out["last3_mean"] = {name: {k: float(np.mean([r[k] for r in rows[-3:]])) for k in (*gap_keys, "jsd")}
                         for name, rows in out["runs"].items()}
    return out


def gap_knobs(updates: int, seed: int, grid: list[tuple[float, int, float]], setup: RegimeSettings,
              names: tuple[str, ...] = ("15D:1G", "1:1"), held_out_n: int = 2048) -> dict[str, Any]:
    """The paper's |M1 - M2| at one checkpoint of each regime over a grid of its knobs (lambda, k, G epochs of the
    G' search): can they make it read high at the collapse while it stays low on the converging run? Constant
    learning rate (no decay), so the 1:1 checkpoint is not the regimes run's."""
    data, info, src = mixture_data(MixtureConfig(num_samples=20000, std=setup.std, seed=seed))
    held, _, _ = mixture_data(MixtureConfig(num_samples=held_out_n, split="holdout", std=setup.std, seed=seed))
    out: dict[str, Any] = {"updates": updates, "setup": asdict(setup), "runs": {}}
    for name in names:
        d, g = REGIMES[name]
        family = SLSAGanFamily(setup.model("unconditional", d, g, seed), info)
        engines = plain_engines(family, setup.optim(), seed)
        train_plain(family, engines, data, max(1, updates // (d + g)), setup.batch_size, seed=seed * 100003)
        mods = modules_of(engines)
        game = family.gap_game(mods, held.all(family))
        rows = []
        for lam, k, g_epochs in grid:
            res = duality_gaps(mods["generator"], mods["discriminator"], game,
                               GapConfig(lam=lam, k=k, d_epochs=8, g_epochs=g_epochs))
            rows.append({"lam": lam, "k": k, "g_epochs": g_epochs, **{key: getattr(res, key) for key in (
                "m1", "m2", "proximal", "proximal_signed", "plain", "value_gap", "seconds")}})
            say(f"[{name}] lambda {lam} k {k} G epochs {g_epochs}: |M1-M2| {res.proximal:.3f} (M1 {res.m1:.3f} M2 {res.m2:.3f}) "
                f"plain {res.plain:.3f} M1-V* {res.value_gap:.3f} ({res.seconds:.0f}s)")
        out["runs"][name] = {"truth": mixture_report(family, mods, src.mixture), "gaps": rows}
    return out


def self_label(steps: int, layout: str, seed: int, fractions: tuple[float, ...], every: int,
               confidence: float) -> dict[str, Any]:
    """Self-labelling on a mixture at several manual-label fractions (plus the unconditional reference)."""
    modes, std = (8, 0.02) if layout == "ring" else (25, 0.05)
    mix = MixtureConfig(layout=layout, modes=modes, std=std, num_samples=20000, seed=seed)
    data, info, src = mixture_data(mix)
    held, _, _ = mixture_data(replace(mix, num_samples=2000, split="holdout"))
    runs: dict[str, Any] = {}
    settings = [("unconditional", "unconditional", 0.0)] + [
        (f"self_labelled_{round(100 * f)}%", "self_labelled", f) for f in fractions]
    for name, mode, frac in settings:
        family = SLSAGanFamily(SLSAGanConfig(mode=mode, num_clusters=modes, label_fraction=frac, seed=seed,
                                             confidence=confidence), info)
        engines = plain_engines(family, GAN_OPTIM, seed)
        held_batch = held.all(family)
        curve, done, start = [], 0, time.monotonic()
        while done < steps:
            n = min(every, steps - done)
            train_plain(family, engines, data, n, 128, seed=seed * 100003 + done, first_step=done)
            done += n
            row = {"step": done, **mixture_report(family, modules_of(engines), src.mixture, held_out=held_batch)}
            curve.append(row)
            say(f"[{layout} {name}] step {done}: " + " ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k != "step") + f" ({time.monotonic() - start:.0f}s)")
        runs[name] = {"final": curve[-1], "curve": curve}
    return {"layout": layout, "modes": modes, "steps": steps, "confidence": confidence, "runs": runs}


def digits(steps: int, seeds: tuple[int, ...], every: int, fraction: float) -> dict[str, Any]:
    """Unconditional vs self-labelled vs class-conditional on the 8x8 digits: Frechet distance (FD) between
    held-out digits and samples, on features of a classifier trained here on the training split."""
    train, info = digits_data("train")
    held, _ = digits_data("holdout")
    probe = SLSAGanFamily(SLSAGanConfig(mode="unconditional", num_clusters=10), info)
    train_all, held_all = train.all(probe), held.all(probe)
    net = metrics.train_digits_features(train_all["x"], train_all["label"])
    real_feats = net.features(held_all["x"])
    out: dict[str, Any] = {"feature_net_holdout_accuracy": metrics.classifier_accuracy(net, held_all["x"],
                                                                                       held_all["label"]),
                           "fd_train_vs_holdout": metrics.frechet_distance(net.features(train_all["x"]), real_feats),
                           "steps": steps, "runs": {}}
    settings = [("unconditional", "unconditional", 0.0), ("self_labelled", "self_labelled", fraction),
                ("conditional", "conditional", 1.0)]
    for name, mode, frac in settings:
        per_seed = []
        for seed in seeds:
            family = SLSAGanFamily(SLSAGanConfig(mode=mode, arch="conv", latent_dim=32, num_clusters=10, hidden=64,
                                                 label_fraction=frac, seed=seed), info)
            engines = plain_engines(family, GAN_OPTIM, seed)
            curve, done, start = [], 0, time.monotonic()
            while done < steps:
                n = min(every, steps - done)
                train_plain(family, engines, train, n, 64, seed=seed * 100003 + done, first_step=done)
                done += n
                x, _ = family.generate(modules_of(engines), 2000, torch.Generator().manual_seed(99))
                row = {"step": done, "fd": metrics.frechet_distance(net.features(x), real_feats)}
                if "classifier" in engines:
                    with torch.no_grad():
                        pred = engines["classifier"].module(held_all["x"], use_ema=True).argmax(1)
                    row["label_accuracy"] = metrics.matched_accuracy(held_all["label"].numpy(), pred.numpy(), 10, 10)
                curve.append(row)
                say(f"[digits {name} seed {seed}] step {done}: " + " ".join(
                    f"{k} {v:.3f}" for k, v in row.items() if k != "step") + f" ({time.monotonic() - start:.0f}s)")
            per_seed.append({"seed": seed, "final": curve[-1], "curve": curve})
        fds = [r["final"]["fd"] for r in per_seed]
        out["runs"][name] = {"fd_mean": float(np.mean(fds)), "fd_per_seed": fds, "seeds": per_seed}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.gan.experiments", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("regimes")
    p.add_argument("--iters", type=int, default=8000, help="loop steps of the 1:1 run")
    p.add_argument("--every", type=int, default=1000, help="1:1 loop steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="unconditional")
    defaults = RegimeSettings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=value,
                           help=f"shared setup (default {value})")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"shared setup (default {value})")
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--gap-epochs", type=float, nargs=2, default=(8.0, 2.0), help="D epochs (M1), G epochs (M2)")
    p = sub.add_parser("gap_knobs")
    p.add_argument("--updates", type=int, default=10000, help="network updates of each regime before the check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", nargs="+", default=["0.01:15", "0.01:60", "1:15", "10:15", "100:15", "0.01:15:20",
                                                 "10:15:20"], help="lambda:k[:G epochs] (G epochs default 2)")
    p.add_argument("--regimes", nargs="+", default=["15D:1G", "1:1"], choices=list(REGIMES))
    p = sub.add_parser("self_label")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--layout", default="ring", choices=("ring", "grid"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--fractions", type=float, nargs="+", default=(0.0, 0.1, 1.0))
    p = sub.add_parser("digits")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1))
    p.add_argument("--fraction", type=float, default=0.0, help="manual labels of the self-labelled run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    if args.what == "regimes":
        gap = GapConfig(lam=args.lam, k=args.k, d_epochs=args.gap_epochs[0], g_epochs=args.gap_epochs[1])
        setup = RegimeSettings(**{name: getattr(args, name) for name in asdict(RegimeSettings())})
        result = regimes(args.iters, args.every, args.seed, gap, args.mode, setup)
    elif args.what == "gap_knobs":
        try:
            grid = [(float(f[0]), int(f[1]), float(f[2]) if len(f) > 2 else 2.0)
                    for f in (item.split(":") for item in args.grid)]
        except (ValueError, IndexError):
            parser.error(f"gap_knobs --grid takes lambda:k[:G epochs] such as 0.01:15 or 10:15:20, got {args.grid}")
        result = gap_knobs(args.updates, args.seed, grid, RegimeSettings(), tuple(args.regimes))
    elif args.what == "self_label":
        result = self_label(args.steps, args.layout, args.seed, tuple(args.fractions), args.every, args.confidence)
    else:
        result = digits(args.steps, tuple(args.seeds), args.every, args.fraction)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
