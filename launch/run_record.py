"""<run_dir>/run.json: where a run keeps its checkpoints, so that resuming or exporting it without repeating
``checkpoint_root`` finds them, instead of starting a new run at step 0 in the same folder (which would also drop
the first run's metrics.jsonl records). A root inside the run folder is recorded relative to it, so a copied run
folder keeps its own checkpoints."""

from __future__ import annotations

import json
import os

from data_pipeline.storage import atomic_write
from launch.config import ExperimentConfig
from trainer.ray_env import absolute
from trainer.typed_config import ConfigError

RUN_RECORD = "run.json"


def checkpoint_root_of(cfg: ExperimentConfig) -> str:
    """The run's checkpoint root: the recorded one when the config does not set ``checkpoint_root`` (said on
    stdout), the config's own when it agrees or nothing was recorded; another explicit one is refused."""
    given = absolute(cfg.checkpoints)
    path = os.path.join(os.path.abspath(cfg.run_dir), RUN_RECORD)
    if not os.path.exists(path):
        return given
    try:
        with open(path) as f:
            recorded = json.load(f)["checkpoint_root"]
        if not isinstance(recorded, str) or not recorded:
            raise TypeError(f"checkpoint_root is {recorded!r}")
        if "://" not in recorded and not os.path.isabs(recorded):
            recorded = os.path.join(os.path.dirname(path), recorded)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable run record ({e}); delete it if the run's checkpoints are at "
                          f"{given}") from e
    if recorded == given:
        return given
    if not cfg.checkpoint_root:
        print(f"[run] {cfg.run_dir} keeps its checkpoints at {recorded} ({path})", flush=True)
        return recorded
    raise ConfigError(f"checkpoint_root={cfg.checkpoint_root}: the run in {cfg.run_dir} keeps its checkpoints at "
                      f"{recorded} ({path}); give that checkpoint_root to go on with it, or another run_dir for a "
                      "new run")


def record_checkpoint_root(run_dir: str, checkpoint_root: str) -> None:
    """Write the record once the run is about to start (an existing one already names this root)."""
    os.makedirs(run_dir, exist_ok=True)
    inside = "://" not in checkpoint_root and os.path.commonpath([run_dir, checkpoint_root]) == run_dir
    body = json.dumps({"checkpoint_root": os.path.relpath(checkpoint_root, run_dir) if inside else checkpoint_root},
                      indent=1).encode()
    atomic_write(os.path.join(run_dir, RUN_RECORD), lambda f: f.write(body))
