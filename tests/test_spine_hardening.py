"""The training spine's edges: the LR schedule DeepSpeed really applies, a held-out set smaller than a batch, the
checkpoint saved before a failing eval, damaged checkpoint files, resumes under another ZeRO stage or model
config, the next-epoch resume, trainer settings, and a metrics record cut short. Real DeepSpeed, one rank
in-process (a file:// gloo group of world 1)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import pytest
import torch

from data_pipeline.manifest import load_manifest
from launch.config import load_config
from launch.train import run_spec, run_training
from sharding.sample_order import StreamState
from trainer.checkpoint import CheckpointError, CheckpointStore
from trainer.families import family_class
from trainer.loop import (
    RunSpec,
    TrainerConfig,
    apply_schedule,
    build_engines,
    data_info,
    resume_position,
    rng_untouched,
    torchrun_cuda_index,
    train_worker,
)
from trainer.run_outputs import Reporter
from trainer.typed_config import ConfigError

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_igpt.yaml")
STEP2 = "step-00000002"


def spec_of(run_dir, data, *extra: str, eval_data: str | None = None) -> RunSpec:
    overrides = [
        f"run_dir={run_dir}", f"data.train={data['train']}", f"data.eval={eval_data or data['holdout']}", "name=t",
        "trainer.steps=2", "trainer.eval_every=2", "trainer.sample_every=2", "trainer.checkpoint_every=2",
        "trainer.eval_batches=1", "trainer.num_samples=1", "trainer.schedule.total_steps=12",
        "trainer.schedule.warmup_steps=2", "trainer.deterministic=false", "data.stream.global_batch=16",
        "data.stream.shuffle_block=16", "model.transformer.n_layer=1", "model.transformer.d_model=16",
        "model.transformer.n_head=2", "cluster.workers=1", *extra,
    ]
    cfg, raw = load_config(CONFIG, overrides)
    return run_spec(cfg, raw)


def engines_of(spec: RunSpec) -> dict:
    family = family_class(spec.family)(spec.model, data_info(load_manifest(spec.train_data)))
    return build_engines(family, spec, world=1, universal=False)


@pytest.mark.parametrize("warmup", [0, 4])
def test_the_engines_run_a_linear_warmup_then_cosine_from_the_first_step(world1, digits_data, tmp_path, warmup):
    """DeepSpeed's WarmupCosineLR warmed up logarithmically and ran optimizer steps 1 and 2 at rate 0."""
    spec = spec_of(tmp_path, digits_data, f"trainer.schedule.warmup_steps={warmup}", "trainer.optim.lr=1.0",
                   "trainer.schedule.min_ratio=0.1")
    engine = engines_of(spec)["model"]
    used = []
    for _ in range(14):
        used.append(engine.optimizer.param_groups[0]["lr"])  # what the next optimizer step uses
        engine.backward(sum(p.sum() for p in engine.module.parameters()))
        engine.step()
    peak_at = max(warmup, 1)
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * (k - peak_at) / (12 - peak_at))) / 2 for k in range(peak_at, 13)]
    want = [k / warmup for k in range(1, warmup)] + cosine + [0.1, 0.1]
    assert used == pytest.approx(want, abs=1e-9)
    assert used[0] == (1.0 if warmup == 0 else 0.25)


