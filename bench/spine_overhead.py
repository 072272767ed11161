"""Framework overhead: dgm's training steps/s against a minimal hand-written loop, and time to the first step.

Both run 2 ranks on this machine with the same model (configs/digits_igpt.yaml's image GPT, the demo's until
2026-11-26), batch and DeepSpeed config (ZeRO-2, fp32). The reference is plain torch + deepspeed under torchrun: no Ray, no streaming, batches already in memory.

    .venv/bin/python bench/spine_overhead.py [--steps 60]

Last stdout line: one JSON object with both rates, their ratio, and dgm's time from `dgm train` to step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from ray_tree import use_checkout, workers_tree  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REFERENCE = r"""
import json, os, sys, time
import numpy as np, torch, deepspeed
sys.path.insert(0, sys.argv[1])
from launch.config import load_config
from sharding.zero import deepspeed_config, lr_scheduler
from trainer.families.image_gpt import ImageGPT
import torch.nn.functional as F
from sklearn.datasets import load_digits

cfg, _ = load_config(os.path.join(sys.argv[1], "configs", "digits_igpt.yaml"))
steps = int(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
torch.manual_seed(0)
model = ImageGPT(cfg.model, 64)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.optim.lr, betas=(0.9, 0.95), weight_decay=0.01)
ds = deepspeed_config(cfg.zero, cfg.trainer.schedule, global_batch=cfg.data.stream.global_batch, world_size=world,
                      lr=cfg.trainer.optim.lr)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, lr_scheduler=lr_scheduler(cfg.trainer.schedule))
d = load_digits()
pixels = torch.from_numpy(d.images.reshape(len(d.images), -1).astype(np.int64))
labels = torch.from_numpy(d.target.astype(np.int64))
micro = cfg.data.stream.global_batch // world
times = []
for step in range(steps):
    idx = torch.arange(micro) + (step * world + rank) * micro
    idx = idx % len(pixels)
    logits = engine(labels[idx], pixels[idx])
    loss = F.cross_entropy(logits.transpose(1, 2), pixels[idx])
    engine.backward(loss)
    engine.step()
    t = torch.tensor([loss.item()])
    torch.distributed.all_reduce(t)
    times.append(time.monotonic())
if rank == 0:
    print(json.dumps({"steps_per_s": (steps - 1) / (times[-1] - times[0])}))
"""


def log(msg: str) -> None:
    print(f"[spine_overhead] {msg}", file=sys.stderr, flush=True)


def reference(steps: int) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".cache", "torch_extensions")}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(REFERENCE)
    try:
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                              f.name, ROOT, str(steps)], capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:  # captured for the JSON line: show the child's own words, not just its status
        sys.stderr.write(out.stderr[-6000:])
        raise SystemExit(f"[spine_overhead] the reference loop failed (torchrun exit {out.returncode}); its stderr "
                         "is above")
    return json.loads(lines[-1])["steps_per_s"]


def dgm(steps: int) -> tuple[float, float, dict[str, object]]:
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from launch.config import load_config
    from launch.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        prepare_dataset(PrepareConfig(output=data, source="digits", source_settings={"split": "all"},
                                      samples_per_shard=128, parallel=False), report=lambda _: None)
        cfg, raw = load_config(os.path.join(ROOT, "configs", "digits_igpt.yaml"), [
            f"run_dir={tmp}/run", f"data.train={data}", "data.eval=", f"trainer.steps={steps}",
            f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=1", "trainer.log_every=20",
            f"trainer.sample_every={steps}", f"trainer.checkpoint_every={steps}"])
        start = time.time()
        summary = run_training(cfg, raw)
        return summary["steps_per_s"], summary["first_step_wall"] - start, workers_tree()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: both rates are timed from the first step to the last, so at least 2")
    use_checkout()
    log(f"reference: plain torch + deepspeed under torchrun, {args.steps} steps")
    ref = reference(args.steps)
    log(f"reference {ref:.3f} steps/s; dgm train through Ray, {args.steps} steps")
    ours, first, tree = dgm(args.steps)
    log(f"dgm {ours:.3f} steps/s, first step after {first:.1f}s")
    if "ray" in sys.modules:  # Ray's workers print to this stdout asynchronously: stop it before the JSON line
        sys.modules["ray"].shutdown()
    print(json.dumps({"dgm_steps_per_s": round(ours, 3), "reference_steps_per_s": round(ref, 3),
                      "ratio": round(ours / ref, 3), "dgm_time_to_first_step_s": round(first, 1),
                      "machine": f"{os.cpu_count()} CPU cores, no GPU", "ranks": 2, "zero_stage": 2, **tree}))


if __name__ == "__main__":
    main()
