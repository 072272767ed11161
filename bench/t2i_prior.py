"""Text-to-image prior benchmarks: training tokens/s with ZeRO-3 against ZeRO-2 at the same batch on 2 ranks, peak
memory per rank against the spine's estimate, and sampling images/s with and without the KV cache.

    .venv/bin/python bench/t2i_prior.py [--steps 30] [--rounds 3] [--data runs/t2i/tokens/train] [--samples 16] \\
        [--set K=V ...]

Training: `dgm train` machinery (embedded Ray, 2 workers, DeepSpeed, fp32, gloo) on configs/t2i_prior.yaml (ZeRO-3)
and configs/t2i_prior_zero2.yaml (ZeRO-2), same data, batch and model; each run in its own process (fresh Ray worker
processes, so their peak RSS belongs to that run). ``--rounds`` rounds each train both, ZeRO-2 first in the first
round, then alternating, so bursts of background load on this shared machine land on both sides: the ratios are
the median of the per-round ratios (each round's figures: "per_round"). tokens/s = steps/s x global batch x
(text_len + h*w) predicted tokens per sample; steps/s is rank 0's rate from its second step on. Memory: while a
run trains, the driver polls every rank's /proc/<pid>/status (pids from <run_dir>/workers/): VmHWM (peak RSS) and
the RSS when the rank started (after imports, before the engines), against sharding.zero.estimate_memory (the
model-state figure the spine prints; activations, buffers and the Python/torch runtime come on top).
Data: the token shards at --data when they exist, else synthetic ones (shape scenes tokenised in-process with a
random-init dVAE and a fresh caption tokenizer: the same shapes and vocabularies, meaningless codes).
Sampling: ``--samples`` images for one prompt (caption ids, 64 image tokens each, dVAE decode) with the KV cache and
by recomputing the prefix at every token (the reference), one thread. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"zero3": "t2i_prior.yaml", "zero2": "t2i_prior_zero2.yaml"}


def synthetic_data(root: str) -> str:
    """Token shards (train, eval) from 512 + 64 scenes with a random-init dVAE export; returns the train URL."""
    import torch

    from data_pipeline.caption_tokenizer import CaptionTokenizer
    from data_pipeline.sources.shapes import ShapesConfig, ShapesSource
    from trainer.dalle.dvae import DVAEConfig
    from trainer.dalle.token_data import write_token_dataset
    from trainer.export import write_export
    from trainer.families.dvae import DVAEFamily

    scenes = {"resolution": 32, "min_objects": 1, "max_objects": 3}
    source = ShapesSource(ShapesConfig(num_samples=512, seed=0, **scenes))
    tokenizer = CaptionTokenizer.train([source.sample(i).caption for i in range(512)], 320)
    torch.manual_seed(0)
    dvae = DVAEFamily(DVAEConfig(num_codes=512), {"image_shape": [32, 32, 3]})
    export = write_export(os.path.join(root, "dvae"), dvae, {k: m.state_dict() for k, m in dvae.build_modules().items()})
    for split, seed, n in (("train", 0, 512), ("eval", 1, 64)):
        write_token_dataset(os.path.join(root, split), ShapesConfig(num_samples=n, seed=seed, **scenes), tokenizer,
                            export, samples_per_shard=128)
    return os.path.join(root, "train")


class RankMemory(threading.Thread):
    """Polls every rank's VmRSS / VmHWM while the run trains."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop = os.path.join(run_dir, "workers"), threading.Event()
        self.start_rss: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    @staticmethod
    def _status_mb(pid: str) -> tuple[float, float] | None:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return None
        if "VmRSS" not in fields or "VmHWM" not in fields:  # an exiting process
            return None
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def run(self) -> None:
        while not self.stop.is_set():
            if os.path.isdir(self.folder):
                for name in os.listdir(self.folder):
                    with open(os.path.join(self.folder, name)) as f:
                        pid = f.read().strip()
                    got = self._status_mb(pid)
                    if got is not None:
                        rank = name.split(".")[0]
                        self.start_rss.setdefault(rank, got[0])
                        self.peak[rank] = max(self.peak.get(rank, 0.0), got[1])
            time.sleep(0.1)