def test_an_eval_set_smaller_than_one_global_batch_is_refused_before_training(world1, digits_data, tmp_path,
                                                                              monkeypatch):
    import launch.train

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the eval set was checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    holdout = digits_data["holdout"]
    message = rf"data.eval: {holdout} has 359 samples, fewer than one global batch of data.stream.global_batch=400"
    cfg, raw = load_config(CONFIG, [f"data.train={digits_data['train']}", f"data.eval={holdout}",
                                    f"run_dir={tmp_path}", "data.stream.global_batch=400", "cluster.workers=1"])
    with pytest.raises(ConfigError, match=message):
        run_training(cfg, raw)
    # the workers check it too (torchrun starts them without `dgm train`), before any engine or step
    with pytest.raises(ConfigError, match=message):
        train_worker(spec_of(tmp_path, digits_data, "data.stream.global_batch=400"))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_model_too_big_for_a_ranks_memory_is_refused_before_deepspeed_allocates_it(world1, digits_data, tmp_path):
    """25 billion parameters: DeepSpeed would have died in its allocator, or the OOM killer taken the worker."""
    spec = spec_of(tmp_path, digits_data, "model.transformer.n_layer=24", "model.transformer.d_model=8192",
                   "model.transformer.n_head=32")
    with pytest.raises(ConfigError, match=r"the model's states need \d+\.\d+ GiB of host memory per rank \(ZeRO-2, "
                                          r"fp32, 1 rank\(s\).* but a rank has"):
        train_worker(spec)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_run_dir_or_checkpoint_root_that_is_a_file_or_an_object_store_past_memory_is_refused_early(digits_data, tmp_path, monkeypatch):
    """A file there failed only at the first checkpoint, with a bare NotADirectoryError, after every step before it."""
    import launch.train

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the folders were checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    cases = {f"run_dir={afile}": rf"run_dir={afile}: is a file, not a folder",
             f"checkpoint_root={afile}": rf"checkpoint_root={afile}: is a file, not a folder",
             f"checkpoint_root={afile}/ckpt": rf"checkpoint_root={afile}/ckpt: is below {afile}, a file, not a folder",
             "cluster.object_store_mb=100000000": r"cluster.object_store_mb=100000000: more than half of this "
                                                  r"machine's memory"}
    for override, message in cases.items():
        over = [f"data.train={digits_data['train']}", f"data.eval={digits_data['holdout']}", f"run_dir={tmp_path / 'run'}",
                "cluster.workers=1", override]
        cfg, raw = load_config(CONFIG, over)
        with pytest.raises(ConfigError, match=message):
            run_training(cfg, raw)
    assert afile.read_text() == "mine" and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def crashed_run(world1, digits_data, tmp_path_factory) -> tuple[str, Exception]:
    """Two steps whose eval at step 2 fails (its shards are gone); the checkpoint of step 2 is due there too."""
    root = tmp_path_factory.mktemp("crashed")
    run = str(root / "run")
    with pytest.raises(Exception) as failed:
        train_worker(spec_of(run, digits_data, eval_data=eval_without_shards(digits_data, root)))
    return run, failed.value


def eval_without_shards(data: dict[str, str], root) -> str:
    """The held-out set's manifest with its shards gone: the run starts, and its first eval fails."""
    broken_eval = str(root / "eval")
    shutil.copytree(data["holdout"], broken_eval)
    for name in os.listdir(broken_eval):
        if name.endswith(".tar"):
            os.remove(os.path.join(broken_eval, name))
    return broken_eval


def test_a_diverged_run_stops_at_its_first_non_finite_loss(world1, digits_data, tmp_path):
    """It trained on with loss NaN, checkpointed NaN-trained weights and ended (if at all) on torch's "probability
    tensor contains either inf, nan" from its sample grid."""
    from trainer.loop import DivergedError

    spec = spec_of(tmp_path / "run", digits_data, "trainer.optim.lr=1e12", "trainer.schedule.warmup_steps=0",
                   "trainer.steps=6", "trainer.checkpoint_every=1", "trainer.eval_every=100",
                   "trainer.sample_every=100", "trainer.schedule.min_ratio=1.0")
    with pytest.raises(DivergedError, match=r"training diverged: the loss at step (\d+) is nan .*lower "
                                            "trainer.optim.lr") as diverged:
        train_worker(spec)
    bad = int(str(diverged.value).split("step ")[1].split(" ")[0])
    assert bad > 1  # the first step's loss is finite: what the test means to show needs one checkpoint before
    saved = sorted(n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith("step-"))
    assert saved[-1] == f"step-{bad - 1:08d}"  # nothing trained into NaN was saved
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == saved[-1]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(x) for x in losses) and len(losses) == bad - 1


