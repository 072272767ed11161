"""A run's record of where it keeps its checkpoints: resume, export and the gap monitor find them without
repeating checkpoint_root; another explicit root is refused while the recorded one holds a checkpoint."""

import json
import os

import pytest

import launch.train
from data_pipeline.s3 import StorageError
from launch.config import load_config
from launch.gap_monitor import load_monitor_config
from launch.run_record import RUN_RECORD, checkpoint_root_of, record_checkpoint_root
from launch.train import run_training
from trainer.typed_config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_igpt.yaml")


def config(run_dir, *overrides):
    return load_config(CONFIG, [f"run_dir={run_dir}", *overrides])[0]


def with_checkpoint(root) -> str:
    """A checkpoint root whose ``latest`` names a complete checkpoint (all that resolving a root reads)."""
    (root / "step-00000001").mkdir(parents=True)
    (root / "step-00000001" / "meta.json").write_text("{}")
    (root / "latest").write_text("step-00000001")
    return str(root)


@pytest.fixture
def no_ray(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch.train, "ensure_ray", started)


def test_without_a_record_the_configs_root_is_used(tmp_path):
    assert checkpoint_root_of(config(tmp_path)) == os.path.join(str(tmp_path), "checkpoints")


def test_a_recorded_root_is_found_when_none_is_given_and_another_is_refused_while_it_holds_a_checkpoint(
        tmp_path, capsys):
    run, elsewhere = tmp_path / "run", with_checkpoint(tmp_path / "ckpt")
    record_checkpoint_root(str(run), elsewhere)
    assert checkpoint_root_of(config(run)) == elsewhere
    assert f"keeps its checkpoints at {elsewhere} ({run}/{RUN_RECORD})" in capsys.readouterr().out
    assert checkpoint_root_of(config(run, f"checkpoint_root={elsewhere}/")) == elsewhere  # one root, two spellings
    with pytest.raises(ConfigError, match=rf"checkpoint_root={tmp_path}/other: the run in .* keeps its checkpoints "
                                          rf"at {elsewhere} .*or delete {RUN_RECORD} to start this one over"):
        checkpoint_root_of(config(run, f"checkpoint_root={tmp_path}/other"))


def test_a_recorded_root_without_a_checkpoint_gives_way_to_an_explicit_one(tmp_path):
    """A first attempt that failed before its first checkpoint does not pin the root."""
    record_checkpoint_root(str(tmp_path), str(tmp_path / "never-written"))
    assert checkpoint_root_of(config(tmp_path, f"checkpoint_root={tmp_path}/new")) == str(tmp_path / "new")


def test_a_copied_run_folder_keeps_its_own_checkpoints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    record_checkpoint_root(str(a), str(a / "checkpoints"))
    assert json.loads((a / RUN_RECORD).read_text()) == {"checkpoint_root": "checkpoints"}
    b.mkdir()
    (b / RUN_RECORD).write_text((a / RUN_RECORD).read_text())
    assert checkpoint_root_of(config(b)) == str(b / "checkpoints")


def test_a_root_equal_to_the_run_dir_reads_back_as_itself(tmp_path):
    record_checkpoint_root(str(tmp_path), str(tmp_path))
    assert json.loads((tmp_path / RUN_RECORD).read_text()) == {"checkpoint_root": "."}
    assert checkpoint_root_of(config(tmp_path, f"checkpoint_root={tmp_path}")) == str(tmp_path)


def test_an_unreadable_record_is_named(tmp_path):
    (tmp_path / RUN_RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{tmp_path}/{RUN_RECORD}: unreadable run record"):
        checkpoint_root_of(config(tmp_path))


def test_the_gap_monitor_watches_the_recorded_root(tmp_path):
    """With run_dir alone it watched <run_dir>/checkpoints, empty for a run that checkpoints elsewhere."""
    elsewhere = with_checkpoint(tmp_path / "ckpt")
    record_checkpoint_root(str(tmp_path / "run"), elsewhere)
    assert load_monitor_config(None, [f"run_dir={tmp_path}/run"]).root == elsewhere


def test_training_under_another_root_is_refused_before_ray_starts(tmp_path, digits_data, no_ray):
    """The mistake that restarted an S3-checkpointed run at step 0 and dropped its metrics history."""
    run, kept = tmp_path / "run", with_checkpoint(tmp_path / "ckpt")
    record_checkpoint_root(str(run), kept)
    cfg, raw = load_config(CONFIG, [f"run_dir={run}", f"data.train={digits_data['train']}",
                                    f"data.eval={digits_data['holdout']}", f"checkpoint_root={tmp_path}/elsewhere"])
    with pytest.raises(ConfigError, match=f"keeps its checkpoints at {kept}"):
        run_training(cfg, raw)
    assert json.loads((run / RUN_RECORD).read_text()) == {"checkpoint_root": kept}


def test_a_mistyped_s3_root_is_refused_before_it_becomes_a_local_folder(tmp_path, digits_data, no_ray, monkeypatch):
    """`checkpoint_root=s3:/bucket/ckpt` was made absolute first (/cwd/s3:/bucket/ckpt), so storage never saw it."""
    monkeypatch.chdir(tmp_path)
    cfg, raw = load_config(CONFIG, [f"run_dir={tmp_path}/run", f"data.train={digits_data['train']}",
                                    f"data.eval={digits_data['holdout']}", "checkpoint_root=s3:/bucket/ckpt"])
    with pytest.raises(StorageError, match="s3:/bucket/ckpt: looks like a s3:// URL with a slash missing"):
        run_training(cfg, raw)
    assert sorted(os.listdir(tmp_path)) == []
