"""The training spine on the real stack: Ray Train worker group, DeepSpeed ZeRO on CPU (gloo), exact resume, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from launch.config import load_config
from launch.export import export_checkpoint
from launch.train import run_training
from tests.fixtures_train import flip_a_master_weight_byte
from trainer.checkpoint import CheckpointError
from trainer.export import ExportError, load_export

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_igpt.yaml")


def config(run_dir, data, *extra: str, steps: int = 12):
    overrides = [
        f"run_dir={run_dir}", f"data.train={data['train']}", f"data.eval={data['holdout']}", "name=t",
        f"trainer.steps={steps}", "trainer.log_every=4", f"trainer.eval_every={steps}",
        f"trainer.sample_every={steps}", "trainer.checkpoint_every=6", "trainer.eval_batches=2",
        f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=2", "trainer.optim.lr=0.003",
        "trainer.num_samples=4", "data.stream.global_batch=32", "data.stream.shuffle_block=64",
        "model.transformer.n_layer=2", "model.transformer.d_model=32", "model.transformer.n_head=2",
        *extra,
    ]
    return load_config(CONFIG, overrides)


def train(run_dir, data, *extra, steps=12, stop_after=0):
    cfg, raw = config(run_dir, data, *extra, steps=steps)
    run_training(cfg, raw, stop_after=stop_after)
    return cfg


def losses(run_dir, split="train") -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_and_the_loss_falls(ray_local, digits_data, tmp_path, stage):
    run = str(tmp_path / f"z{stage}")
    train(run, digits_data, f"zero.stage={stage}", "trainer.checkpoint_every=100", steps=30)
    seq = [v for _, v in sorted(losses(run).items())]
    assert len(seq) == 30
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3, seq
    assert os.path.exists(os.path.join(run, "samples", "step-00000030.png"))
    with open(os.path.join(run, "summary.json")) as f:  # the run records each rank's thread count
        assert json.load(f)["torch_threads"] >= 1
    assert os.path.exists(os.path.join(run, "checkpoints", "latest"))
    assert any(n.startswith("events.out") for n in os.listdir(os.path.join(run, "tensorboard")))


@pytest.fixture(scope="module")
def reference_run(ray_local, digits_data, tmp_path_factory) -> str:
    """12 uninterrupted steps on 2 ranks, ZeRO-2, fp32."""
    run = str(tmp_path_factory.mktemp("ref") / "run")
    train(run, digits_data)
    return run


def test_a_rank_takes_as_many_torch_threads_as_cpus_it_reserved():
    """`ray up` clusters run everything under OMP_NUM_THREADS=1, which torch would take whatever a rank reserved."""
    from launch.train import torch_threads

    assert torch_threads(16.0) == 16 and torch_threads(0.5) == 1 and torch_threads(None) is None
    assert torch_threads(16.0, "1") == 16 and torch_threads(16.0, "4") is None  # a user's own setting is kept


def test_resume_gives_the_uninterrupted_loss_sequence(reference_run, digits_data, tmp_path):
    ref = losses(reference_run)
    run = str(tmp_path / "run")
    train(run, digits_data, stop_after=5)  # between checkpoints (every 6): the stop saves its own
    assert sorted(losses(run)) == list(range(1, 6))
    assert open(os.path.join(run, "checkpoints", "latest")).read() == "step-00000005"
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 6, "split": "train", "loss": 99.0}) + "\n")
    two_to_one = str(tmp_path / "run-1rank")
    shutil.copytree(run, two_to_one)
    train(run, digits_data)
    got = losses(run)
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        sixes = [r for r in map(json.loads, f) if r["step"] == 6 and r["split"] == "train"]
    assert len(sixes) == 1 and sixes[0]["loss"] == ref[6]  # the redone step replaced the crashed run's record
    # The same checkpoint resumed on one rank: same global batches, optimizer state carried over (universal).
    train(two_to_one, digits_data, "cluster.workers=1")
    one = losses(two_to_one)
    assert [one[s] for s in range(6, 13)] == pytest.approx([ref[s] for s in range(6, 13)], abs=2e-4)
    converted = os.path.join(two_to_one, "checkpoints", "step-00000005", "model")
    assert os.path.exists(os.path.join(converted, "ds_universal", ".converted"))
    assert sorted(n for n in os.listdir(converted) if n.startswith("ds_universal")) == ["ds_universal"]


def test_zero3_resume_on_another_world_size_gives_the_uninterrupted_losses(ray_local, digits_data, tmp_path):
    """DeepSpeed's stage-3 universal load gave every param group group 0's weight decay and one shared Adam step
    counter: resumed 2 -> 1 rank, step 12's loss was 2.26839 against 2.26496 (3.4e-3 off; now within 1e-6)."""
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    train(ref, digits_data, "zero.stage=3")
    train(run, digits_data, "zero.stage=3", stop_after=5)
    train(run, digits_data, "zero.stage=3", "cluster.workers=1")
    want, got = losses(ref), losses(run)
    assert [got[s] for s in range(6, 13)] == pytest.approx([want[s] for s in range(6, 13)], abs=2e-5)