def test_a_finished_run_started_again_keeps_its_summary(world1, digits_data, tmp_path, capsys):
    """summary.json was rewritten with steps_per_s 0.0 by a `dgm train` that had nothing left to train."""
    spec = spec_of(tmp_path / "run", digits_data)
    train_worker(spec)
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert json.loads(summary)["step"] == 2
    capsys.readouterr()
    assert train_worker(spec)["step"] == 2
    assert (tmp_path / "run" / "summary.json").read_text() == summary
    assert "[train] the run is already at step 2 of trainer.steps=2: nothing to train" in capsys.readouterr().out


def test_a_failure_right_after_a_checkpoint_to_s3_lets_its_upload_finish(world1, digits_data, s3_bucket, flaky_s3,
                                                                          tmp_path, capsys):
    """The upload runs in daemon threads: an eval failing right after the checkpoint ended the process with them,
    and the bucket held neither the checkpoint nor `latest`."""
    from data_pipeline import storage

    root = f"{s3_bucket}/failing"
    spec = spec_of(tmp_path / "run", digits_data, f"checkpoint_root={root}",
                   eval_data=eval_without_shards(digits_data, tmp_path))
    flaky_s3.fail_next(4, status=503)  # the upload takes its retries' time
    with pytest.raises(Exception, match=r"\.tar"):
        train_worker(spec)
    assert storage.read_bytes(f"{root}/latest") == b"step-00000002"  # at once: the failing rank waited for it
    assert f"[checkpoint] finishing the upload to {root} before the run ends" in capsys.readouterr().out


def test_the_checkpoint_is_saved_before_a_failing_eval(crashed_run):
    run, error = crashed_run
    assert ".tar" in str(error)  # it failed where meant to: reading the eval shards
    assert CheckpointStore(os.path.join(run, "checkpoints")).latest() == STEP2


def test_complete_checkpoints_without_latest_are_not_started_over(damaged, digits_data, tmp_path):
    """A lost `latest` made the run start from step 0: its metrics rewritten, its checkpoints replaced one by one."""
    from trainer.loop import _resume_point

    os.remove(os.path.join(damaged, "latest"))
    spec = spec_of(tmp_path, digits_data)
    with pytest.raises(CheckpointError, match=rf"{damaged} holds complete checkpoints \({STEP2}\) but no 'latest' "
                                              rf"naming one: write the tag to resume from into {damaged}/latest"):
        _resume_point(CheckpointStore(damaged), 1, 0, spec)
    shutil.rmtree(os.path.join(damaged, STEP2))
    assert _resume_point(CheckpointStore(damaged), 1, 0, spec) == (None, False)  # nothing there: a fresh start


def test_a_resume_makes_the_eval_and_grid_its_checkpoints_step_missed(crashed_run, digits_data, tmp_path):
    """The crashed run saved step 2, then failed in step 2's eval, so step 2 had no eval record and no grid. Resumed
    (nothing left to train), it makes both; resumed again, it makes neither twice."""
    run = str(tmp_path / "run")
    shutil.copytree(crashed_run[0], run)
    grid = os.path.join(run, "samples", "step-00000002.png")
    assert not os.path.exists(grid)

    def evals() -> list[int]:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r["step"] for r in map(json.loads, f) if r["split"] == "eval"]

    assert evals() == []
    train_worker(spec_of(run, digits_data))
    assert evals() == [2] and os.path.exists(grid)
    made = os.path.getmtime(grid)
    train_worker(spec_of(run, digits_data))
    assert evals() == [2] and os.path.getmtime(grid) == made


def test_eval_and_sample_grids_leave_the_training_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with rng_untouched():
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("override, message", [
    ("zero.stage=3", r"was saved under ZeRO-2, this run uses ZeRO-3: set zero.stage=2"),
    ("model.transformer.n_head=4", r"was trained with another model config \(model.transformer.n_head: 2 -> 4\): "
                                   r"restore those settings, start fresh.*trainer.on_model_change=warn"),
])
def test_a_resume_under_another_zero_stage_or_model_config_is_refused(crashed_run, digits_data, override, message):
    """n_head keeps every parameter shape: DeepSpeed loaded such a checkpoint without a word."""
    run, _ = crashed_run
    with pytest.raises(CheckpointError, match=message):
        train_worker(spec_of(run, digits_data, override))


