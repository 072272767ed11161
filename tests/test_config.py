"""Configs: typed, validated before anything starts, with errors naming the key's full path."""

import os
import shutil

import pytest

from data_pipeline.storage import StorageError
from launch.cli import main
from launch.config import load_config, read_yaml
from trainer.checkpoint import CheckpointError
from trainer.families.image_gpt import ImageGPTConfig
from trainer.typed_config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_igpt.yaml")


def test_every_shipped_config_loads():
    """Experiment configs through load_config; the GAN gap monitor's configs (*_monitor.yaml) through its loader."""
    from launch.gap_monitor import load_monitor_config

    names = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml"))
    assert "demo.yaml" in names
    for name in names:
        path = os.path.join(ROOT, "configs", name)
        if name.endswith("_monitor.yaml"):
            assert load_monitor_config(path, ["run_dir=runs/x"]).gap is not None
            continue
        cfg, _ = load_config(path)
        assert cfg.run_dir and cfg.family


def test_overrides_are_typed_and_nested():
    cfg, raw = load_config(DIGITS, ["trainer.optim.lr=3e-4", "zero.stage=3", "model.transformer.n_layer=2"])
    assert cfg.trainer.optim.lr == pytest.approx(3e-4) and cfg.zero.stage == 3
    assert isinstance(cfg.model, ImageGPTConfig) and cfg.model.transformer.n_layer == 2
    assert raw["zero"]["stage"] == 3


