"""The GAN family on the real stack (Ray Train, 2 ranks, DeepSpeed ZeRO-2 on CPU), and the duality-gap monitor
as a separate Ray actor beside a training run that fails and is resumed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading

import pytest

from data_pipeline.manifest import load_manifest
from launch.config import load_config
from launch.export import export_checkpoint
from launch.gap_monitor import GAP_FILE, load_monitor_config, start_monitor
from launch.train import run_training
from trainer.typed_config import ConfigError

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "gan_ring.yaml")


def config(run_dir: str, data: dict[str, str], *extra: str, steps: int = 8):
    return load_config(CONFIG, [
        f"run_dir={run_dir}", f"data.train={data['train']}", f"data.eval={data['holdout']}", "name=gan",
        f"trainer.steps={steps}", "trainer.log_every=4", f"trainer.eval_every={steps}", "trainer.eval_batches=1",
        f"trainer.sample_every={steps}", "trainer.checkpoint_every=4", f"trainer.schedule.total_steps={steps}",
        "data.stream.global_batch=64", "data.stream.partitions=2", "data.stream.shuffle_block=128",
        "model.hidden=32", "model.latent_dim=16", "model.label_fraction=0.5", "trainer.num_samples=2",
        "model.points_per_image=64", *extra,
    ])


def records(run_dir: str, split: str = "train") -> dict[int, dict]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["step"]] = rec
    return out


def test_gan_trains_on_two_ranks_with_three_engines_resumes_exactly_and_exports(ray_local, ring_data, tmp_path):
    run = str(tmp_path / "run")
    cfg, raw = config(run, ring_data)
    run_training(cfg, raw)
    train = records(run)
    assert sorted(train) == list(range(1, 9))
    assert all(math.isfinite(r[k]) for r in train.values() for k in ("d_loss", "g_loss", "c_loss"))
    ckpt = os.path.join(run, "checkpoints", "step-00000008")
    assert sorted(d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d))) == [
        "classifier", "discriminator", "generator"]
    ev = records(run, "eval")[8]
    assert 0.0 <= ev["label_accuracy"] <= 1.0 and 0 <= ev["modes_covered"] <= 8
    assert os.path.exists(os.path.join(run, "samples", "step-00000008.png"))

    # Resume from step 4: the noise is a function of (seed, step, rank), so steps 5..8 repeat exactly.
    again = str(tmp_path / "again")
    shutil.copytree(run, again, ignore=shutil.ignore_patterns("ray"))
    shutil.rmtree(os.path.join(again, "checkpoints", "step-00000008"))
    with open(os.path.join(again, "checkpoints", "latest"), "w") as f:
        f.write("step-00000004")
    os.remove(os.path.join(again, "metrics.jsonl"))
    cfg2, raw2 = config(again, ring_data)
    run_training(cfg2, raw2)
    resumed = records(again)
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in range(5, 9):
        assert resumed[s]["d_loss"] == pytest.approx(train[s]["d_loss"], abs=1e-5)
        assert resumed[s]["g_loss"] == pytest.approx(train[s]["g_loss"], abs=1e-5)
        assert resumed[s]["c_loss"] == pytest.approx(train[s]["c_loss"], abs=1e-5)  # the classifier's state too

    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    code = ("import sys, torch; from trainer.export import load_export; f, m, c = load_export(sys.argv[1]); "
            "x = f.generate(m, 5, torch.Generator().manual_seed(0))[0]; print(sorted(m), tuple(x.shape), "
            "sorted(k for k in sys.modules if k.split('.')[0] in ('deepspeed', 'ray')))")
    res = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "['classifier', 'discriminator', 'generator'] (5, 2) []"


def _checksums(root: str, prefix: str = "", only: set[str] | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (under ``prefix``); ``only``: those top folders."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if only is not None and rel.split(os.sep)[0] not in only:
                continue
            with open(os.path.join(root, rel), "rb") as f:
                out[os.path.join(prefix, rel) if prefix else rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_gap_monitor_runs_beside_training_survives_its_failure_and_never_touches_weights(ray_local, ring_data,
                                                                                       tmp_path):
    import ray

    data = {k: str(tmp_path / k) for k in ring_data}
    for k, v in ring_data.items():
        shutil.copytree(v, data[k])
    run = str(tmp_path / "run")
    mon_cfg = load_monitor_config(None, [f"run_dir={run}", "poll_s=0.3", "idle_timeout_s=240",
                                         "max_eval_samples=256", "gap.k=2", "gap.d_epochs=1", "gap.g_epochs=1",
                                         "gap.batch_size=64"])
    actor, done = start_monitor(mon_cfg)
    # each checkpoint's files are hashed when `latest` first names it (polled 6x as often as the monitor polls),
    # before the monitor reads it
    weights: dict[str, str] = {}
    stop = threading.Event()

    def hash_new_checkpoints() -> None:
        latest = os.path.join(run, "checkpoints", "latest")
        while not stop.wait(0.05):
            tag = open(latest).read().strip() if os.path.exists(latest) else ""
            if tag and not any(k.startswith(tag + "/") for k in weights):
                weights.update(_checksums(os.path.join(run, "checkpoints", tag), tag))

    hasher = threading.Thread(target=hash_new_checkpoints, daemon=True)
    hasher.start()
    try:
        # Shard 1 is the second one partition 0 reads (no shard shuffling): a bad checksum there fails the run at
        # step 5, after the checkpoints of steps 2 and 4.
        shard = os.path.join(data["train"], load_manifest(data["train"]).shards[1].name)
        good = open(shard, "rb").read()
        with open(shard, "r+b") as f:
            f.seek(700)
            f.write(b"\xff\xfe\xfd\xfc")
        extra = ("data.stream.shuffle_shards=false", "trainer.checkpoint_every=2", "cluster.cpus_per_worker=0.75",
                 "trainer.keep_checkpoints=10")
        cfg, raw = config(run, data, *extra)
        with pytest.raises(Exception, match="sha256 mismatch"):
            run_training(cfg, raw)
        assert open(os.path.join(run, "checkpoints", "latest")).read() == "step-00000004"
        assert ray.get(actor.status.remote(), timeout=30) is not None  # the monitor outlived the failed job
        with open(shard, "wb") as f:
            f.write(good)
        run_training(cfg, raw)
        summary = ray.get(done, timeout=240)
        assert summary == {"evaluated": 4, "failed": 0, "last_step": 8, "reason": "finished"}
        assert sorted({k.split("/")[0] for k in weights}) == [f"step-0000000{s}" for s in (2, 4, 6, 8)]
        assert _checksums(os.path.join(run, "checkpoints"), "", {k.split("/")[0] for k in weights}) == weights
    finally:  # the actor holds 0.5 CPU until its handle is collected: the next test's ranks would not fit
        stop.set()
        hasher.join()
        ray.kill(actor)
    entries = [json.loads(line) for line in open(os.path.join(run, GAP_FILE))]
    assert [e["tag"] for e in entries] == [f"step-0000000{s}" for s in (2, 4, 6, 8)]
    assert all(math.isfinite(e["proximal"]) and math.isfinite(e["plain"]) for e in entries)
    gap_tb = os.path.join(run, "tensorboard", "gap")
    assert any(n.startswith("events.out") for n in os.listdir(gap_tb))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(gap_tb)
    acc.Reload()
    assert [s.step for s in acc.Scalars("gap/proximal")] == [2, 4, 6, 8]
    assert [s.step for s in acc.Scalars("gap/proximal_lb")] == [2, 4, 6, 8]


def test_gan_trains_evaluates_and_samples_in_bf16_with_spectral_norm(ray_local, ring_data, tmp_path):
    """bf16 engines cast parameters, not buffers (the classifier's EMA, spectral norm's vectors): every step,
    evaluation and sample grid must still run, on two ranks of real DeepSpeed engines."""
    run = str(tmp_path / "run")
    cfg, raw = config(run, ring_data, "zero.precision=bf16", "model.d_spectral_norm=true", steps=4)
    run_training(cfg, raw)
    train = records(run)
    assert sorted(train) == [1, 2, 3, 4]
    assert all(math.isfinite(r[k]) for r in train.values() for k in ("d_loss", "g_loss", "c_loss"))
    ev = records(run, "eval")[4]
    assert math.isfinite(ev["loss"]) and 0.0 <= ev["label_accuracy"] <= 1.0
    assert os.path.exists(os.path.join(run, "samples", "step-00000004.png"))


def _monitor_on(run_dir, *tags: str, **settings):
    from launch.gap_monitor import GapMonitor, MonitorConfig

    root = os.path.join(run_dir, "checkpoints")
    for tag in tags:
        os.makedirs(os.path.join(root, tag))
        with open(os.path.join(root, tag, "meta.json"), "w") as f:
            json.dump({"step": int(tag.split("-")[1])}, f)
    if tags:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(tags[-1])
    return GapMonitor(MonitorConfig(run_dir=str(run_dir), poll_s=0.01, idle_timeout_s=2.0, **settings))


@pytest.mark.parametrize("override", ["threads=0", "stop_at_step=-5", "idle_timeout_s=nan", "poll_s=inf"])
def test_monitor_settings_that_would_crash_or_never_end_are_refused(override):
    with pytest.raises(ConfigError, match=r"threads must be >= 1|must be finite numbers > 0|expected a (finite )?number"):
        load_monitor_config(None, ["run_dir=r", override])


def test_a_monitor_of_an_s3_run_leaves_no_checkpoint_download_behind(s3_bucket, tmp_path):
    from launch.gap_monitor import GapMonitor, MonitorConfig

    monitor = GapMonitor(MonitorConfig(run_dir=str(tmp_path / "run"), checkpoint_root=f"{s3_bucket}/ckpt",
                                       poll_s=0.01, idle_timeout_s=0.05))
    download = os.path.join(monitor.store.staging, "dgm-ckpt-load-rank0", "x", "step-00000010")
    os.makedirs(download)
    open(os.path.join(download, "optim_states.pt"), "wb").write(b"\0" * 1000)
    assert monitor.run()["reason"] == "idle" and not os.path.exists(monitor.store.staging)


def test_a_restarted_monitor_sees_a_finished_run_and_retries_storage_failures(tmp_path, monkeypatch):
    """Restarted after the run's last checkpoint was evaluated, the monitor ends at once (not after its idle
    timeout). A download or storage failure is retried at later polls, and recorded only when it persists; a
    failure on the last checkpoint still ends the watch."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / GAP_FILE, "w") as f:
        f.write(json.dumps({"tag": "step-00000008", "step": 8, "proximal": 0.1}) + "\n")
    assert _monitor_on(run, stop_at_step=8).run()["reason"] == "finished"

    fresh = tmp_path / "fresh"
    monitor = _monitor_on(fresh, "step-00000004", stop_at_step=4)
    calls = []

    def flaky(tag):
        calls.append(tag)
        raise OSError("connection reset by peer")

    monkeypatch.setattr(monitor, "evaluate_tag", flaky)
    summary = monitor.run()
    assert summary["reason"] == "finished" and len(calls) == 3  # TRANSIENT_TRIES polls, then recorded
    with open(fresh / GAP_FILE) as f:
        entries = [json.loads(line) for line in f]
    assert len(entries) == 1 and entries[0]["step"] == 4 and "connection reset" in entries[0]["error"]
    assert summary["failed"] == 1

    # restarted (the cause fixed), the monitor evaluates the failed checkpoint again: an error entry was "done"
    again = _monitor_on(fresh, stop_at_step=4)
    monkeypatch.setattr(again, "evaluate_tag", lambda tag: {"step": 4, "proximal": 0.1, "plain": 0.2, "m1": 0.0,
                                                            "m2": 0.0, "value_gap": float("nan"),
                                                            "proximal_lb": 0.0, "seconds": 0.0})
    assert again.run() == {"evaluated": 1, "failed": 0, "last_step": 4, "reason": "finished"}
    assert _monitor_on(fresh, stop_at_step=4).run()["evaluated"] == 0  # and not a third time

    # a failing earlier checkpoint is not dropped because a later one reached the last step in the same poll
    both = tmp_path / "both"
    monitor = _monitor_on(both, "step-00000004", "step-00000008", stop_at_step=8)
    tries = {"step-00000004": 0}

    def first_fails_twice(tag):
        if tag == "step-00000004" and tries[tag] < 2:
            tries[tag] += 1
            raise OSError("connection reset by peer")
        return {"step": int(tag.split("-")[1]), "proximal": 0.1, "plain": 0.2, "m1": 0.0, "m2": 0.0,
                "value_gap": 0.5, "proximal_lb": 0.0, "seconds": 0.0}

    monkeypatch.setattr(monitor, "evaluate_tag", first_fails_twice)
    assert monitor.run()["reason"] == "finished"
    with open(both / GAP_FILE) as f:
        assert sorted((e["tag"], "error" in e) for e in map(json.loads, f)) == [
            ("step-00000004", False), ("step-00000008", False)]