def test_a_resume_runs_its_first_step_at_its_own_schedules_rate(damaged, digits_data, tmp_path):
    """The optimizer state loaded after the scheduler's position brought back the saved rate for one step."""
    spec = spec_of(tmp_path, digits_data, "trainer.schedule.warmup_steps=8", "trainer.optim.lr=1.0")
    engines = engines_of(spec)
    CheckpointStore(damaged).load(STEP2, engines, expect_family="image_gpt", zero_stage=2, model_config=spec.model)
    apply_schedule(engines)
    assert engines["model"].optimizer.param_groups[0]["lr"] == pytest.approx(3 / 8)  # step 3 of an 8-step warm-up


def test_a_model_setting_that_keeps_the_networks_resumes_with_a_warning_when_asked(damaged, digits_data, tmp_path,
                                                                                   caplog):
    """trainer.on_model_change=warn: the checkpoint loads into the changed config, and the change is named."""
    spec = spec_of(tmp_path, digits_data, "model.transformer.n_head=4", "trainer.on_model_change=warn")
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        meta = CheckpointStore(damaged).load(STEP2, engines_of(spec), expect_family="image_gpt", zero_stage=2,
                                             model_config=spec.model, on_model_change=spec.trainer.on_model_change)
    assert meta.step == 2
    assert "another model config (model.transformer.n_head: 2 -> 4; trainer.on_model_change=warn)" in caplog.text


@pytest.fixture
def damaged(crashed_run, tmp_path) -> str:
    """A copy of the crashed run's checkpoint root, to damage."""
    root = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(crashed_run[0], "checkpoints"), root)
    return root


@pytest.mark.parametrize("file, keep", [
    ("model/ds/mp_rank_00_model_states.pt", 5000),
    ("model/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", 3000),
    ("rng-rank0.safetensors", 100),
])
def test_a_truncated_checkpoint_file_is_named(damaged, digits_data, tmp_path, file, keep):
    path = os.path.join(damaged, STEP2, file)
    os.truncate(path, keep)
    spec = spec_of(tmp_path, digits_data)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {damaged}/{STEP2}/{file} is unreadable: truncated or "
                                              "corrupt"):
        CheckpointStore(damaged).load(STEP2, engines_of(spec), expect_family="image_gpt", zero_stage=2,
                                      model_config=spec.model)


@pytest.mark.parametrize("file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_truncated_file_met_converting_for_another_world_size_is_named(damaged, file):
    """DeepSpeed's universal conversion said only 'OSError: Invalid argument' or 'failed finding central directory'."""
    from trainer.checkpoint import to_universal

    path = os.path.join(damaged, STEP2, "model", "ds", file)
    os.truncate(path, 3000)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {path} is unreadable: truncated or corrupt .*"
                                              "cannot be converted to load at another world size"):
        to_universal(os.path.join(damaged, STEP2), "model")
    assert not os.path.exists(os.path.join(damaged, STEP2, "model", "ds_universal"))


def test_a_flipped_byte_met_converting_for_another_world_size_is_named(damaged):
    """The conversion read a flipped master-weight byte as it was: a resume on another world size trained on it."""
    from tests.fixtures_train import flip_a_master_weight_byte
    from trainer.checkpoint import to_universal

    file, member = flip_a_master_weight_byte(os.path.join(damaged, STEP2), rank=0)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {file} is unreadable: truncated or corrupt "
                                              rf"\(member {member} fails its CRC check\); it cannot be converted"):
        to_universal(os.path.join(damaged, STEP2), "model")
    assert not os.path.exists(os.path.join(damaged, STEP2, "model", "ds_universal"))


