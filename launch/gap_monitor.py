"""The duality-gap monitor: a separate Ray actor (or Ray job) that watches a GAN run's checkpoints.

It polls the run's checkpoint root; every new complete checkpoint (a tag at or before ``latest``, which moves only
once a checkpoint is fully written) is consolidated read-only into fresh modules (DeepSpeed's zero_to_fp32, as
``dgm export`` does), and the proximal and plain duality gaps are estimated on copies against the run's held-out
data (trainer/duality_gap.py). Values go to ``<run_dir>/tensorboard/gap`` (its own event file, so TensorBoard shows
them beside the training losses) and to ``<run_dir>/gap.jsonl``. The monitor writes nothing else (for s3:// roots:
downloads into its own staging folder), holds a fraction of a CPU, and lives independently of the training job:
it keeps going when training fails and is resumed, and stops when it has evaluated the run's last step, after
``idle_timeout_s`` without a new checkpoint, or when asked. Restarted, it skips the tags already in gap.jsonl.

    python -m launch.gap_monitor configs/gan_gap_monitor.yaml run_dir=runs/gan-ring [--address auto] [--detach]
    python -m launch.gap_monitor ... --in-process     # e.g. as a Ray Jobs entrypoint (--entrypoint-num-cpus 0.5)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.codecs import build_codec
from data_pipeline.manifest import DatasetError, load_manifest
from data_pipeline.storage import StorageError
from data_pipeline.stream import RankStream, StreamConfig
from launch.cli import parse_args
from launch.config import read_yaml, set_dotted
from launch.export import consolidated_state
from launch.run_record import resolve_root
from trainer.checkpoint import CheckpointError, CheckpointStore, step_of_tag
from trainer.duality_gap import GapConfig, duality_gaps
from trainer.families import family_class
from trainer.loop import data_info
from trainer.ray_env import absolute
from trainer.typed_config import ConfigError, from_dict

GAP_FILE = "gap.jsonl"
SCALARS = ("proximal", "plain", "m1", "m2", "value_gap", "proximal_lb", "seconds")
"""What TensorBoard shows of each checkpoint's gaps (all of it, with the lambda and step counts, is in gap.jsonl)."""
TRANSIENT_TRIES = 3  # polls a checkpoint whose download or storage read fails is tried in


@dataclass
class MonitorConfig:
    """What to watch and how. Empty ``checkpoint_root``/``eval_data``: taken from the run (its checkpoints folder,
    and the ``data.eval`` recorded in each checkpoint's config); ``stop_at_step`` 0: the run's ``trainer.steps``."""

    run_dir: str = ""
    checkpoint_root: str = ""
    eval_data: str = ""
    gap: GapConfig = field(default_factory=GapConfig)
    max_eval_samples: int = 2048
    poll_s: float = 2.0
    idle_timeout_s: float = 900.0
    stop_at_step: int = 0
    num_cpus: float = 0.5
    threads: int = 1

    def __post_init__(self) -> None:
        if self.max_eval_samples < 2:
            raise ValueError(f"max_eval_samples must be >= 2, got {self.max_eval_samples}")
        timing = (self.poll_s, self.idle_timeout_s, self.num_cpus)
        if not all(math.isfinite(v) and v > 0 for v in timing):
            raise ValueError(f"poll_s, idle_timeout_s and num_cpus must be finite numbers > 0, got {timing}")
        if self.threads < 1 or self.stop_at_step < 0:
            raise ValueError(f"threads must be >= 1 and stop_at_step >= 0 (0: the run's trainer.steps), got {self.threads}, "
                             f"{self.stop_at_step}")

    @property
    def root(self) -> str:
        return self.checkpoint_root or os.path.join(self.run_dir, "checkpoints")