def test_the_monitor_skips_incomplete_checkpoints_and_a_torn_gap_line(tmp_path, monkeypatch):
    """A tag below latest without its meta (a save cut short) was evaluated into an error entry; an entry
    appended after a line a crash cut short was glued to it, unparsable, and its tag evaluated again."""
    run = tmp_path / "run"
    monitor = _monitor_on(run, "step-00000002", "step-00000004", stop_at_step=4)
    os.remove(run / "checkpoints" / "step-00000002" / "meta.json")
    with open(run / GAP_FILE, "w") as f:
        f.write('{"tag": "step-0000')  # torn by a crash
    evaluated = []

    def evaluate(tag):
        evaluated.append(tag)
        return {"step": int(tag.split("-")[1]), "proximal": 0.1, "plain": 0.2, "m1": 0.0, "m2": 0.0,
                "value_gap": 0.5, "proximal_lb": 0.0, "seconds": 0.0}

    monkeypatch.setattr(monitor, "evaluate_tag", evaluate)
    assert monitor.run()["reason"] == "finished" and evaluated == ["step-00000004"]
    lines = (run / GAP_FILE).read_text().splitlines()
    assert lines[0] == '{"tag": "step-0000' and json.loads(lines[1])["tag"] == "step-00000004"


def test_a_monitor_given_a_held_out_set_it_cannot_use_says_so(ring_data, digits_data, tmp_path, capsys):
    """A mistyped eval_data failed at every checkpoint (each consolidated first) and the monitor exited 0; image
    samples for a points model failed as a bare KeyError: 'point'. Both were recorded as done for good."""
    from launch.gap_monitor import held_out_batch, main
    from trainer.families.slsa_gan import SLSAGanConfig, SLSAGanFamily
    from trainer.loop import data_info

    with pytest.raises(ConfigError, match=r"eval_data: dataset .*holdoutut: cannot read its manifest"):
        load_monitor_config(None, [f"run_dir={tmp_path}", f"eval_data={ring_data['holdout']}ut"])
    family = SLSAGanFamily(SLSAGanConfig(hidden=8, latent_dim=4), data_info(load_manifest(ring_data["train"])))
    with pytest.raises(ValueError, match=rf"data.eval {digits_data['holdout']}: holds image 8x8x1, but this model "
                                         r"was built for its training data's points of dimension 2"):
        held_out_batch(family, digits_data["holdout"], 16)
    assert len(held_out_batch(family, ring_data["holdout"], 16)["x"]) == 16

    run = tmp_path / "run"
    _monitor_on(run, "step-00000004")  # a checkpoint folder without DeepSpeed's files: its evaluation fails
    assert main([f"run_dir={run}", "stop_at_step=4", "poll_s=0.01", "idle_timeout_s=5", "--in-process"]) == 1
    assert '"failed": 1' in capsys.readouterr().out
