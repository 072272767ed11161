"""`dgm train`: an embedded local Ray cluster (or an existing one) runs a Ray Train worker group of the loop."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from data_pipeline.manifest import load_manifest
from data_pipeline.storage import folder_problem
from launch.config import ExperimentConfig
from launch.run_record import checkpoint_root_of, record_checkpoint_root
from sharding.sample_order import OrderError, check_batch_split, rank_partitions
from trainer.checkpoint import CheckpointStore
from trainer.families import family_class
from trainer.loop import SUMMARY, RunSpec, check_eval_size, check_resume, data_info, train_worker
from trainer.ray_env import PROJECT_ROOT, absolute, ensure_ray, env_flag, worker_env
from trainer.typed_config import ConfigError

__all__ = ["PROJECT_ROOT", "TrainingFailed", "absolute", "ensure_ray", "run_spec", "run_training", "user_error_of",
           "worker_env"]


def run_spec(cfg: ExperimentConfig, raw: dict[str, Any], stop_after: int = 0, checkpoint_root: str = "") -> RunSpec:
    """The workers' view of a run. The config each checkpoint records names the data sets by the absolute URLs
    read (a gap monitor or export elsewhere reads ``data.eval`` from it; a relative path would be its own cwd's)."""
    run_dir = os.path.abspath(cfg.run_dir)
    train, held_out = absolute(cfg.data.train), absolute(cfg.data.eval)
    recorded = dict(raw)
    data = recorded.get("data")
    if isinstance(data, dict):
        recorded["data"] = {**data, **{k: v for k, v in (("train", train), ("eval", held_out)) if k in data}}
    return RunSpec(run_dir=run_dir, checkpoint_root=checkpoint_root or absolute(cfg.checkpoints), family=cfg.family,
                   model=cfg.model, train_data=train, eval_data=held_out, stream=cfg.data.stream,
                   zero=cfg.zero, trainer=cfg.trainer, config=recorded, stop_after=stop_after)


def torch_threads(assigned_cpus: float | None, omp_num_threads: str | None = None) -> int | None:
    """Intra-op threads for a rank that reserved ``assigned_cpus`` CPUs (None: leave torch's choice). Clusters
    started by `ray up` run everything under OMP_NUM_THREADS=1 (Ray's command runner exports it), which torch would
    take, so a 16-CPU rank trained on one thread; an OMP_NUM_THREADS other than 1 is the user's and is kept."""
    if not assigned_cpus or omp_num_threads not in (None, "", "1"):
        return None
    return max(1, int(assigned_cpus))


def _loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch

    os.environ.update(config.get("env", {}))
    threads = torch_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"),
                            os.environ.get("OMP_NUM_THREADS"))
    if threads is not None:
        torch.set_num_threads(threads)
    summary = train_worker(config["spec"])
    ray.train.report({k: v for k, v in summary.items() if k != "losses"})