CONVERT_SCRIPT = r"""
import datetime, json, os, sys, torch.distributed as dist, torch.multiprocessing as mp
from tests.test_spine_hardening import spec_of
from trainer.checkpoint import CheckpointStore
from trainer.loop import _resume_point

def worker(rank, port, run_dir, data):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    spec = spec_of(run_dir, data)
    try:
        _resume_point(CheckpointStore(spec.checkpoint_root, rank=rank, world_size=2), 2, rank, spec)
        outcome = "no error"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(f"{run_dir}/rank{rank}.txt", "w") as f:
        f.write(outcome)
    dist.barrier()  # neither rank tears gloo down while the other still talks
    os._exit(0)  # no teardown at all: gloo's threads at exit aborted a loaded machine's run ("terminate called")

if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])), nprocs=2, join=True)
"""


def test_every_rank_names_the_damaged_file_when_rank_0s_conversion_fails(damaged, digits_data, tmp_path):
    """A one-rank checkpoint resumed on two ranks: rank 0 converts it, and fails on a truncated file. Rank 1 waited
    in a barrier until the group's timeout; now it raises too, with rank 0's message. A subprocess: forking from
    the test process (which holds a Ray driver) breaks Ray."""
    import subprocess
    import sys

    from tests.fixtures_s3 import free_port

    path = os.path.join(damaged, STEP2, "model", "ds", "mp_rank_00_model_states.pt")
    os.truncate(path, 3000)
    script = tmp_path / "convert.py"
    script.write_text(CONVERT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(free_port()), str(tmp_path), json.dumps(digits_data)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith(f"CheckpointError: checkpoint file {path} is unreadable"), rank0
    assert rank1.startswith(f"CheckpointError: converting checkpoint {damaged}/{STEP2} failed on rank 0: "
                            f"checkpoint file {path} is unreadable"), rank1


def test_a_shape_mismatch_still_does_not_fit_and_zero_1_loads_zero_2(damaged, digits_data, tmp_path):
    wider = spec_of(tmp_path, digits_data, "model.transformer.d_model=32")
    with pytest.raises(CheckpointError, match=r"(?s)network .model. does not fit this model \(RuntimeError: .*size mismatch"):
        CheckpointStore(damaged).load(STEP2, engines_of(wider), expect_family="image_gpt")
    stage1 = spec_of(tmp_path, digits_data, "zero.stage=1")
    meta = CheckpointStore(damaged).load(STEP2, engines_of(stage1), expect_family="image_gpt", zero_stage=1,
                                         model_config=stage1.model)
    assert meta.step == 2 and meta.zero_stage == 2


def test_next_epoch_after_an_epoch_boundary_does_not_skip_an_epoch():
    saved = {"data": "100 samples, shards ab", "seed": 0}
    changed = {**saved, "seed": 1}
    assert resume_position(saved, changed, StreamState(3, 0), "ckpt", "next_epoch") == StreamState(3, 0)
    assert resume_position(saved, changed, StreamState(3, 1), "ckpt", "next_epoch") == StreamState(4, 0)


@pytest.mark.parametrize("name", ["eval_batches", "num_samples"])
def test_eval_batches_and_num_samples_must_be_positive(name):
    with pytest.raises(ValueError, match=rf"trainer.{name} must be >= 1, got 0"):
        TrainerConfig(**{name: 0})
    with pytest.raises(ConfigError, match=rf"trainer.{name} must be >= 1, got 0"):
        load_config(CONFIG, [f"trainer.{name}=0"])


def test_a_metrics_record_cut_short_is_dropped_not_glued_to_the_next(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n"
    path.write_text(whole + '{"step": 2, "split": "tr')  # the crash came mid-write
    reporter = Reporter(str(tmp_path), total_steps=4, global_batch=8, enabled=True, first_step=1)
    reporter.scalars(2, "train", {"loss": 1.5})
    reporter.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5)]
    # a whole record that only lost its newline is kept, and ended
    path.write_text(whole.rstrip("\n"))
    Reporter(str(tmp_path), total_steps=4, global_batch=8, enabled=True, first_step=1).close()
    assert path.read_text() == whole


