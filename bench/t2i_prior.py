"""Text-to-image prior benchmarks: training tokens/s with ZeRO-3 against ZeRO-2 at the same batch on 2 ranks, peak
memory per rank against the spine's estimate, and sampling images/s with and without the KV cache.

    .venv/bin/python bench/t2i_prior.py [--steps 30] [--data runs/t2i/tokens/train] [--samples 16] [--set K=V ...]

Training: `dgm train` machinery (embedded Ray, 2 workers, DeepSpeed, fp32, gloo) on configs/t2i_prior.yaml (ZeRO-3)
and configs/t2i_prior_zero2.yaml (ZeRO-2), same data, batch and model; each run in its own process (fresh Ray worker
processes, so their peak RSS belongs to that run). tokens/s = steps/s x global batch x (text_len + h*w) predicted
tokens per sample; steps/s is rank 0's rate from its second step on. Memory: while a run trains, the driver polls
every rank's /proc/<pid>/status (pids from <run_dir>/workers/): VmHWM (peak RSS) and the RSS when the rank started
(after imports, before the engines), against sharding.zero.estimate_memory (the model-state figure the spine prints;
activations, buffers and the Python/torch runtime come on top).
Data: the token shards at --data when they exist, else synthetic ones (shape scenes tokenised in-process with a
random-init dVAE and a fresh caption tokenizer: the same shapes and vocabularies, meaningless codes).
Sampling: ``--samples`` images for one prompt (caption ids, 64 image tokens each, dVAE decode) with the KV cache and
by recomputing the prefix at every token (the reference), one thread. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

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
    run_dir = tempfile.mkdtemp(prefix=f"t2i-bench-{which}-")
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
    steps_per_s = float(summary.get("steps_per_s", 0.0))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    if steps_per_s <= 0:
        times = [r["time"] for r in records if r["split"] == "train"]
        steps_per_s = (len(times) - 1) / (times[-1] - times[0])
    per_sample = cfg.model.text_len + family.grid[0] * family.grid[1]
    batch = cfg.data.stream.global_batch
    result = {
        "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * batch * per_sample, "global_batch": batch,
        "tokens_per_sample": per_sample, "params": n_params, "ranks": cfg.cluster.workers,
        "estimate_model_states_mb": estimate.device_total / 2**20,
        "peak_rss_mb": {r: round(v, 1) for r, v in sorted(memory.peak.items())},
        "start_rss_mb": {r: round(v, 1) for r, v in sorted(memory.start_rss.items())},
        "final_train_loss": [r["loss"] for r in records if r["split"] == "train"][-1],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=os.path.join(ROOT, "runs", "t2i", "tokens", "train"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs (e.g. model.transformer.d_model=384)")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        train_one(args.one, args.data, args.steps, args.out, args.set)
        return
    import torch

    torch.set_num_threads(1)
    data, synthetic = os.path.abspath(args.data), False
    if not os.path.exists(os.path.join(data, "manifest.json")):
        data, synthetic = synthetic_data(tempfile.mkdtemp(prefix="t2i-bench-data-")), True
        print(f"[bench] no token shards at {args.data}: synthetic ones at {data}", flush=True)
    result: dict = {"data": "synthetic" if synthetic else args.data, "steps": args.steps, "overrides": args.set}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for which in ("zero2", "zero3"):
        out = tempfile.mktemp(suffix=".json")
        subprocess.run([sys.executable, __file__, "--one", which, "--data", data, "--steps", str(args.steps),
                        "--out", out, *(f"--set={o}" for o in args.set)], check=True, env=env)
        with open(out) as f:
            result[which] = json.load(f)
    z2, z3 = result["zero2"], result["zero3"]
    result["zero3_over_zero2_tokens_per_s"] = z3["tokens_per_s"] / z2["tokens_per_s"]
    result["zero3_over_zero2_peak_rss"] = max(z3["peak_rss_mb"].values()) / max(z2["peak_rss_mb"].values())
    result["same_final_loss"] = abs(z3["final_train_loss"] - z2["final_train_loss"]) < 1e-4
    result["zero3_over_zero2_estimate"] = z3["estimate_model_states_mb"] / z2["estimate_model_states_mb"]
    result.update(sampling_speed(data, args.samples, args.set))
    result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