def run_training(cfg: ExperimentConfig, raw: dict[str, Any], stop_after: int = 0) -> dict[str, Any]:
    """Validate the data, then run the worker group to the end; returns rank 0's final metrics."""
    if not cfg.data.train:
        raise ValueError("data.train: no training data set given (a folder or s3:// URL with a manifest.json)")
    manifest = load_manifest(cfg.data.train)
    eval_manifest = load_manifest(cfg.data.eval) if cfg.data.eval else None
    if eval_manifest is not None:  # refused here, not at the first eval (where every resume would meet it again)
        check_eval_size(eval_manifest, cfg.data.stream.global_batch, cfg.data.eval)
    # the model against its data (codec, image size, vocabularies), as every rank will check it: before Ray starts
    family = family_class(cfg.family)(cfg.model, data_info(manifest, eval_manifest))
    family.check_labels(family.data_info, cfg.data.train)
    if eval_manifest is not None:
        family.check_labels(data_info(eval_manifest), cfg.data.eval)
        family.check_eval_data(data_info(eval_manifest), cfg.data.eval)
    # every rank checks how the data splits over the world; checked here too, before a cluster starts for nothing
    try:
        check_batch_split(cfg.data.stream.global_batch, cfg.cluster.workers)
        rank_partitions(cfg.data.stream.partitions, cfg.cluster.workers, 0)
    except OrderError as e:
        raise ConfigError(f"data.stream with cluster.workers={cfg.cluster.workers}: {e}") from e
    if stop_after % cfg.zero.grad_accum:
        raise ConfigError(f"--stop-after {stop_after}: not a multiple of zero.grad_accum={cfg.zero.grad_accum} (the "
                          "checkpoint it saves must fall where the optimizer has just stepped)")
    if not cfg.cluster.address:
        check_object_store(cfg.cluster.object_store_mb)
    check_folder(cfg.run_dir, "run_dir")
    check_folder(cfg.checkpoint_root, "checkpoint_root")
    spec = run_spec(cfg, raw, stop_after, checkpoint_root_of(cfg))
    # a missing bucket, a broken ``latest`` or a checkpoint this run cannot resume from (another model, ZeRO stage
    # or sample order) fails here, not in every worker after the cluster started
    check_resume(CheckpointStore(spec.checkpoint_root), spec, cfg.cluster.workers, manifest)
    if cfg.zero.precision == "fp16" and not cfg.cluster.use_gpu:
        raise ConfigError("zero.precision=fp16: DeepSpeed trains fp16 on GPUs only (cluster.use_gpu=true); on CPUs "
                          "use bf16 or fp32")
    record_checkpoint_root(spec.run_dir, spec.checkpoint_root)
    ensure_ray(cfg.cluster.address, cfg.cluster.object_store_mb)
    if not cfg.cluster.address:
        check_local_resources(cfg)
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _loop,
        train_loop_config={"spec": spec, "env": worker_env(cfg.cluster.use_gpu)},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=os.path.join(spec.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             logging_config=LoggingConfig(log_level=ray_train_log_level())),
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
            metrics = json.load(f)
    else:
        metrics = dict(result.metrics or {})
    return {**metrics, "checkpoint_root": spec.checkpoint_root}


def check_object_store(object_store_mb: int) -> None:
    """The embedded cluster's object store lives in this machine's memory: Ray words a size past it as a negative
    percentage of a negative number of GB."""
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    if object_store_mb > memory_mb // 2:
        raise ConfigError(f"cluster.object_store_mb={object_store_mb}: more than half of this machine's memory "
                          f"({memory_mb:,} MiB), which the training processes need; a few hundred MiB is enough here")


def check_local_resources(cfg: ExperimentConfig) -> None:
    """The embedded cluster has this machine and nothing more: a worker group it cannot place would wait for
    resources forever (Ray Train retries placement without end), so it is refused here, naming the keys."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    need = cfg.cluster.workers * cfg.cluster.cpus_per_worker
    if need > cpus + 1e-9:
        raise ConfigError(f"cluster.workers={cfg.cluster.workers} x cluster.cpus_per_worker="
                          f"{cfg.cluster.cpus_per_worker:g} = {need:g} CPUs, but this machine's Ray cluster has "
                          f"{cpus:g}: lower cluster.cpus_per_worker (fractions work) or cluster.workers")
    if cfg.cluster.use_gpu and gpus < cfg.cluster.workers:
        raise ConfigError(f"cluster.use_gpu=true with cluster.workers={cfg.cluster.workers} needs a GPU per worker, "
                          f"but this machine's Ray cluster has {gpus:g} GPUs")


_COLLECTIVE = re.compile(r"gloo|nccl|connection (closed|reset) by peer|processgroup|broken pipe", re.IGNORECASE)
DEBUG_VAR = "DGM_DEBUG"


def debug_requested() -> bool:
    """DGM_DEBUG=1: Ray Train's console logs at DEBUG."""
    return env_flag(DEBUG_VAR)


def ray_train_log_level() -> str:
    """Ray Train's console level for a run: INFO, its own, by default. Quieter would hide all it says about a
    worker group waiting for resources or restarting after a failure (both INFO); its failure report repeats the
    workers' tracebacks, which the one-line error after it sums up (``user_error_of``)."""
    return "DEBUG" if debug_requested() else "INFO"