LOADER = r"""
import json, sys
import torch
from data_pipeline.codecs import build_codec
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import RankStream, StreamConfig
from trainer.export import load_export

family, modules, cfg = load_export(sys.argv[1])
m = load_manifest(sys.argv[2])
stream_cfg = StreamConfig(global_batch=32, partitions=12, shuffle_block=64, drop_last=False, shuffle_shards=False)
per_rank = []
for rank in range(2):
    s = RankStream(m, stream_cfg, build_codec("image").decode, rank, 2)
    vals = [family.evaluate(modules, family.collate(b))["loss"] for _, b in zip(range(2), s.iterate(1))]
    per_rank.append(sum(vals) / len(vals))
batch = family.collate(next(iter(RankStream(m, stream_cfg, build_codec("image").decode, 0, 1).iterate(1))))
logits = modules["model"](batch["start"], batch["pixels"])
print(json.dumps({"eval_loss": sum(per_rank) / 2, "logits_sum": float(logits.double().sum()),
                  "heavy": sorted(k for k in sys.modules if k.split(".")[0] in ("deepspeed", "ray"))}))
"""


def test_export_loads_with_torch_alone_and_matches_training(reference_run, digits_data, tmp_path):
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(reference_run, "checkpoints"), out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging, .partial or .old folder left beside it
    res = subprocess.run([sys.executable, "-c", LOADER, out, digits_data["holdout"]], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["eval_loss"] == pytest.approx(losses(reference_run, "eval")[12], abs=1e-5)
    # The sampler runs from the export alone, through the CLI.
    # The sampler runs from the export alone, through the CLI, and draws what the run's own grid at step 12 drew
    # with the same seed (trainer.seed + step): the export holds the trained weights, not some others.
    png = str(tmp_path / "s.png")
    subprocess.run([sys.executable, "-m", "launch.cli", "sample", out, "--out", png, "--n", "4", "--seed", "12"],
                   cwd=ROOT, check=True, capture_output=True)
    with open(png, "rb") as a, open(os.path.join(reference_run, "samples", "step-00000012.png"), "rb") as b:
        assert a.read() == b.read()


def test_resume_refuses_a_checkpoint_with_a_flipped_byte(reference_run, digits_data, tmp_path):
    """DeepSpeed loaded a flipped master weight as it was (a weight of ~1e36): the run went on, to a NaN loss
    blamed on the learning rate. The rank whose file it is names it, and the run stops before training."""
    run = str(tmp_path / "run")
    shutil.copytree(reference_run, run)
    file, member = flip_a_master_weight_byte(os.path.join(run, "checkpoints", "step-00000012"), rank=1)
    name = os.path.relpath(file, os.path.join(run, "checkpoints", "step-00000012"))
    with pytest.raises(CheckpointError, match=rf"checkpoint file \S+/step-00000012/{name} is unreadable: "
                                              rf"truncated or corrupt \(member {member} fails its CRC check\)"):
        train(run, digits_data, steps=14)
    assert sorted(losses(run)) == sorted(losses(reference_run))  # nothing trained on it


def test_export_refuses_a_checkpoint_with_a_flipped_byte(reference_run, tmp_path):
    """DeepSpeed's readers never check the archives' CRCs: one flipped byte in a master weight was exported as a
    weight of ~1e36, and sampling then blamed diverged training."""
    root = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(reference_run, "checkpoints"), root)
    file, member = flip_a_master_weight_byte(os.path.join(root, "step-00000012"), rank=0)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {file} is unreadable: truncated or corrupt "
                                              rf"\(member {member} fails its CRC check\)"):
        export_checkpoint(root, str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_without_zero_exports_its_master_weights(ray_local, digits_data, tmp_path, precision):
    """zero.stage=0 trains and checkpoints, but export refused it. Under bf16 the export holds DeepSpeed's fp32
    master weights (each rounds to the module's bf16 weight), not the rounded copies."""
    import torch
    from safetensors.torch import load_file

    run = str(tmp_path / "run")
    train(run, digits_data, "zero.stage=0", f"zero.precision={precision}", "cluster.workers=1", steps=4)
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    exported = load_file(os.path.join(out, "model.safetensors"))
    saved = torch.load(os.path.join(run, "checkpoints", "step-00000004", "model", "ds",
                                    "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    assert {f"model.{k}" for k in saved} == set(exported)
    for k, v in saved.items():
        assert exported[f"model.{k}"].dtype == torch.float32
        assert torch.equal(exported[f"model.{k}"].to(v.dtype), v)
    if precision == "bf16":
        assert any(not torch.equal(exported[f"model.{k}"], v.float()) for k, v in saved.items())


def test_tampered_export_is_refused(reference_run, tmp_path):
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(reference_run, "checkpoints"), out)
    with open(os.path.join(out, "model.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ExportError, match="model.safetensors: sha256 does not match"):
        load_export(out)
    os.remove(os.path.join(out, "config.json"))
    with pytest.raises(ExportError, match="not an export folder"):
        load_export(out)


def test_resume_into_an_incompatible_model_is_refused(reference_run, digits_data, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(reference_run, run)
    with pytest.raises(CheckpointError, match=r"another model config \(model.transformer.d_model: 32 -> 48\)"):
        train(run, digits_data, "model.transformer.d_model=48", steps=14)
    # another sample order: the saved {epoch, batch} would mean other samples
    with pytest.raises(CheckpointError, match=r"another sample order \(data.stream.seed: \d+ -> 9\)"):
        train(run, digits_data, "data.stream.seed=9", steps=14)
    assert open(os.path.join(run, "checkpoints", "latest")).read() == "step-00000012"


def test_checkpoints_to_s3_save_and_resume(ray_local, digits_data, s3_bucket, tmp_path):
    root = f"{s3_bucket}/ckpt"
    run = str(tmp_path / "run")
    train(run, digits_data, f"checkpoint_root={root}", "trainer.checkpoint_every=3", steps=6, stop_after=3)
    from data_pipeline import storage

    assert storage.read_bytes(f"{root}/latest").decode() == "step-00000003"
    train(run, digits_data, f"checkpoint_root={root}", "trainer.checkpoint_every=3", steps=6)
    assert storage.read_bytes(f"{root}/latest").decode() == "step-00000006"
    assert sorted(losses(run)) == list(range(1, 7))
    # the resume from the bucket is exact: the same losses as an uninterrupted run (local checkpoints)
    ref = str(tmp_path / "ref")
    train(ref, digits_data, "trainer.checkpoint_every=3", steps=6)
    assert [losses(run)[s] for s in (4, 5, 6)] == [losses(ref)[s] for s in (4, 5, 6)]
    out = str(tmp_path / "export")
    export_checkpoint(root, out)
    load_export(out)
    # The same s3:// checkpoint resumed on another world size: every rank converts its own downloaded copy.
    train(str(tmp_path / "one"), digits_data, f"checkpoint_root={root}", "trainer.checkpoint_every=3",
          "cluster.workers=1", steps=9)
    assert storage.read_bytes(f"{root}/latest").decode() == "step-00000009"
    train(str(tmp_path / "two"), digits_data, f"checkpoint_root={root}", "trainer.checkpoint_every=3", steps=12)
    assert storage.read_bytes(f"{root}/latest").decode() == "step-00000012"


def test_missing_dataset_fails_before_any_worker_starts(tmp_path):
    cfg, raw = config(str(tmp_path / "r"), {"train": str(tmp_path / "nope"), "holdout": ""})
    with pytest.raises(Exception, match=r"nope: cannot read its manifest"):
        run_training(cfg, raw)


def test_checkpoint_of_another_family_is_refused(reference_run, tmp_path):
    from trainer.checkpoint import CheckpointStore

    run = str(tmp_path / "c")
    shutil.copytree(os.path.join(reference_run, "checkpoints"), run)
    meta_path = os.path.join(run, "step-00000012", "meta.json")
    meta = json.load(open(meta_path))
    meta["family"] = "dalle"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="is of family 'dalle', this run trains 'image_gpt'"):
        CheckpointStore(run).load("step-00000012", {"model": None}, expect_family="image_gpt")