def test_torchrun_workers_take_the_gpu_of_their_local_rank():
    """torchrun shows every GPU to every process: without set_device(LOCAL_RANK) all ranks would share GPU 0.
    Ray Train pins its workers' devices itself, so outside torchrun nothing is chosen."""
    assert torchrun_cuda_index({"LOCAL_RANK": "3"}, 8) is None
    assert torchrun_cuda_index({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "3"}, 8) == 3
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=2, but this node shows 2 GPU\(s\).*--nproc_per_node <= 2"):
        torchrun_cuda_index({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "2"}, 2)


SHARE_SCRIPT = r"""
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from trainer.families.base import StepContext

def worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    per_sample = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 5.0])][rank]  # rank 0: padding only
    valid = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])][rank]  # one real sample in the batch
    ctx = StepContext(step=1, rank=rank, world_size=2, device=torch.device("cpu"), dtype=torch.float32)
    weighted = (per_sample * valid).sum() / valid.sum().clamp(min=1) * ctx.batch_share(valid.sum())
    dist.all_reduce(weighted)  # DeepSpeed's mean over ranks, as it treats gradients
    with open(f"{out}/rank{rank}.txt", "w") as f:  # a file each: two ranks printing interleave their lines
        f.write(str(float(weighted) / 2))
    dist.destroy_process_group()

if __name__ == "__main__":
    out = sys.argv[2]
    mp.spawn(worker, args=(int(sys.argv[1]), out), nprocs=2, join=True)
"""


def test_a_padded_last_batch_averages_over_real_samples_not_ranks(tmp_path):
    """DeepSpeed averages the ranks' gradients with equal weight: without each rank's share, a batch with one real
    sample on 2 ranks trained at half the rate it does on one rank (the result depended on the world size). Run in
    a process of its own: forking helpers from the test process (which holds a Ray driver) broke its GCS link."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "share.py"
    script.write_text(SHARE_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    values = [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert values == [pytest.approx(3.0)] * 2  # the one real sample's loss, as on one rank


def test_a_resume_off_the_accumulation_grid_is_refused(tmp_path):
    """DeepSpeed restarts its micro-step count at 0 on load: a step-6 checkpoint resumed with grad_accum=4 put
    every later boundary mid-way (steps 10, 14...), and checkpoints at 8 and 12 dropped gathered gradients."""
    import dataclasses
    import json

    from trainer.checkpoint import CheckpointMeta
    from trainer.loop import _resume_point

    cfg, raw = load_config(CONFIG, [f"run_dir={tmp_path}", "zero.grad_accum=4", "trainer.steps=12",
                                    "trainer.checkpoint_every=4"])
    spec = run_spec(cfg, raw)
    tag = os.path.join(spec.checkpoint_root, "step-00000006")
    os.makedirs(tag)
    meta = CheckpointMeta(step=6, stream_state={}, world_size=1, family=spec.family, engines=["model"],
                          zero_stage=spec.zero.stage, config=raw, data_info={})
    with open(os.path.join(tag, "meta.json"), "w") as f:
        json.dump(dataclasses.asdict(meta), f)
    with open(os.path.join(spec.checkpoint_root, "latest"), "w") as f:
        f.write("step-00000006")
    with pytest.raises(ConfigError, match=r"step-00000006 is at step 6, not a multiple of zero.grad_accum=4"):
        _resume_point(CheckpointStore(spec.checkpoint_root), 1, 0, spec)


def test_a_restart_before_the_first_checkpoint_does_not_double_tensorboard(tmp_path):
    """Ray Train restarts the workers (max_failures) from step 0 when no checkpoint exists yet: TensorBoard must
    drop the first attempt's records, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for attempt in (10.0, 20.0):
        if attempt > 10.0:  # TensorBoard orders event files by name, whose first key is the second they were made
            time.sleep(1.05)  # in: within one second it fell to the writer counter, where "10" sorts before "9"
        reporter = Reporter(str(tmp_path), total_steps=3, global_batch=8, enabled=True, first_step=0)
        for step in (1, 2, 3):
            reporter.scalars(step, "train", {"loss": attempt + step})
        reporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 21.0), (2, 22.0), (3, 23.0)]