def load_monitor_config(path: str | None, overrides: list[str]) -> MonitorConfig:
    raw: dict[str, Any] = read_yaml(path, overrides) if path else {}
    if not path:
        for o in overrides:
            set_dotted(raw, o)
    cfg = from_dict(MonitorConfig, raw)
    if not cfg.run_dir:
        raise ConfigError("run_dir: the training run to watch is required")
    cfg.run_dir = os.path.abspath(cfg.run_dir)
    cfg.eval_data = absolute(cfg.eval_data)
    if cfg.eval_data:  # a mistyped path failed at every checkpoint, each consolidated first for nothing
        try:
            load_manifest(cfg.eval_data)
        except DatasetError as e:
            raise ConfigError(f"eval_data: {e}") from None
    # the run's own record (run.json) when the monitor is not told: a run resumed from s3:// without repeating
    # checkpoint_root keeps its checkpoints there, not in <run_dir>/checkpoints
    cfg.checkpoint_root = resolve_root(cfg.run_dir, cfg.checkpoint_root, os.path.join(cfg.run_dir, "checkpoints"))
    return cfg


def held_out_batch(family: Any, url: str, limit: int) -> dict[str, torch.Tensor]:
    """Up to ``limit`` samples of a dataset in its fixed order, collated by the family (one batch)."""
    manifest = load_manifest(url)
    family.check_eval_data(data_info(manifest), url)
    codec = build_codec(manifest.codec["name"], manifest.codec.get("settings", {}))
    cfg = StreamConfig(global_batch=min(limit, manifest.total), partitions=1, shuffle_shards=False,
                       drop_last=False, num_workers=0)
    samples: list[dict[str, Any]] = []
    for part in RankStream(manifest, cfg, codec.decode, 0, 1).iterate(max_epochs=1):
        samples.extend(s for s in part if s.get("valid", True))
        if len(samples) >= limit:
            break
    return family.collate(samples[:limit])


