"""A run's record of where it keeps its checkpoints: resume and export find them without repeating
checkpoint_root, and another explicit root is refused instead of starting a new run in the same folder."""

import json
import os

import pytest

import launch.train
from launch.config import load_config
from launch.run_record import RUN_RECORD, checkpoint_root_of, record_checkpoint_root
from launch.train import run_training
from trainer.typed_config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_igpt.yaml")


def config(run_dir, *overrides):
    return load_config(CONFIG, [f"run_dir={run_dir}", *overrides])


def test_without_a_record_the_configs_root_is_used(tmp_path):
    cfg, _ = config(tmp_path)
    assert checkpoint_root_of(cfg) == os.path.join(str(tmp_path), "checkpoints")


def test_a_recorded_root_is_found_when_none_is_given_and_another_is_refused(tmp_path, capsys):
    record_checkpoint_root(str(tmp_path), "s3://bucket/ckpt")
    cfg, _ = config(tmp_path)
    assert checkpoint_root_of(cfg) == "s3://bucket/ckpt"
    assert f"keeps its checkpoints at s3://bucket/ckpt ({tmp_path}/{RUN_RECORD})" in capsys.readouterr().out
    assert checkpoint_root_of(config(tmp_path, "checkpoint_root=s3://bucket/ckpt")[0]) == "s3://bucket/ckpt"
    with pytest.raises(ConfigError, match=r"checkpoint_root=s3://bucket/other: the run in .* keeps its checkpoints at "
                                          r"s3://bucket/ckpt .*give that checkpoint_root to go on with it"):
        checkpoint_root_of(config(tmp_path, "checkpoint_root=s3://bucket/other")[0])


def test_a_copied_run_folder_keeps_its_own_checkpoints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    record_checkpoint_root(str(a), str(a / "checkpoints"))
    assert json.loads((a / RUN_RECORD).read_text()) == {"checkpoint_root": "checkpoints"}
    b.mkdir()
    (b / RUN_RECORD).write_text((a / RUN_RECORD).read_text())
    assert checkpoint_root_of(config(b)[0]) == str(b / "checkpoints")


def test_an_unreadable_record_is_named(tmp_path):
    (tmp_path / RUN_RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{tmp_path}/{RUN_RECORD}: unreadable run record"):
        checkpoint_root_of(config(tmp_path)[0])


def test_training_under_another_root_is_refused_before_ray_starts(tmp_path, digits_data, monkeypatch):
    """The mistake that restarted an S3-checkpointed run at step 0 and dropped its metrics history."""
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    record_checkpoint_root(str(tmp_path), "s3://bucket/ckpt")
    cfg, raw = config(tmp_path, f"data.train={digits_data['train']}", f"data.eval={digits_data['holdout']}",
                      f"checkpoint_root={tmp_path}/elsewhere")
    with pytest.raises(ConfigError, match="keeps its checkpoints at s3://bucket/ckpt"):
        run_training(cfg, raw)
    assert json.loads((tmp_path / RUN_RECORD).read_text()) == {"checkpoint_root": "s3://bucket/ckpt"}