def _train_losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _resume_from(run: str, tag: str) -> None:
    """Make ``run`` a run that stopped at checkpoint ``tag``: later checkpoints and the summary removed."""
    root = os.path.join(run, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step-") and name > tag:
            shutil.rmtree(os.path.join(root, name))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)
    os.remove(os.path.join(run, "summary.json"))


def test_a_resume_with_dropout_repeats_the_losses(world1, digits_data, tmp_path):
    """Every other resume test trains without dropout, so the global RNG the checkpoint restores was never
    needed: not restoring it passed them all."""
    extra = ("trainer.steps=4", "trainer.eval_every=4", "trainer.sample_every=4", "model.transformer.dropout=0.2")
    ref = str(tmp_path / "ref")
    train_worker(spec_of(ref, digits_data, *extra))
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    _resume_from(run, "step-00000002")
    train_worker(spec_of(run, digits_data, *extra))
    want, got = _train_losses(ref), _train_losses(run)
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]


def test_only_the_newest_local_checkpoints_are_kept(world1, digits_data, tmp_path):
    run = str(tmp_path / "run")
    train_worker(spec_of(run, digits_data, "trainer.steps=4", "trainer.checkpoint_every=1",
                         "trainer.keep_checkpoints=2", "trainer.eval_every=4", "trainer.sample_every=4"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step-00000003", "step-00000004"]


def test_accumulation_steps_the_optimizer_once_per_accumulated_batches(world1, digits_data, tmp_path):
    """zero.grad_accum was only checked as config: 4 micro-batch steps at accumulation 2 are 2 optimizer steps, and
    a tiny zero.grad_clip shrinks the update (Adam's step is scale-free except for eps)."""
    moved = {}
    for name, extra in (("plain", ()), ("accum", ("zero.grad_accum=2",)), ("clip", ("zero.grad_clip=1e-12",))):
        run = str(tmp_path / name)
        spec = spec_of(run, digits_data, "trainer.steps=4", "trainer.checkpoint_every=4", "trainer.eval_every=4",
                       "trainer.sample_every=4", *extra)
        train_worker(spec)
        saved = torch.load(os.path.join(run, "checkpoints", "step-00000004", "model", "ds",
                                        "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        torch.manual_seed(spec.trainer.seed)
        init = family_class(spec.family)(spec.model, data_info(load_manifest(spec.train_data))).build_modules()
        moved[name] = (saved["global_steps"], max(float((saved["module"][k].float() - v.float()).abs().max())
                                                  for k, v in init["model"].state_dict().items()))
    assert moved["plain"][0] == 4 and moved["accum"][0] == 2 and moved["clip"][0] == 4
    assert moved["clip"][1] < moved["plain"][1] / 100, moved


def test_held_out_metrics_weigh_each_real_sample_once(digits_data, tmp_path):
    """The last held-out batch is padded; counting its padding as samples (weighting each batch by its size)
    over-weighted its real ones, and no test evaluated a padded batch."""
    import types

    from data_pipeline.codecs import build_codec
    from data_pipeline.stream import RankStream
    from trainer.loop import _eval

    spec = spec_of(str(tmp_path / "run"), digits_data, "trainer.eval_batches=1000", "data.stream.global_batch=48")
    manifest = load_manifest(spec.eval_data)
    assert manifest.total % 48, "the held-out set must end in a padded batch"
    torch.manual_seed(0)
    family = family_class(spec.family)(spec.model, data_info(manifest))
    modules = family.build_modules()
    got = _eval(family, {k: types.SimpleNamespace(module=m) for k, m in modules.items()}, manifest, spec, 0, 1,
                build_codec(manifest.codec["name"]).decode, torch.device("cpu"))
    stream = RankStream(manifest, dataclasses.replace(spec.stream, drop_last=False), build_codec("image").decode, 0, 1)
    real = [s for batch in stream.iterate(max_epochs=1) for s in batch if s.get("valid", True)]
    assert len(real) == manifest.total
    with torch.no_grad():
        want = family.evaluate({k: m.eval() for k, m in modules.items()}, family.collate(real))["loss"]
    assert got["loss"] == pytest.approx(want, rel=1e-5)
