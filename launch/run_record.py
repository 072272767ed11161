"""<run_dir>/run.json: where a run keeps its checkpoints, so that resuming, exporting or monitoring it without
repeating ``checkpoint_root`` finds them, instead of starting a new run at step 0 in the same folder (which would
also drop the first run's metrics.jsonl records). A root inside the run folder is recorded relative to it, so a
copied run folder keeps its own checkpoints."""

from __future__ import annotations

import json
import os

from data_pipeline.storage import atomic_write
from launch.config import ExperimentConfig
from trainer.checkpoint import CheckpointStore
from trainer.ray_env import absolute
from trainer.typed_config import ConfigError

RUN_RECORD = "run.json"


def _same(a: str, b: str) -> bool:
    """One root, however spelled: ``run/.`` and ``run``, ``s3://b/ck/`` and ``s3://b/ck``."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(a) == os.path.normpath(b)


def recorded_root(run_dir: str) -> str | None:
    """The checkpoint root run_dir's record names (made absolute), or None when there is no record."""
    path = os.path.join(os.path.abspath(run_dir), RUN_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)["checkpoint_root"]
        if not isinstance(recorded, str) or not recorded:
            raise TypeError(f"checkpoint_root is {recorded!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable run record ({e}); delete it to let the config say where the run's "
                          "checkpoints are") from e
    if "://" in recorded:
        return recorded
    return os.path.normpath(os.path.join(os.path.dirname(path), recorded))


def resolve_root(run_dir: str, explicit: str, default: str) -> str:
    """The run's checkpoint root. No record: ``explicit or default``. A record and no explicit root: the recorded
    one (said on stdout). A record and another explicit root: refused while the recorded one holds a checkpoint
    (the run would start over beside it), else the explicit one."""
    given = absolute(explicit or default)
    recorded = recorded_root(run_dir)
    if recorded is None or _same(recorded, given):
        return given
    record = os.path.join(os.path.abspath(run_dir), RUN_RECORD)
    if not explicit:
        print(f"[run] {run_dir} keeps its checkpoints at {recorded} ({record})", flush=True)
        return recorded
    if CheckpointStore(recorded).latest() is None:
        return given
    raise ConfigError(f"checkpoint_root={explicit}: the run in {run_dir} keeps its checkpoints at {recorded} "
                      f"({record}); give that checkpoint_root to go on with it, another run_dir for a new run, or "
                      f"delete {RUN_RECORD} to start this one over")


def checkpoint_root_of(cfg: ExperimentConfig) -> str:
    """``resolve_root`` for an experiment config."""
    return resolve_root(cfg.run_dir, cfg.checkpoint_root, os.path.join(cfg.run_dir, "checkpoints"))


def record_checkpoint_root(run_dir: str, checkpoint_root: str) -> None:
    """Write the record (an existing one is replaced: ``resolve_root`` decided this root is the run's)."""
    os.makedirs(run_dir, exist_ok=True)
    inside = "://" not in checkpoint_root and os.path.commonpath([run_dir, checkpoint_root]) == run_dir
    body = json.dumps({"checkpoint_root": os.path.relpath(checkpoint_root, run_dir) if inside else checkpoint_root},
                      indent=1).encode()
    atomic_write(os.path.join(run_dir, RUN_RECORD), lambda f: f.write(body))