class GapMonitor:
    """The polling loop, usable in-process; ``GapMonitorActor`` runs it inside Ray."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.store = CheckpointStore(cfg.root, staging=os.path.join(cfg.run_dir, ".gap-staging"))
        self.stop_event = threading.Event()
        self.writer: Any = None
        self.evaluated = self.failed = 0
        self.done, self.last_step = self._already_done()
        self.attempts: dict[str, int] = {}  # pending tags whose storage reads failed, and how often
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    def _already_done(self) -> tuple[set[str], int]:
        """Tags gap.jsonl already has values (or a skip) for, and the highest step among them (so a monitor
        restarted after the run ended sees it finished instead of waiting out its idle timeout). A tag whose
        entry is an error is evaluated again: the restart is how a user retries after fixing the cause."""
        path = os.path.join(self.cfg.run_dir, GAP_FILE)
        done: set[str] = set()
        last = 0
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        if "proximal" not in entry and "skipped" not in entry:
                            continue
                        done.add(entry["tag"])
                        last = max(last, int(entry.get("step") or 0))
                    except (ValueError, KeyError, TypeError):
                        continue
        return done, last

    def pending(self) -> list[str]:
        """Complete checkpoints not yet evaluated, oldest first."""
        latest = self.store.latest()
        if latest is None:
            return []
        return [t for t in self.store.all_tags()  # an s3:// tag below latest whose upload never finished is no
                if t <= latest and t not in self.done and self.store.is_complete(t)]  # checkpoint to evaluate

    def _record(self, entry: dict[str, Any]) -> None:
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        path = os.path.join(self.cfg.run_dir, GAP_FILE)
        with open(path, "a+b") as f:  # after a line a crash cut short, a new line: not glued to the torn one
            f.seek(0, os.SEEK_END)
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            f.write((("\n" if torn else "") + json.dumps(entry) + "\n").encode())
        self.done.add(entry["tag"])
        self.attempts.pop(entry["tag"], None)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.cfg.run_dir, "tensorboard", "gap"))
        for k, v in values.items():
            self.writer.add_scalar(f"gap/{k}", v, step)
        self.writer.flush()

    def evaluate_tag(self, tag: str) -> dict[str, Any]:
        """Gaps of one checkpoint: consolidated weights -> fresh modules -> evaluator on copies."""
        meta = self.store.read_meta(tag)
        cls = family_class(meta.family)
        family = cls(from_dict(cls.config_cls, (meta.config or {}).get("model") or {}, "model"), meta.data_info)
        if not hasattr(family, "gap_game"):
            raise CheckpointError(f"{self.cfg.root}/{tag}: family {meta.family!r} is not a GAN (no gap_game)")
        if meta.zero_stage == 0:
            raise CheckpointError(f"{self.cfg.root}/{tag}: the monitor reads ZeRO checkpoints (stage >= 1)")
        path = self.store.local_copy(tag)
        modules = family.build_modules()
        for name, module in modules.items():
            module.load_state_dict(consolidated_state(path, name), strict=True)
            module.eval()
        url = self.cfg.eval_data or ((meta.config or {}).get("data") or {}).get("eval") or ""
        if not url:
            raise ConfigError("eval_data: no held-out data set given and the run's config has no data.eval")
        if url not in self._data:
            self._data[url] = held_out_batch(family, url, self.cfg.max_eval_samples)
        game = family.gap_game(modules, self._data[url])
        result = duality_gaps(modules["generator"], modules["discriminator"], game, self.cfg.gap)
        return {"step": meta.step, **result.to_dict()}

    def poll_once(self) -> int:
        """Evaluate every pending checkpoint; returns how many were evaluated (or recorded as failed)."""
        n = 0
        pending = self.pending()
        self.attempts = {t: k for t, k in self.attempts.items() if t in pending}  # deleted meanwhile: not awaited
        for tag in pending:
            if self.stop_event.is_set():
                break
            try:
                entry = {"tag": tag, "time": round(time.time(), 3), **self.evaluate_tag(tag)}
                # value_gap is NaN where V* is unknown (a self-labelled run before every held-out real is labelled)
                self._scalars(entry["step"], {k: entry[k] for k in SCALARS if math.isfinite(entry[k])})
                self.last_step = max(self.last_step, entry["step"])
                self.evaluated += 1
                value_gap = f" |V - V*| {entry['value_gap']:.4f}" if math.isfinite(entry["value_gap"]) else ""
                print(f"[gap] {tag}: DG^lambda {entry['proximal']:.4f} DG {entry['plain']:.4f}{value_gap} "
                      f"({entry['seconds']:.1f}s)", flush=True)
            except (CheckpointError, ConfigError, OSError, ValueError, RuntimeError, KeyError) as e:
                if tag not in self.store.all_tags():
                    entry = {"tag": tag, "time": round(time.time(), 3), "skipped": "deleted before evaluation"}
                else:
                    self.attempts[tag] = self.attempts.get(tag, 0) + 1
                    if isinstance(e, OSError | StorageError) and self.attempts[tag] < TRANSIENT_TRIES:
                        print(f"[gap] {tag}: {type(e).__name__}: {e} (try {self.attempts[tag]} of "
                              f"{TRANSIENT_TRIES}; retried at the next poll)", flush=True)
                        continue  # a download or storage failure may pass: not recorded as done
                    entry = {"tag": tag, "time": round(time.time(), 3), "error": f"{type(e).__name__}: {e}"}
                    self.failed += 1
                    if (step := step_of_tag(tag)) is not None:  # a failed last checkpoint still ends the watch
                        entry["step"] = step
                        self.last_step = max(self.last_step, step)
                print(f"[gap] {tag}: {entry.get('error') or entry['skipped']}", flush=True)
            self._record(entry)
            n += 1
        return n

    def _target_step(self) -> int:
        if self.cfg.stop_at_step:
            return self.cfg.stop_at_step
        latest = self.store.latest()
        if latest is None:
            return 0
        return int(((self.store.read_meta(latest).config or {}).get("trainer") or {}).get("steps") or 0)

    def run(self) -> dict[str, Any]:
        """Poll until the run's last step is evaluated, ``idle_timeout_s`` passes without news, or stop()."""
        torch.set_num_threads(self.cfg.threads)
        last_news = time.monotonic()
        reason, waiting = "stopped", False
        try:
            while not self.stop_event.is_set():
                try:
                    if self.poll_once():
                        last_news = time.monotonic()
                    target = self._target_step()
                    if not target and not waiting:  # a mistyped run_dir waited out idle_timeout_s in silence
                        waiting = True
                        print(f"[gap] no checkpoint under {self.cfg.root} yet; waiting for one (stops after "
                              f"{self.cfg.idle_timeout_s:g} s without a new checkpoint)", flush=True)
                except (CheckpointError, OSError, StorageError) as e:
                    print(f"[gap] cannot read {self.cfg.root} yet: {e}", flush=True)
                    target = 0
                if target and self.last_step >= target and not self.attempts:  # no retry outstanding
                    reason = "finished"
                    break
                if time.monotonic() - last_news > self.cfg.idle_timeout_s:
                    reason = "idle"
                    break
                self.stop_event.wait(self.cfg.poll_s)
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.store.remote:  # the last checkpoint's download (optimizer states included) is not kept
                shutil.rmtree(self.store.staging, ignore_errors=True)
        return {"evaluated": self.evaluated, "failed": self.failed, "last_step": self.last_step, "reason": reason}

    def stop(self) -> None:
        self.stop_event.set()