@pytest.mark.parametrize("override, message", [
    ("trainer.optim.lrr=1", r"trainer.optim.lrr: unknown key"),
    ("trainer.steps=fast", r"trainer.steps: expected int, got str 'fast'"),
    ("zero.stage=7", r"^zero.stage must be 0, 1, 2 or 3"),
    ("model.transformer.d_model=30", r"^model.transformer.d_model \(30\) must be divisible by n_head"),
    ("model.transformer.n_head=0", r"^model.transformer.n_head must be >= 1, got 0"),
    ("model.transformer.n_layer=-1", r"^model.transformer.n_layer must be >= 1, got -1"),
    ("model.transformer.d_model=-128", r"^model.transformer.d_model must be >= 1, got -128"),
    ("model.transformer.dropout=1.0", r"^model.transformer.dropout must be in \[0, 1\), got 1.0"),
    ("data.stream.on_corrupt=maybe", r"^data.stream.on_corrupt must be 'error' or 'skip'"),
    ("family=nope", r"family: unknown family 'nope'"),
    ("cluster.use_gpu=3", r"cluster.use_gpu: expected true/false"),
    ("trainer", r"override 'trainer': expected key.path=value"),
    ("data.stream.global_batch=0", r"data.stream.global_batch must be >= 1, got 0"),
    ("data.stream.partitions=0", r"data.stream.partitions must be >= 1, got 0"),
    ("data.stream.cache_max_bytes=-1", r"^data.stream.cache_max_bytes must be >= 1 \(the shard cache's size"),
    ("zero.bucket_elements=0", r"zero.bucket_elements must be >= 1, got 0"),
    ("cluster.max_failures=-1", r"cluster.max_failures must be >= 0, got -1"),
    ("cluster.cpus_per_worker=-1", r"cluster.cpus_per_worker must be > 0"),
    ("cluster.object_store_mb=1", r"cluster.object_store_mb must be >= 75"),
    ("run_dir=s3://b/run", r"run_dir=s3://b/run: a local folder .* checkpoint_root=s3://"),
    ("family=[image_gpt]", r"family: unknown family \['image_gpt'\]"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_mapping_overrides_merge_leading_zeros_are_decimal_and_empty_sections_fill(tmp_path):
    cfg, raw = load_config(os.path.join(ROOT, "configs", "t2i_prior.yaml"), ["zero={stage: 1}"])
    assert cfg.zero.stage == 1 and cfg.zero.grad_clip == 4.0  # the file's other zero keys are kept
    assert load_config(DIGITS, ["trainer.steps=0100"])[0].trainer.steps == 100  # not YAML 1.1's octal 64
    assert load_config(DIGITS, ["name=08"])[0].name == "08"  # not an octal number in YAML: text, as before
    empty = tmp_path / "empty_section.yaml"
    text = open(DIGITS).read()
    assert "\ncluster:\n  workers: 2\n" in text
    empty.write_text(text.replace("\ncluster:\n  workers: 2\n", "\ncluster:\n"))
    assert load_config(str(empty), ["cluster.workers=1"])[0].cluster.workers == 1


def test_a_worker_group_the_local_cluster_cannot_place_or_fp16_on_cpus_is_refused(ray_local, digits_data,
                                                                                  tmp_path):
    import ray
    import torch

    from launch.train import run_training
    from trainer.ray_env import worker_env

    base = [f"run_dir={tmp_path / 'run'}", f"data.train={digits_data['train']}", "data.eval="]
    cpus = int(ray.cluster_resources().get("CPU", 0)) + 1  # one more than this machine's cluster has
    gpus = torch.cuda.device_count() + 1
    for overrides, message in [
        ([f"cluster.workers={cpus}"], rf"cluster.workers={cpus} x cluster.cpus_per_worker=1 = {cpus} CPUs"),
        ([f"cluster.workers={gpus}", "cluster.use_gpu=true", "cluster.cpus_per_worker=0.01"],
         rf"cluster.use_gpu=true with cluster.workers={gpus} needs a GPU"),
        (["zero.precision=fp16"], r"zero.precision=fp16: DeepSpeed trains fp16 on GPUs only")]:
        workers = int(overrides[0].split("=")[1]) if overrides[0].startswith("cluster.workers") else 2
        split = [f"data.stream.global_batch={8 * workers}", f"data.stream.partitions={2 * workers}"]
        cfg, raw = load_config(DIGITS, [*base, *overrides, *split])
        with pytest.raises(ConfigError, match=message):
            run_training(cfg, raw)
    assert worker_env(use_gpu=True)["DS_ACCELERATOR"] == "cuda"  # whatever the driver's CPU runs set


def test_a_zero_stage_the_family_cannot_train_under_is_refused():
    with pytest.raises(ConfigError, match=r"zero.stage: 3, but the slsa_gan family trains with ZeRO stages up to 2 "
                                          r"\(the classifier's EMA copy"):
        load_config(os.path.join(ROOT, "configs", "gan_ring.yaml"), ["zero.stage=3"])
    assert load_config(os.path.join(ROOT, "configs", "gan_ring.yaml"), ["zero.stage=2"])[0].zero.stage == 2


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_config_files_and_overrides_that_cannot_be_read_are_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a folder, not a config file"):
        load_config(str(tmp_path))
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=rf"^{binary}: not a text file"):
        load_config(str(binary))
    with pytest.raises(ConfigError, match=r"^override trainer.steps: value '\[1' is not valid YAML"):
        load_config(DIGITS, ["trainer.steps=[1"])


@pytest.mark.parametrize("override, message", [
    ("trainer.optim.lr=nan", r"^trainer.optim.lr: expected a number, got 'nan'"),
    ("trainer.optim.lr=.nan", r"^trainer.optim.lr: expected a number, got nan"),
    ("trainer.optim.lr=inf", r"^trainer.optim.lr: expected a finite number, got 'inf'"),
    ("trainer.optim.lr=-1", r"trainer.optim: lr and eps must be > 0"),
    ("trainer.optim.beta2=1.5", r"trainer.optim: beta1 and beta2 must be in \[0, 1\)"),
    ("zero.grad_clip=.inf", r"^zero.grad_clip: expected a finite number, got inf"),
    ("zero.grad_clip=-3", r"zero.grad_clip must be a finite number >= 0"),
])
def test_optimizer_and_clipping_values_are_checked_before_anything_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_a_key_given_twice_is_refused_by_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `trainer:` section dropped trainer.steps without a word.
    Keys repeated inside different sections, and keys a merge (<<) brings in, are no repetition."""
    config = tmp_path / "dup.yaml"
    config.write_text("name: x\ntrainer: {steps: 600}\nfamily: image_gpt\ntrainer:\n  log_every: 5\n")
    with pytest.raises(ConfigError, match=rf"^{config}: not valid YAML \(key 'trainer' appears twice \(lines 2 and "
                                          r"4\): the first would be dropped"):
        load_config(str(config))
    config.write_text("name: x\ntrainer: &t {steps: 600, log_every: 5}\ncluster: {workers: 1}\n"
                      "data: {stream: {partitions: 4}, prepare: {stream: 1}}\n")
    assert read_yaml(str(config))["trainer"] == {"steps": 600, "log_every": 5}
    config.write_text("base: &b {steps: 600, log_every: 5}\ntrainer:\n  <<: *b\n  steps: 10\n")
    assert read_yaml(str(config))["trainer"] == {"steps": 10, "log_every": 5}
    # an anchored mapping that overrides its own merge, merged again below: flattened before a check of
    # constructed mappings saw it, which took the override for a repeat
    config.write_text("trainer:\n  optim: &o\n    <<: {lr: 0.001, weight_decay: 0.1}\n    lr: 0.0003\n"
                      "zero: {<<: *o}\n")
    assert read_yaml(str(config))["zero"] == {"lr": 0.0003, "weight_decay": 0.1}


def test_no_float_setting_takes_nan_or_infinity():
    """A family's own float settings had no check of their own: model.text_loss_weight=.nan trained NaN losses
    (every comparison with NaN is false, so `< 0` let it through); model.beta_max=.inf made the dVAE's first loss
    inf * 0 = nan, reported as divergence; model.init_temperature=.inf passed its range check (1 / inf = 0) and
    failed in the workers with a bare 'math domain error'."""
    configs = os.path.dirname(DIGITS)
    prior = os.path.join(configs, "t2i_prior.yaml")
    with pytest.raises(ConfigError, match=r"^model.text_loss_weight: expected a number, got nan"):
        load_config(prior, ["model.text_loss_weight=.nan", "data.train=x"])
    for config, override in (("t2i_dvae.yaml", "model.beta_max=.inf"), ("t2i_clip.yaml", "model.init_temperature=-.inf"),
                             ("t2i_dvae.yaml", "cluster.cpus_per_worker=1e400")):
        key, value = override.split("=")
        with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number, got "):
            load_config(os.path.join(configs, config), [override, "data.train=x"])


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", DIGITS, "trainer.optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgm train: error: trainer.optim.lrr: unknown key") and "Traceback" not in err


def test_cli_sample_refuses_a_non_export(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 2
    assert "not an export folder" in capsys.readouterr().err


def test_cli_refuses_a_split_without_an_output_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "train"
    args = [f"data.train={out}", "data.eval="]
    assert main(["prepare", "configs/t2i_dvae.yaml", *args]) == 2
    assert "data.prepare.splits.eval: no data.eval URL" in capsys.readouterr().err
    assert main(["tokenize", "configs/t2i_prior.yaml", *args]) == 2
    assert "data.tokenize.inputs.eval: no data.eval URL" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("data.prepare.splits.eval.num_samples=0", "data.prepare.splits.eval: shapes: num_samples must be >= 1, got 0"),
    ("data.prepare.splits.eval.bogus=1", "data.prepare.splits.eval: source 'shapes': unknown setting 'bogus'"),
    ("data.prepare.samples_per_shard=0", "data.prepare: samples_per_shard must be >= 1, got 0"),
    ("data.prepare.codec_settings.quality=0", "data.prepare.codec_settings: JPEG quality must be an integer"),
    ("data.prepare.source=shape", "data.prepare.source: unknown data source 'shape'"),
    ("data.prepare.codec=dctt", "data.prepare.codec: unknown codec 'dctt'"),
])
def test_prepare_checks_every_split_before_writing_any(tmp_path, capsys, override, message):
    """A bad eval split is found before the train split's minutes of shards, and named by its key path."""
    args = [f"data.train={tmp_path}/train", f"data.eval={tmp_path}/eval", override]
    assert main(["prepare", "configs/demo.yaml", "--no-ray", *args]) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("=x", r"override '=x': '' is not a key path"), (".steps=1", r"override '.steps=1': '.steps' is not a key path"),
    ("trainer..steps=1", "'trainer..steps' is not a key path"),
    ("trainer.seed=18446744073709551616", r"trainer.seed must be in -2\*\*62..2\*\*62-1"),
])
def test_overrides_without_a_key_path_and_seeds_torch_cannot_take_are_named(override, message):
    """An empty key said ": unknown key"; a seed of 2**64 passed the config and overflowed in the workers."""
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])
    assert load_config(DIGITS, ["trainer.seed=-3"])[0].trainer.seed == -3  # torch takes negative seeds


