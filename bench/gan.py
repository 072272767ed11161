"""GAN benchmark: one duality-gap evaluation against one training epoch of the same GAN, and GAN training
steps/s on 2 ranks against 1 rank through the real spine (Ray Train + DeepSpeed ZeRO-2, CPU).

    .venv/bin/python bench/gan.py [--steps 60] [--skip-spine]

Part 1 (one process, 1 thread, plain torch, the family's own train_step): the self-labelled GAN of
configs/gan_ring.yaml on the 8-mode ring; an epoch is 20,000 points at 128 per D update; the gap is evaluated with
configs/gan_gap_monitor.yaml's settings on 2,048 held-out points, as the monitor does for each checkpoint.
Part 2: `dgm train` of configs/gan_ring.yaml on 1 and on 2 ranks (same global batch 256), steps/s measured from
metrics.jsonl between the 10th and the last step (start-up excluded).
Last stdout line: one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def gap_vs_epoch(repeats: int) -> dict[str, float]:
    import torch

    from launch.config import load_config
    from launch.gap_monitor import load_monitor_config
    from trainer.duality_gap import duality_gaps
    from trainer.families.slsa_gan import SLSAGanFamily
    from trainer.gan.experiments import mixture_data
    from trainer.gan.plain import plain_engines, train_plain

    torch.set_num_threads(1)
    cfg, _ = load_config(os.path.join(ROOT, "configs", "gan_ring.yaml"))
    mon = load_monitor_config(os.path.join(ROOT, "configs", "gan_gap_monitor.yaml"), ["run_dir=unused"])
    from data_pipeline.sources.mixtures import MixtureConfig

    data, info, _ = mixture_data(MixtureConfig(num_samples=20000))
    held, _, _ = mixture_data(MixtureConfig(num_samples=mon.max_eval_samples, split="holdout"))
    family = SLSAGanFamily(cfg.model, info)
    engines = plain_engines(family, cfg.trainer.optim)
    steps = len(data.samples) // 128
    train_plain(family, engines, data, 20, 128)  # warm-up
    epoch_s = []
    for r in range(repeats):
        start = time.monotonic()
        train_plain(family, engines, data, steps, 128, seed=r + 1)
        epoch_s.append(time.monotonic() - start)
    modules = {k: e.module for k, e in engines.items()}
    game = family.gap_game(modules, held.all(family))
    gap_s = []
    for _ in range(repeats):
        start = time.monotonic()
        duality_gaps(modules["generator"], modules["discriminator"], game, mon.gap)
        gap_s.append(time.monotonic() - start)
    epoch, gap = min(epoch_s), min(gap_s)
    return {"epoch_s": round(epoch, 3), "epoch_steps": steps, "gap_eval_s": round(gap, 3),
            "gap_over_epoch": round(gap / epoch, 3)}


def spine_rates(steps: int) -> dict[str, object]:
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from launch.config import load_config
    from launch.train import ensure_ray, run_training

    with tempfile.TemporaryDirectory(prefix="dgm-bench-gan-") as work:
        data = {}
        for split, n in (("train", 20000), ("holdout", 2048)):
            data[split] = os.path.join(work, split)
            prepare_dataset(PrepareConfig(output=data[split], source="mixture", codec="points", samples_per_shard=1000,
                                          source_settings={"num_samples": n, "split": split}, parallel=False),
                            report=lambda _: None)
        ensure_ray("", 200)
        out: dict[str, object] = {}
        for workers in (1, 2):
            run = os.path.join(work, f"run{workers}")
            cfg, raw = load_config(os.path.join(ROOT, "configs", "gan_ring.yaml"), [
                f"run_dir={run}", f"data.train={data['train']}", f"data.eval={data['holdout']}",
                f"name=bench{workers}", f"trainer.steps={steps}", f"trainer.schedule.total_steps={steps}",
                f"trainer.eval_every={steps}", f"trainer.sample_every={steps}", f"trainer.checkpoint_every={steps}",
                f"cluster.workers={workers}", "trainer.log_every=20"])
            run_training(cfg, raw)
            times = {}
            with open(os.path.join(run, "metrics.jsonl")) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec["split"] == "train":
                        times[rec["step"]] = rec["time"]
            rate = (steps - 10) / (times[steps] - times[10])
            out[f"steps_per_s_{workers}rank"] = round(rate, 2)
            out[f"samples_per_s_{workers}rank"] = round(rate * cfg.data.stream.global_batch, 1)
    out["speedup_2_over_1"] = round(out["steps_per_s_2rank"] / out["steps_per_s_1rank"], 3)
    out.update(workers_tree())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per spine run")
    parser.add_argument("--repeats", type=int, default=2, help="epochs / gap evaluations timed (best kept)")
    parser.add_argument("--skip-spine", action="store_true")
    args = parser.parse_args()
    if args.steps <= 10 and not args.skip_spine:
        parser.error(f"--steps {args.steps}: the rate is timed from step 10 on, so it needs more than 10")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: the best of at least one epoch and one gap evaluation")
    use_checkout()
    result = {"load_avg_1min_start": round(os.getloadavg()[0], 2), **gap_vs_epoch(args.repeats)}
    print(f"[bench] one epoch {result['epoch_s']}s, one gap evaluation {result['gap_eval_s']}s", flush=True)
    if not args.skip_spine:
        result.update(spine_rates(args.steps))
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    if "ray" in sys.modules:  # Ray's workers print to this stdout asynchronously: stop it before the JSON line
        sys.modules["ray"].shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
