"""The errors that are the user's to fix (bad config, data, checkpoint, export, storage): shown as one clear line."""

from __future__ import annotations

from data_pipeline.manifest import DatasetError
from data_pipeline.storage import StorageError
from launch.jobs import ClusterError
from launch.train import TrainingFailed
from sharding.sample_order import OrderError
from trainer.checkpoint import CheckpointError
from trainer.export import ExportError
from trainer.typed_config import ConfigError

WORKER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, StorageError, OrderError, CheckpointError, ExportError,
)
# MemoryError: numpy's "Unable to allocate 74.5 GiB for an array with shape ..." says what to lower
USER_ERRORS: tuple[type[BaseException], ...] = (*WORKER_ERRORS, ClusterError, TrainingFailed, ValueError, FileNotFoundError,
                                               MemoryError)