@pytest.mark.parametrize("train, held_out", [("same", "same/"), ("same", "./same"), ("s3://b/x/", "s3://b/x")])
def test_prepare_refuses_two_splits_in_one_place(tmp_path, capsys, train, held_out):
    """The eval split was written over the train split (with --overwrite, silently; without, after the train
    split's shards)."""
    place = (lambda url: url) if "://" in train else (lambda url: f"{tmp_path}/{url}")
    args = [f"data.train={place(train)}", f"data.eval={place(held_out)}"]
    assert main(["prepare", "configs/demo.yaml", "--no-ray", "--overwrite", *args]) == 2
    assert f"data.train and data.eval are both {place(held_out)}: give each split its own folder" in \
        capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_codec_setting_the_source_makes_void_is_named_by_its_key(tmp_path, capsys):
    config = tmp_path / "folder.yaml"
    config.write_text(f"name: a\ndata:\n  train: {tmp_path}/out\n  prepare:\n    source: image_folder\n"
                      "    codec: dct\n    codec_settings: {resolution: 32, alpha: drop}\n"
                      "    splits: {train: {path: 'builtin:samples'}}\n")
    assert main(["prepare", str(config), "--no-ray"]) == 2
    assert f"{config}: data.prepare.codec_settings: alpha: drop would do nothing for source 'image_folder'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_source_smaller_than_the_codec_is_pointed_at_its_own_size_setting(tmp_path, capsys):
    config = tmp_path / "digits_dct.yaml"
    config.write_text(f"""name: d
run_dir: {tmp_path}/run
family: dctransformer
data:
  train: {tmp_path}/run/train
  prepare:
    source: digits
    codec: dct
    codec_settings: {{resolution: 16}}
    splits:
      train: {{split: train}}
""")
    assert main(["prepare", str(config), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "size 8x8 (HxW) does not match the codec resolution 16x16" in err
    assert "or set the split's 'upscale' so that the source makes images of the codec's size" in err
    assert os.listdir(tmp_path) == ["digits_dct.yaml"]


def test_tokenize_section_needs_the_dvae_export(capsys):
    assert main(["tokenize", "configs/t2i_prior.yaml", "data.tokenize.dvae_export="]) == 2
    assert "data.tokenize.dvae_export" in capsys.readouterr().err


def test_train_checks_the_data_split_over_the_workers_before_starting_ray(digits_data, tmp_path, monkeypatch):
    import launch.train
    from launch.train import run_training

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the data split was checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)

    for override, message in [
        ("data.stream.global_batch=33", "cluster.workers=2: global batch 33 is not divisible by world size 2"),
        ("data.stream.partitions=9", "cluster.workers=2: world size 2 does not divide data.stream.partitions=9"),
    ]:
        cfg, raw = load_config(DIGITS, [f"data.train={digits_data['train']}", "data.eval=",
                                        f"run_dir={tmp_path}", "cluster.workers=2", override])
        with pytest.raises(ConfigError, match=message):
            run_training(cfg, raw)


def test_train_checks_the_model_against_its_data_before_starting_ray(digits_data, tmp_path, monkeypatch):
    """A DCTransformer on image-codec shards failed in every Ray worker, after the cluster had started."""
    import launch.train
    from launch.train import run_training

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the model was checked against its data")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    cfg, raw = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                           [f"data.train={digits_data['train']}", "data.eval=", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="dctransformer trains on DCT shards .* codec is 'image'"):
        run_training(cfg, raw)


def test_train_refuses_a_checkpoint_it_cannot_resume_before_starting_ray(digits_data, tmp_path, monkeypatch):
    """Another model, ZeRO stage or sample order was refused by every rank after the worker group had started:
    a traceback per rank, 49 lines and 20-60 s before the one line that mattered."""
    import dataclasses
    import json

    import launch.train
    from data_pipeline.manifest import load_manifest
    from launch.train import run_spec, run_training
    from trainer.checkpoint import CheckpointMeta
    from trainer.loop import sample_order

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the checkpoint was checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    base = [f"data.train={digits_data['train']}", "data.eval=", f"run_dir={tmp_path}"]
    cfg, raw = load_config(DIGITS, base)
    spec = run_spec(cfg, raw)
    order = sample_order(load_manifest(digits_data["train"]), spec.stream)
    os.makedirs(os.path.join(spec.checkpoint_root, "step-00000004"))
    meta = CheckpointMeta(step=4, stream_state={"epoch": 0, "batch": 4}, world_size=cfg.cluster.workers,
                          family=spec.family, engines=["model"], zero_stage=spec.zero.stage, config=raw,
                          data_info={}, order=order)
    with open(os.path.join(spec.checkpoint_root, "step-00000004", "meta.json"), "w") as f:
        json.dump(dataclasses.asdict(meta), f)
    with open(os.path.join(spec.checkpoint_root, "latest"), "w") as f:
        f.write("step-00000004")
    for override, error, message in [
        ("model.transformer.d_model=32", CheckpointError, r"trained with another model config \(model.transformer"
                                                          r".d_model: 64 -> 32\)"),
        ("zero.stage=3", CheckpointError, r"saved under ZeRO-\d, this run uses ZeRO-3: .* or train this stage in "
                                          "another run_dir"),
        ("data.stream.seed=99", CheckpointError, r"was trained on another sample order \(data.stream.seed: \d+ -> "
                                                 r"99\)"),
    ]:
        cfg, raw = load_config(DIGITS, [*base, override])
        with pytest.raises(error, match=message):
            run_training(cfg, raw)
    zero0 = os.path.join(tmp_path, "zero0")
    shutil.copytree(spec.checkpoint_root, zero0)
    meta_file = os.path.join(zero0, "step-00000004", "meta.json")
    with open(meta_file, "w") as f:
        json.dump({**dataclasses.asdict(meta), "zero_stage": 0, "world_size": 1,
                   "config": {**raw, "zero": {**raw.get("zero", {}), "stage": 0}}}, f)
    cfg, raw0 = load_config(DIGITS, [*base, "zero.stage=0", f"checkpoint_root={zero0}"])
    with pytest.raises(CheckpointError, match=rf"{zero0}/step-00000004 was saved by 1 ranks under ZeRO-0, .*set "
                                              r"cluster.workers=1"):
        run_training(cfg, raw0)
    cfg, raw = load_config(DIGITS, [*base, "data.stream.seed=99", "trainer.on_data_change=next_epoch"])
    with pytest.raises(AssertionError, match="Ray was started"):  # a change the run may go on with: it starts
        run_training(cfg, raw)


def test_train_checks_the_checkpoint_root_before_starting_ray(digits_data, tmp_path, monkeypatch, s3_server):
    """A mistyped bucket would otherwise look like "no checkpoint yet": the run would start over from step 0."""
    import launch.train
    from launch.train import run_training

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the checkpoint root was checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest").write_text("step-00000009")
    for root, error, message in [
        ("s3://no-such-bucket-y/run", StorageError, "no-such-bucket-y/run/latest: bucket not found"),
        (str(broken), CheckpointError, "points at 'step-00000009', which is not a complete checkpoint"),
    ]:
        cfg, raw = load_config(DIGITS, [f"data.train={digits_data['train']}", "data.eval=",
                                        f"run_dir={tmp_path}/run", f"checkpoint_root={root}"])
        with pytest.raises(error, match=message):
            run_training(cfg, raw)


def test_prepare_refuses_a_split_over_a_different_dataset_before_writing_any(digits_data, tmp_path, capsys):
    """data.eval points at a complete data set of another plan: refused, and the train split is not written."""
    eval_copy = str(tmp_path / "eval")
    shutil.copytree(digits_data["holdout"], eval_copy)
    before = sorted(os.listdir(eval_copy))
    args = [f"data.train={tmp_path}/train", f"data.eval={eval_copy}"]
    assert main(["prepare", DIGITS, "--no-ray", *args]) == 2
    assert f"{eval_copy}: already holds a different data set (" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["eval"] and sorted(os.listdir(eval_copy)) == before


def test_gradient_accumulation_needs_steps_and_checkpoints_on_its_boundaries():
    for override, key in [("trainer.steps=10", "trainer.steps: 10"), ("trainer.checkpoint_every=6",
                                                                       "trainer.checkpoint_every: 6")]:
        with pytest.raises(ConfigError, match=rf"{key} is not a multiple of zero.grad_accum=4"):
            load_config(DIGITS, ["zero.grad_accum=4", "trainer.steps=8", "trainer.checkpoint_every=4", override])
    cfg, _ = load_config(DIGITS, ["zero.grad_accum=4", "trainer.steps=8", "trainer.checkpoint_every=4"])
    assert cfg.zero.grad_accum == 4


def test_a_failed_worker_group_names_the_rank_that_failed_on_its_own_first():
    from launch.train import TrainingFailed, user_error_of

    class GroupError(RuntimeError):
        worker_failures = {
            0: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
            1: MemoryError("Task was killed due to the node running low on memory."),
        }

    out = user_error_of(GroupError("worker group failed"), 2)
    assert isinstance(out, TrainingFailed)
    assert str(out) == ("training failed after 2 restart(s) allowed by cluster.max_failures: rank 1: MemoryError: "
                        "Task was killed due to the node running low on memory.; rank 0: RuntimeError: "
                        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "(a consequence: its peer is gone)")


def test_the_recorded_config_names_the_data_by_absolute_urls(tmp_path, monkeypatch, digits_data):
    """A gap monitor (or export) started elsewhere reads data.eval from a checkpoint's config: a relative path
    there would be resolved against its own folder, not the training's."""
    from launch.gap_monitor import load_monitor_config
    from launch.train import run_spec

    monkeypatch.chdir(tmp_path)
    cfg, raw = load_config(DIGITS, ["data.eval=runs/x/eval", "data.train=s3://b/train"])
    spec = run_spec(cfg, raw)
    assert spec.config["data"]["eval"] == str(tmp_path / "runs/x/eval") == spec.eval_data
    assert spec.config["data"]["train"] == "s3://b/train" and raw["data"]["eval"] == "runs/x/eval"
    assert spec.config["model"] == raw["model"]
    os.symlink(digits_data["holdout"], tmp_path / "held")  # a data set there: the monitor checks it at the start
    assert load_monitor_config(None, ["run_dir=r", "eval_data=held"]).eval_data == str(tmp_path / "held")


def test_training_past_the_schedule_is_said_before_it_starts():
    """trainer.steps and trainer.schedule.total_steps are separate: raising only the first trained the extra steps
    at the schedule's floor rate without a word."""
    from trainer.loop import schedule_notice

    cfg = load_config(DIGITS, ["trainer.steps=3000"])[0].trainer
    assert schedule_notice(cfg, 0) == (
        "trainer.steps (3000) runs past trainer.schedule.total_steps (1500): steps 1501..3000 train at the "
        "schedule's floor, 0.1 x the peak rate; set trainer.schedule.total_steps with trainer.steps to decay over "
        "the whole run")
    assert "steps 2001..3000" in schedule_notice(cfg, 2000)  # a resume past the schedule's end
    assert schedule_notice(cfg, 3000) == ""  # nothing left to train
    assert schedule_notice(load_config(DIGITS)[0].trainer, 0) == ""


@pytest.mark.parametrize("name", ["", ".", "..", "a/../b", "/abs", "a//b"])
def test_a_run_name_that_is_no_folder_under_runs_is_refused(name):
    """The run folder is runs/<name>: name= made runs/ itself the run folder, and '..' left it."""
    with pytest.raises(ConfigError, match=r"^name must be a relative folder path under runs/ .*got "):
        load_config(DIGITS, [f"name={name!r}" if name else "name=''"])


def test_a_run_name_may_hold_folders():
    assert load_config(DIGITS, ["name=ablations/lr3", "run_dir=''"])[0].run_dir == os.path.join("runs", "ablations", "lr3")


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_stream_seed_outside_32_bits_is_refused(seed):
    """The sample order's generators take 32 bits: seeds 2**32 apart gave the same order, -1 that of 2**32-1."""
    with pytest.raises(ConfigError, match=rf"^data.stream.seed must be in 0..2\*\*32-1, got {seed}"):
        load_config(DIGITS, [f"data.stream.seed={seed}"])


def test_prepare_overwrite_retires_no_split_before_every_split_passed_its_checks(tmp_path, capsys):
    """--overwrite removed the train split's manifest while it checked it, then the eval split's output failed
    its check: nothing was written, and the train data set no longer loaded."""
    small = ["data.prepare.samples_per_shard=16", "data.prepare.splits.train.num_samples=32",
             "data.prepare.splits.eval.num_samples=16"]
    args = [f"data.train={tmp_path}/train", f"data.eval={tmp_path}/eval", *small]
    assert main(["prepare", "configs/demo.yaml", "--no-ray", *args]) == 0
    (tmp_path / "not_a_folder").write_text("x")
    changed = [f"data.train={tmp_path}/train", f"data.eval={tmp_path}/not_a_folder", *small,
               "data.prepare.splits.train.seed=5"]
    assert main(["prepare", "configs/demo.yaml", "--no-ray", "--overwrite", *changed]) == 2
    assert "not_a_folder: " in capsys.readouterr().err
    assert (tmp_path / "train" / "manifest.json").exists()