class GapMonitorActor:
    """The monitor as a Ray actor (threaded: ``stop``/``status`` answer while ``run`` loops)."""

    def __init__(self, cfg: MonitorConfig, exit_when_done: bool = False) -> None:
        self.monitor, self.exit_when_done = GapMonitor(cfg), exit_when_done

    def run(self) -> dict[str, Any]:
        summary = self.monitor.run()
        if self.exit_when_done:
            import ray

            ray.actor.exit_actor()
        return summary

    def stop(self) -> None:
        self.monitor.stop()

    def status(self) -> dict[str, Any]:
        return {"evaluated": self.monitor.evaluated, "last_step": self.monitor.last_step,
                "done": sorted(self.monitor.done)}


def start_monitor(cfg: MonitorConfig, *, detached: bool = False, name: str = "") -> tuple[Any, Any]:
    """Start the monitor actor on the connected Ray cluster with ``cfg.num_cpus`` CPUs; returns (actor, ref of
    its run() summary). A detached actor outlives the driver that started it and exits itself when done."""
    import ray

    from launch.train import worker_env

    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "max_concurrency": 2,
                               "runtime_env": {"env_vars": worker_env()}}
    if detached:
        options.update(lifetime="detached", name=name or f"gap-monitor-{os.path.basename(cfg.run_dir)}")
    actor = ray.remote(GapMonitorActor).options(**options).remote(cfg, detached)
    return actor, actor.run.remote()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.gap_monitor", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None, help="monitor YAML (configs/gan_gap_monitor.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. run_dir=runs/gan-ring gap.lam=0.1")
    parser.add_argument("--address", default="", help="Ray cluster to run on (default: an embedded local one)")
    parser.add_argument("--detach", action="store_true", help="start a detached actor and return at once")
    parser.add_argument("--in-process", action="store_true", help="no Ray: poll in this process")
    args = parse_args(parser, argv)  # `key=value` after a flag is an override too, as for `dgm`
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        cfg = load_monitor_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"gap_monitor: error: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        summary = GapMonitor(cfg).run()
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    import ray

    from launch.train import ensure_ray

    try:
        ensure_ray(args.address)
    except ConfigError as e:
        print(f"gap_monitor: error: {e}", file=sys.stderr)
        return 2
    actor, ref = start_monitor(cfg, detached=args.detach)
    if args.detach:
        print(f"[gap] monitor started (detached) for {cfg.run_dir}; values in {cfg.run_dir}/{GAP_FILE}")
        return 0
    summary = ray.get(ref)
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
