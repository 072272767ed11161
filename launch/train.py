"""`dgm train`: an embedded local Ray cluster (or an existing one) runs a Ray Train worker group of the loop."""

from __future__ import annotations

import json
import os
from typing import Any

from data_pipeline.manifest import load_manifest
from launch.config import ExperimentConfig
from trainer.loop import SUMMARY, RunSpec, train_worker

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: CPU accelerator for DeepSpeed, the project's extension cache."""
    env = {
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                               os.path.join(PROJECT_ROOT, ".cache", "torch_extensions")),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
        # Ray Train would also route print() through its logger, so every progress line reached the console twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    for key in ("DGM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "AWS_PROFILE", "OMP_NUM_THREADS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def ensure_ray(address: str = "", object_store_mb: int = 256) -> bool:
    """Connect to ``address``, or start an in-process local cluster sized to this machine. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
        return False
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=object_store_mb << 20,
             runtime_env={"env_vars": worker_env()}, log_to_driver=True, configure_logging=False)
    return True


def absolute(url: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URLs and empty strings unchanged."""
    return url if not url or "://" in url else os.path.abspath(url)


def run_spec(cfg: ExperimentConfig, raw: dict[str, Any], stop_after: int = 0) -> RunSpec:
    run_dir = os.path.abspath(cfg.run_dir)
    return RunSpec(run_dir=run_dir, checkpoint_root=absolute(cfg.checkpoints), family=cfg.family, model=cfg.model,
                   train_data=absolute(cfg.data.train), eval_data=absolute(cfg.data.eval), stream=cfg.data.stream,
                   zero=cfg.zero, trainer=cfg.trainer, config=raw, stop_after=stop_after)


def _loop(config: dict[str, Any]) -> None:
    import ray.train

    os.environ.update(config.get("env", {}))
    summary = train_worker(config["spec"])
    ray.train.report({k: v for k, v in summary.items() if k != "losses"})


def run_training(cfg: ExperimentConfig, raw: dict[str, Any], stop_after: int = 0) -> dict[str, Any]:
    """Validate the data, then run the worker group to the end; returns rank 0's final metrics."""
    if not cfg.data.train:
        raise ValueError("data.train: no training data set given (a folder or s3:// URL with a manifest.json)")
    load_manifest(cfg.data.train)
    if cfg.data.eval:
        load_manifest(cfg.data.eval)
    spec = run_spec(cfg, raw, stop_after)
    os.makedirs(spec.run_dir, exist_ok=True)
    ensure_ray(cfg.cluster.address, cfg.cluster.object_store_mb)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _loop,
        train_loop_config={"spec": spec, "env": worker_env()},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=os.path.join(spec.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as e:
        raise user_error_of(e, cfg.cluster.max_failures) from e
    summary = os.path.join(spec.run_dir, SUMMARY)
    if os.path.exists(summary):
        with open(summary) as f:
            return json.load(f)
    return dict(result.metrics or {})


class TrainingFailed(RuntimeError):
    """The worker group failed more often than cluster.max_failures allows."""


def user_error_of(error: Exception, max_failures: int) -> Exception:
    """The first worker's own error when it is one the user must fix (bad data, checkpoint...), else one line
    saying which ranks failed, why, and that the restart budget is spent."""
    from launch.errors import WORKER_ERRORS

    failures = getattr(error, "worker_failures", {}) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, WORKER_ERRORS):
            return cause
    if not failures:
        return error
    rank, failure = sorted(failures.items())[0]
    reason = next((line for line in str(failure).splitlines() if line.strip()), type(failure).__name__)
    return TrainingFailed(f"training failed after {max_failures} restart(s) allowed by cluster.max_failures: "
                          f"rank {rank}: {type(failure).__name__}: {reason[:300]}")