def train_one(which: str, data: str, steps: int, out: str, overrides: list[str]) -> None:
    """One training run (in its own process); writes its figures as JSON to ``out``."""
    from data_pipeline.manifest import load_manifest
    from launch.config import load_config
    from launch.train import run_training
    from sharding.zero import estimate_memory
    from trainer.families.dalle import DalleFamily
    from trainer.loop import data_info

    eval_url = os.path.join(os.path.dirname(data), "eval")
    with tempfile.TemporaryDirectory(prefix=f"t2i-bench-{which}-") as run_dir:
        cfg, raw = load_config(os.path.join(ROOT, "configs", CONFIGS[which]), [
            f"run_dir={run_dir}", f"data.train={data}", f"data.eval={eval_url if os.path.exists(eval_url) else ''}",
            f"trainer.steps={steps}", "trainer.log_every=10", f"trainer.eval_every={steps}", "trainer.eval_batches=1",
            f"trainer.sample_every={steps + 1}", f"trainer.checkpoint_every={steps + 1}",
            f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=2", *overrides])
        info = data_info(load_manifest(data))
        family = DalleFamily(cfg.model, info)
        model = family.build_modules()["model"]
        n_params = sum(p.numel() for p in model.parameters())
        estimate = estimate_memory(n_params, cfg.zero, cfg.cluster.workers, model)  # ZeRO-3 gathers its largest layer
        print(estimate.describe(f"model ({n_params:,} params, ZeRO-{cfg.zero.stage}, {cfg.zero.precision}, "
                                f"{cfg.cluster.workers} ranks)"), flush=True)
        memory = RankMemory(run_dir)
        memory.start()
        summary = run_training(cfg, raw)
        memory.stop.set()
        memory.join()
        tree = workers_tree()
        steps_per_s = float(summary.get("steps_per_s", 0.0))
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    if steps_per_s <= 0:  # the summary may come back without it: rank 0's logged step times instead
        times = [r["time"] for r in records if r["split"] == "train"]
        if len(times) < 2 or times[-1] <= times[0]:
            raise SystemExit(f"[bench] {which}: no rate (summary without steps_per_s, {len(times)} logged steps)")
        steps_per_s = (len(times) - 1) / (times[-1] - times[0])
    per_sample = cfg.model.text_len + family.grid[0] * family.grid[1]
    batch = cfg.data.stream.global_batch
    result = {
        "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * batch * per_sample, "global_batch": batch,
        "tokens_per_sample": per_sample, "params": n_params, "ranks": cfg.cluster.workers,
        "estimate_model_states_mb": estimate.device_total / 2**20,
        "peak_rss_mb": {r: round(v, 1) for r, v in sorted(memory.peak.items())},
        "start_rss_mb": {r: round(v, 1) for r, v in sorted(memory.start_rss.items())},
        "final_train_loss": [r["loss"] for r in records if r["split"] == "train"][-1], **tree,
    }
    with open(out, "w") as f:
        json.dump(result, f)


def sampling_speed(data: str, n: int, overrides: list[str]) -> dict[str, float]:
    import torch

    from data_pipeline.manifest import load_manifest
    from launch.config import load_config
    from trainer.families.dalle import DalleFamily
    from trainer.loop import data_info

    cfg, _ = load_config(os.path.join(ROOT, "configs", CONFIGS["zero3"]), overrides)
    family = DalleFamily(cfg.model, data_info(load_manifest(data)))
    torch.manual_seed(0)
    modules = {k: m.eval() for k, m in family.build_modules().items()}
    family.dvae()  # loaded once, outside the timing
    prompt = "a small red circle left of a large blue square"
    out = {}
    for name, cache in (("cached", True), ("recompute", False)):
        t = time.perf_counter()
        text = family.prompt_ids(prompt, n)
        _, image = modules["model"].generate(text, torch.Generator().manual_seed(0), use_cache=cache)
        images = family.decode_tokens(image.view(n, *family.grid))
        dt = time.perf_counter() - t
        assert images.shape[0] == n
        out[f"sampling_{name}_images_per_s"] = n / dt
        print(f"[sample] {name}: {n} images in {dt:.2f}s = {n / dt:.2f} images/s", flush=True)
    out["sampling_cache_speedup"] = out["sampling_cached_images_per_s"] / out["sampling_recompute_images_per_s"]
    return out


def train_rounds(data: str, steps: int, rounds: int, overrides: list[str], tmp: str) -> dict:
    """Both stages trained ``rounds`` times, alternating which goes first; per-round figures and median ratios."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    per_round: list[dict] = []
    for r in range(rounds):
        got = {}
        for which in ("zero2", "zero3") if r % 2 == 0 else ("zero3", "zero2"):
            out = os.path.join(tmp, f"{which}-{r}.json")
            print(f"[bench] round {r + 1}/{rounds}: {which}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", which, "--data", data, "--steps", str(steps),
                                   "--out", out, *(f"--set={o}" for o in overrides)], env=env)
            if proc.returncode:
                raise SystemExit(f"[bench] the {which} run of round {r + 1} failed (exit {proc.returncode}); "
                                 "its output is above")
            with open(out) as f:
                got[which] = json.load(f)
        z2, z3 = got["zero2"], got["zero3"]
        got["zero3_over_zero2_tokens_per_s"] = z3["tokens_per_s"] / z2["tokens_per_s"]
        got["zero3_over_zero2_peak_rss"] = max(z3["peak_rss_mb"].values()) / max(z2["peak_rss_mb"].values())
        got["first"] = "zero2" if r % 2 == 0 else "zero3"
        print(f"[bench] round {r + 1}: ZeRO-2 {z2['tokens_per_s']:.0f} tokens/s, ZeRO-3 {z3['tokens_per_s']:.0f} "
              f"({got['zero3_over_zero2_tokens_per_s']:.2f}x)", flush=True)
        per_round.append(got)
    med = statistics.median
    result: dict = {"per_round": per_round}
    for which in ("zero2", "zero3"):
        result[f"{which}_tokens_per_s_median"] = med(g[which]["tokens_per_s"] for g in per_round)
        result[f"{which}_peak_rss_mb_median"] = med(max(g[which]["peak_rss_mb"].values()) for g in per_round)
    for key in ("zero3_over_zero2_tokens_per_s", "zero3_over_zero2_peak_rss"):
        result[key] = med(g[key] for g in per_round)
        result[f"{key}_rounds"] = [round(g[key], 3) for g in per_round]
    losses = [g[w]["final_train_loss"] for g in per_round for w in ("zero2", "zero3")]
    result["same_final_loss"] = max(losses) - min(losses) < 1e-4
    first = per_round[0]
    result["zero3_over_zero2_estimate"] = (first["zero3"]["estimate_model_states_mb"]
                                           / first["zero2"]["estimate_model_states_mb"])
    result["ray_workers_run_checkout"] = all(g[w]["ray_workers_run_checkout"] for g in per_round
                                             for w in ("zero2", "zero3"))
    result["ray_workers_tree"] = first["zero2"]["ray_workers_tree"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="training runs per stage, alternating which goes first")
    parser.add_argument("--data", default=os.path.join(ROOT, "runs", "t2i", "tokens", "train"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs (e.g. model.transformer.d_model=384)")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: the rate is timed from the second step on, so it needs at least 2")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least one round (each trains both stages)")
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: at least one image to time sampling on")
    use_checkout()
    if args.one:
        train_one(args.one, args.data, args.steps, args.out, args.set)
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="t2i-bench-") as tmp:
        data, synthetic = os.path.abspath(args.data), False
        if not os.path.exists(os.path.join(data, "manifest.json")):
            data, synthetic = synthetic_data(os.path.join(tmp, "data")), True
            print(f"[bench] no token shards at {args.data}: synthetic ones at {data}", flush=True)
        result: dict = {"data": "synthetic" if synthetic else args.data, "steps": args.steps, "rounds": args.rounds,
                        "overrides": args.set}
        result.update(train_rounds(data, args.steps, args.rounds, args.set, tmp))
        result.update(sampling_speed(data, args.samples, args.set))
    result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