def check_folder(path: str, key: str) -> None:
    """A local folder a run will write into must be one, or be creatable: a file there (or above it) failed only
    at the first checkpoint, after every step before it."""
    problem = folder_problem(path) if path else None
    if problem:
        raise ConfigError(f"{key}={path}: {problem}, not a folder; give a folder (or a new path) for it")


class TrainingFailed(RuntimeError):
    """The worker group failed more often than cluster.max_failures allows."""


def own_error(failure: BaseException) -> BaseException:
    """The error a rank met itself, out of the wrappers Ray puts around it (a failed health check around the
    dead actor, a task error around the raised exception, a traceback holder around the user's exception)."""
    for _ in range(5):
        inner = next((e for e in (getattr(failure, attr, None) for attr in ("health_check_failure", "_base_exc",
                                                                             "cause"))
                      if isinstance(e, BaseException)), None)
        if inner is None:
            break
        failure = inner
    return failure


def _first_line(failure: BaseException) -> str:
    return next((line for line in str(failure).splitlines() if line.strip()), type(failure).__name__)


def describe_failure(failure: BaseException) -> str:
    """One line for one rank's own error. A rank whose process died has no Python error: Ray's several-line
    actor report is cut to the process and why it ended."""
    from ray.exceptions import RayActorError

    if not isinstance(failure, RayActorError):
        return f"{type(failure).__name__}: {_first_line(failure)[:300]}"
    text = str(failure)
    pid = re.search(r"^\s*pid: (\d+)", text, re.MULTILINE)
    ip = re.search(r"^\s*ip: (\S+)", text, re.MULTILINE)
    process = f"its worker process (pid {pid.group(1)})" if pid else "its worker process"
    process += f" on {ip.group(1)}" if ip else ""
    if "node has died" in text:
        return f"{process} was lost with its node (the machine stopped, was preempted, or lost the network)"
    if "Worker exit type: SYSTEM_ERROR" in text:
        return f"{process} died without a Python error: killed (a signal, the OOM killer) or crashed"
    detail = re.search(r"Worker exit detail: (.+?\.)(\s|$)", text)
    return f"{process} died: {detail.group(1) if detail else _first_line(failure)[:300]}"


def user_error_of(error: Exception, max_failures: int) -> Exception:
    """The first worker's own error when it is one the user must fix (bad data, checkpoint...), else one line
    saying which ranks failed, why, and that the restart budget is spent."""
    from launch.errors import WORKER_ERRORS

    failures = {rank: own_error(f) for rank, f in (getattr(error, "worker_failures", {}) or {}).items()}
    user = sorted(((rank, f) for rank, f in failures.items() if isinstance(f, WORKER_ERRORS)), key=lambda kv: kv[0])
    if user:  # ranks reading other shards can meet other problems: each is the user's to fix, so all are said
        rank, first = user[0]
        others = [(r, f) for r, f in user[1:] if str(f) != str(first)]
        for r, f in others[:3]:
            first.add_note(f"rank {r} met another: {type(f).__name__}: {_first_line(f)[:300]}")
        if len(others) > 3:
            first.add_note(f"and {len(others) - 3} more ranks met other errors")
        return first
    if not failures:
        return error

    # A rank that dies (OOM kill, crash) leaves the others failing in their next collective: name the rank
    # that failed on its own first, and the communication errors as what followed.
    ranked = sorted(failures.items(), key=lambda kv: (_COLLECTIVE.search(_first_line(kv[1])) is not None, kv[0]))
    said = "; ".join(f"rank {rank}: {describe_failure(failure)}"
                     + (" (a consequence: its peer is gone)" if _COLLECTIVE.search(_first_line(failure)) else "")
                     for rank, failure in ranked[:4])
    more = f"; and {len(ranked) - 4} more ranks" if len(ranked) > 4 else ""
    return TrainingFailed(f"training failed after {max_failures} restart(s) allowed by cluster.max_failures: "
                          f"{said}{more}")
