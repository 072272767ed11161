"""The README's main job (`make demo`: configs/demo.yaml, the DCTransformer on shape scenes) through the real
`dgm` command: prepare (Ray tasks), train (2 ranks, ZeRO-2), export, sample; shrunk to seconds by overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dgm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_prepare_train_export_sample_through_the_cli(tmp_path):
    run = tmp_path / "run"
    over = [f"run_dir={run}", f"data.train={run}/data/train", f"data.eval={run}/data/eval", "name=cli",
            "trainer.steps=20", "trainer.log_every=5", "trainer.eval_every=20", "trainer.sample_every=10",
            "trainer.checkpoint_every=10", "trainer.schedule.total_steps=20", "trainer.schedule.warmup_steps=2",
            "trainer.num_samples=4", "data.prepare.splits.train.num_samples=600",
            "data.prepare.splits.eval.num_samples=64", "data.prepare.samples_per_shard=128",
            "model.encoder.n_layer=1", "model.encoder.d_model=32", "model.decoders.channel_layers=1",
            "model.decoders.position_layers=1", "model.decoders.value_layers=1", "model.chunk_size=32"]
    config = os.path.join(ROOT, "configs", "demo.yaml")
    prep = dgm("prepare", config, *over)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "[prepare shards]" in prep.stdout and "wrote manifest" in prep.stdout
    manifest = json.load(open(run / "data" / "train" / "manifest.json"))
    assert sum(s["count"] for s in manifest["shards"]) == 600 and len(manifest["shards"]) == 5
    assert manifest["codec"]["name"] == "dct" and all(s["count"] and s["sha256"] for s in manifest["shards"])
    assert all(s["encoding"] == {"clipped_values": 0} for s in manifest["shards"])
    assert "[prepare] dct codec: clipped values 0" in prep.stdout

    paused = dgm("train", config, *over, "--stop-after", "10")
    assert paused.returncode == 0, paused.stderr[-3000:]
    assert ("[train] stopped (--stop-after) at step 10 of 20" in paused.stdout
            and "the same command without --stop-after goes on from there" in paused.stdout)
    train = dgm("train", config, *over)
    assert train.returncode == 0, train.stderr[-3000:]
    out = train.stdout + train.stderr
    assert "[train] finished at step 20 of 20" in train.stdout and f"checkpoints in {run}/checkpoints" in out
    assert "[memory] model" in out and "[train] step 20/20" in out and "ETA" in out
    assert out.count("[train] step 15/20") == 1, "each progress line is printed once"
    noise = ("Failed to query Ray Train Controller", "FutureWarning", "scheduler before it has started")
    assert not [n for n in noise if n in out], \
        "library chatter a user cannot act on is silenced (trainer.ray_env.quiet_worker_noise)"
    assert (run / "checkpoints" / "latest").read_text() == "step-00000020"

    exp = dgm("export", config, *over)
    assert exp.returncode == 0, exp.stderr[-3000:]
    changed = dgm("export", config, *over, "model.chunk_size=16", "--out", f"file://{tmp_path}/exp2")
    assert changed.returncode != 0 and "model.chunk_size: 32 -> 16" in changed.stderr, changed.stderr[-3000:]
    url = dgm("export", config, *over, "--out", f"file://{tmp_path}/exp2")  # a file:// URL is that folder
    assert url.returncode == 0 and (tmp_path / "exp2" / "model.safetensors").is_file(), url.stderr[-3000:]
    png = tmp_path / "grid.png"
    smp = dgm("sample", str(run / "export"), "--out", str(png), "--n", "9", "--top-p", "0.9")
    assert smp.returncode == 0, smp.stderr[-3000:]
    assert "9 samples" in smp.stdout
    assert Image.open(png).size[0] >= 3 * 32
    assert sorted(os.listdir(run / "samples")) == ["step-00000010.png", "step-00000020.png"]
