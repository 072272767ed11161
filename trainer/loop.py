"""The training loop every family shares; it runs on each rank (inside a Ray Train worker, or under torchrun).

Per rank: join the process group, build the family's networks with identical initial weights, wrap each in a
DeepSpeed engine, resume from the latest complete checkpoint if there is one (converting to DeepSpeed's universal
format when the world size changed), then stream this rank's micro-batches and let the family step its engines.
Rank 0 writes progress lines, TensorBoard scalars, ``metrics.jsonl`` and sample grids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.codecs import build_codec
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.stream import RankStream, StreamConfig
from sharding.sample_order import StreamState, layout_changed
from sharding.zero import ScheduleConfig, ZeroConfig, deepspeed_config, lr_scheduler
from trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    CheckpointStore,
    config_changes,
    error_of,
    fail_together,
    rng_state,
    set_rng_state,
    to_universal,
)
from trainer.families import family_class
from trainer.families.base import Family, OptimConfig, StepContext
from trainer.images import save_grid
from trainer.memory_check import check_model_fits, count_parameters, model_state_estimates, rank_memory
from trainer.run_outputs import Reporter, grid_path, missed_at_resume
from trainer.typed_config import ConfigError

log = logging.getLogger(__name__)
SUMMARY = "summary.json"  # rank 0's end-of-run figures (Ray Train keeps reported metrics only with checkpoints)


@dataclass
class TrainerConfig:
    """Loop cadence. Steps count global batches (optimizer steps unless zero.grad_accum > 1).

    on_data_change: what a resume does when the checkpoint was trained on another sample order (another data
    set, or other data.stream order settings), where its {epoch, batch} position means other samples: "error"
    refuses; "next_epoch" goes on from the start of the next epoch under the new order.
    on_model_change: what a resume does when the checkpoint was trained under another model config: "error"
    refuses (a change that keeps the parameter shapes, such as the number of heads, would load and train
    nonsense); "warn" resumes with a warning naming the changes (for settings that leave the networks as they
    are: a loss weight, a schedule, a sampling limit).
    """

    steps: int = 500
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sample_every: int = 250
    num_samples: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint_upload: bool = True
    seed: int = 0
    deterministic: bool = True
    on_data_change: str = "error"
    on_model_change: str = "error"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        # eval_batches=0 would write eval records of no metrics; num_samples=0 a grid of no images
        for name in ("steps", "log_every", "eval_every", "eval_batches", "sample_every", "num_samples",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if not -(2**62) <= self.seed < 2**62:  # torch's generators take signed 64 bits; the loop adds steps to it
            raise ValueError(f"trainer.seed must be in -2**62..2**62-1, got {self.seed}")
        if self.on_data_change not in ("error", "next_epoch"):
            raise ValueError(f"trainer.on_data_change must be 'error' or 'next_epoch', got {self.on_data_change!r}")
        if self.on_model_change not in ("error", "warn"):
            raise ValueError(f"trainer.on_model_change must be 'error' or 'warn', got {self.on_model_change!r}")


@dataclass
class RunSpec:
    """Everything one rank needs, already validated; plain data so Ray can ship it to the workers."""

    run_dir: str
    checkpoint_root: str
    family: str
    model: Any
    train_data: str
    stream: StreamConfig
    zero: ZeroConfig
    trainer: TrainerConfig
    eval_data: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    stop_after: int = 0


def sample_order(manifest: Manifest, stream: StreamConfig) -> dict[str, Any]:
    """What fixes which samples a stream position {epoch, batch} stands for: the data set's shards and the
    stream's order settings (not the world size or worker count, which never change it)."""
    shards = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()[:16]
    order = {"data": f"{manifest.total} samples, shards {shards}", "global_batch": stream.global_batch,
             "partitions": stream.partitions, "shuffle_block": stream.shuffle_block,
             "shuffle_shards": stream.shuffle_shards, "drop_last": stream.drop_last, "seed": stream.seed}
    if layout_changed(manifest.total, stream.global_batch, stream.partitions, stream.drop_last):
        order["layout"] = "2026-11-27"  # the last batch now keeps every leftover sample; older positions differ
    return order


def resume_position(saved: dict[str, Any], now: dict[str, Any], state: StreamState, where: str,
                    on_change: str) -> StreamState:
    """The stream position to resume from: the saved one when the order is unchanged (or was not recorded)."""
    changed = {k: (saved.get(k), now[k]) for k in now if saved and saved.get(k) != now[k]}
    if not changed:
        return state
    names = {"data": "the data set", "layout": "the epoch layout (dgm's, fixed to keep every leftover sample)"}
    said = "; ".join(f"{names.get(k, 'data.stream.' + k)}: {a} -> {b}" for k, (a, b) in changed.items())
    if on_change == "error":
        raise CheckpointError(f"checkpoint {where} was trained on another sample order ({said}): its position "
                              f"(epoch {state.epoch}, batch {state.batch}) would repeat or skip data. Restore "
                              "the settings, or set trainer.on_data_change=next_epoch to go on from the next epoch")
    # at batch 0 of an epoch nothing of it was trained on yet: that epoch is the next one
    return StreamState(state.epoch + (1 if state.batch else 0), 0)


class DivergedError(ConfigError):
    """The loss became NaN or infinite: the optimizer settings are the user's to change, and nothing after that
    step is checkpointed."""


def apply_schedule(engines: dict[str, Any]) -> None:
    """Set each optimizer's rate from its scheduler: loading a checkpoint brings back the optimizer's saved rates
    after the scheduler's position, so without this the first step of a resume under a changed schedule (or from a
    checkpoint of DeepSpeed's own scheduler) would run at the old rate."""
    for engine in engines.values():
        sched = getattr(engine, "lr_scheduler", None)
        if sched is not None:
            sched.load_state_dict(sched.state_dict())


def check_eval_size(manifest: Manifest, global_batch: int, url: str) -> None:
    """The eval stream lays out whole global batches (the last one padded), so a held-out set needs at least one.
    Checked before any training: found at the first eval, it would fail every resume of the run as well."""
    if manifest.total < global_batch:
        raise ConfigError(f"data.eval: {url} has {manifest.total} samples, fewer than one global batch of "
                          f"data.stream.global_batch={global_batch}: give a larger held-out set or a smaller batch")


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Eval and sample grids leave the RNG as they found it: a checkpoint saved just before them resumes into the
    same steps as the run that went on after them."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def data_info(manifest: Manifest, eval_manifest: Manifest | None = None) -> dict[str, Any]:
    """What a family may know of its data set: the manifest's extra facts, source and codec settings, and the
    folder the manifest lives in (for files written beside it, such as a caption tokenizer); and the held-out
    set's source (``eval_source``), which conditional sampling draws its default conditions from; and the samples
    per class label (``label_counts``) where the shards record them."""
    info = {**manifest.extra, "source": manifest.source, "codec": manifest.codec, "dataset_url": manifest.url}
    if counts := manifest.label_counts:
        info["label_counts"] = counts
    if eval_manifest is not None:
        info["eval_source"] = eval_manifest.source
    return info


def torchrun_cuda_index(env: Mapping[str, str], device_count: int) -> int | None:
    """The GPU this process must take: torchrun starts one process per GPU with every GPU visible, so each takes
    GPU LOCAL_RANK (or all of them would share GPU 0). None outside torchrun: Ray Train pins its workers itself."""
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    local = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= local < device_count:
        raise RuntimeError(f"torchrun LOCAL_RANK={local}, but this node shows {device_count} GPU(s): start "
                           f"torchrun with --nproc_per_node <= {device_count} (or check CUDA_VISIBLE_DEVICES)")
    return local


def _init_distributed() -> tuple[int, int, torch.device]:
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif (index := torchrun_cuda_index(os.environ, torch.cuda.device_count())) is not None:
        torch.cuda.set_device(index)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return rank, world, device


def _mean_across_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean over ranks of each value, reduced on ``device`` (NCCL reduces GPU tensors only). Every rank must
    report the same metric names (values are paired by position): a tiny collective checks that first, so a family
    whose metrics differ across ranks fails on every rank by name instead of averaging one metric into another."""
    keys = sorted(values)
    if dist.get_world_size() > 1:
        names = float(zlib.crc32("\0".join(keys).encode()))
        check = torch.tensor([names, -names], dtype=torch.float64, device=device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX)
        if float(check[0]) != -float(check[1]):
            raise RuntimeError(f"the family's train_step returned other metric names on another rank (this rank: "
                               f"{keys}); every rank must return the same keys, every step")
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist(), strict=True))


def _record_pid(run_dir: str, rank: int) -> None:
    """<run_dir>/workers/rank<r>.pid: which process serves which rank (for operators, and the worker-loss test)."""
    folder = os.path.join(run_dir, "workers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def build_engines(family: Family, spec: RunSpec, world: int, universal: bool) -> dict[str, Any]:
    import deepspeed

    modules = family.build_modules()
    optimizers = family.build_optimizers(modules, spec.trainer.optim)
    engines = {}
    for name, module in modules.items():
        ds_cfg = deepspeed_config(spec.zero, spec.trainer.schedule, global_batch=spec.stream.global_batch,
                                  world_size=world, lr=spec.trainer.optim.lr)
        if universal:
            ds_cfg["checkpoint"] = {"load_universal": True}
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizers[name], config=ds_cfg,
                                               lr_scheduler=lr_scheduler(network_schedule(spec.trainer.schedule,
                                                                         family.updates_per_step(name))))
        engines[name] = engine
    return engines


def network_schedule(schedule: ScheduleConfig, updates_per_step: int) -> ScheduleConfig:
    """``schedule`` (in training steps) for a network that steps its optimizer ``updates_per_step`` times a step:
    a GAN's D at 5 updates a step would otherwise finish its warm-up and decay in a fifth of the run."""
    if updates_per_step == 1:
        return schedule
    return dataclasses.replace(schedule, warmup_steps=schedule.warmup_steps * updates_per_step,
                               total_steps=schedule.total_steps * updates_per_step)


def _check_memory(family: Family, spec: RunSpec, world: int, rank: int, device: torch.device) -> None:
    """Model states per rank: printed by rank 0, and refused on every rank (one rank's refusal reaches all) when
    they cannot fit, before DeepSpeed allocates any of them."""
    counts = count_parameters(family.build_modules)
    estimates = model_state_estimates(counts, spec.zero, world)
    if rank == 0:
        for name, e in estimates.items():
            print(e.describe(f"{name} ({counts[name][0]:,} params, ZeRO-{spec.zero.stage}, {spec.zero.precision}, "
                             f"{world} ranks)"), flush=True)
    warning = ""

    def check() -> None:
        nonlocal warning
        warning = check_model_fits(estimates, rank_memory(device), spec.zero, world)

    fail_together(error_of(check, ConfigError), "checking that the model fits in memory")
    if rank == 0 and warning:
        print(warning, flush=True)


def check_resume(store: CheckpointStore, spec: RunSpec, world: int,
                 manifest: Manifest | None = None) -> tuple[str | None, CheckpointMeta | None]:
    """The tag a run resumes from (None: a fresh start) and its meta, after every refusal its meta alone decides:
    another model or ZeRO stage, a grad_accum that splits its step, a ZeRO-0 checkpoint on another world size,
    and (given the ``manifest``) another sample order under trainer.on_data_change=error. The driver calls it
    before Ray starts: each rank met these after the worker group had started, with a traceback per rank."""
    tag = store.latest()
    if tag is None:
        whole = [t for t in store.all_tags() if store.is_complete(t)]
        if whole:  # starting over would rewrite the metrics and replace these one by one
            raise CheckpointError(f"{store.root} holds complete checkpoints ({', '.join(whole[-3:])}) but no "
                                  f"'latest' naming one: write the tag to resume from into {store.root}/latest "
                                  "(e.g. its newest), or start over in another run_dir / checkpoint_root")
        return None, None
    meta = store.read_meta(tag)
    if meta.step % spec.zero.grad_accum:  # DeepSpeed restarts its micro-step count at 0 on load
        raise ConfigError(f"checkpoint {store.root}/{tag} is at step {meta.step}, not a multiple of zero.grad_accum="
                          f"{spec.zero.grad_accum}: every accumulation boundary after it would fall mid-way and "
                          f"checkpoints would drop gathered gradients; resume with a grad_accum that divides "
                          f"{meta.step}")
    refused = spec.trainer.on_model_change == "error"  # a tolerated change is warned about once, at the load
    store.check(tag, meta, expect_family=spec.family, zero_stage=spec.zero.stage,
                model_config=spec.model if refused else None)
    if meta.world_size != world and meta.zero_stage == 0:
        raise CheckpointError(f"checkpoint {store.root}/{tag} was saved by {meta.world_size} ranks under ZeRO-0, "
                              f"which loads on as many ranks only (the conversion to another world size reads "
                              f"ZeRO-1/2/3 checkpoints): set cluster.workers={meta.world_size}")
    if manifest is not None:
        resume_position(meta.order, sample_order(manifest, spec.stream), StreamState.from_dict(meta.stream_state),
                        f"{store.root}/{tag}", spec.trainer.on_data_change)
    return tag, meta


def _resume_point(store: CheckpointStore, world: int, rank: int, spec: RunSpec) -> tuple[str | None, bool]:
    """The tag to resume from, and whether it needs the universal format (saved at another world size). A
    checkpoint of another model is refused here, before any conversion or engine."""
    tag, meta = check_resume(store, spec, world)
    if tag is None:
        return None, False
    universal = meta.world_size != world
    if universal:
        # A local root is one folder every rank shares: rank 0 converts it. An s3:// checkpoint is downloaded
        # into each rank's own staging folder, so each rank converts its copy.
        def convert() -> None:
            if store.remote or rank == 0:
                path = store.local_copy(tag)
                for name in meta.engines:
                    to_universal(path, name)

        fail_together(error_of(convert, Exception), f"converting checkpoint {store.root}/{tag}")
    return tag, universal


def _eval(family: Family, engines: dict[str, Any], manifest: Manifest, spec: RunSpec, rank: int, world: int,
          decode, device: torch.device) -> dict[str, float]:
    """Held-out metrics: each batch's values weighted by its real (unpadded) samples, summed over ranks. A batch of
    padding only counts for nothing, and a metric some batches or ranks lack averages over those that have it."""
    cfg = StreamConfig(**{**asdict(spec.stream), "drop_last": False, "num_workers": 0, "shuffle_shards": False})
    stream = RankStream(manifest, cfg, decode, rank, world, StreamState())
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    modules = {k: e.module for k, e in engines.items()}
    for m in modules.values():
        m.eval()
    with torch.no_grad():
        for i, samples in enumerate(stream.iterate(max_epochs=1)):
            if i >= spec.trainer.eval_batches:
                break
            real = sum(bool(s.get("valid", True)) for s in samples)
            batch = {k: v.to(device) for k, v in family.collate(samples).items()}
            values = family.evaluate(modules, batch)  # on every batch: under ZeRO-3 a forward is a collective
            if real:
                accumulate(sums, weights, values, real)
    for m in modules.values():
        m.train()
    return _weighted_mean_across_ranks(sums, weights, world, device)


def accumulate(sums: dict[str, float], weights: dict[str, float], values: dict[str, Any], real: int) -> None:
    """Add one batch's metrics: each weighted by the batch's real samples, or by the weight a family gives with it
    as ``(value, weight)`` (a ratio weighted by its denominator: totals over totals, not a mean of ratios)."""
    for k, v in values.items():
        v, w = v if isinstance(v, tuple) else (v, real)
        sums[k] = sums.get(k, 0.0) + float(v) * float(w)
        weights[k] = weights.get(k, 0.0) + float(w)


def _weighted_mean_across_ranks(sums: dict[str, float], weights: dict[str, float], world: int,
                                device: torch.device | str = "cpu") -> dict[str, float]:
    """sum(sums) / sum(weights) per key over every rank; the key set is the union of the ranks' (a collective of
    one fixed length per key, so ranks that saw different metrics never pair values wrongly). Reduced on
    ``device``: NCCL reduces GPU tensors only."""
    keys: set[str] = set(sums)
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, sorted(sums))
        keys = set().union(*map(set, gathered))
    ordered = sorted(keys)
    t = torch.tensor([[sums.get(k, 0.0), weights.get(k, 0.0)] for k in ordered], dtype=torch.float64,
                     device=device)
    if world > 1 and ordered:
        dist.all_reduce(t)
    t = t.cpu()
    return {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(ordered) if t[i, 1] > 0}


def schedule_notice(cfg: TrainerConfig, step: int) -> str:
    """What a run about to train past its learning-rate schedule should hear (trainer.steps and
    trainer.schedule.total_steps are separate settings; raising only the first, as a finished run's message
    suggests, trains the extra steps at the schedule's floor rate), or ''."""
    end = cfg.schedule.total_steps
    if cfg.steps <= end or step >= cfg.steps:
        return ""
    return (f"trainer.steps ({cfg.steps}) runs past trainer.schedule.total_steps ({end}): steps "
            f"{max(end, step) + 1}..{cfg.steps} train at the schedule's floor, {cfg.schedule.min_ratio:g} x the peak "
            "rate; set trainer.schedule.total_steps with trainer.steps to decay over the whole run")


def eval_due(step: int, cfg: TrainerConfig) -> bool:
    return step % cfg.eval_every == 0 or step == cfg.steps


def grid_due(step: int, cfg: TrainerConfig) -> bool:
    return step % cfg.sample_every == 0 or step == cfg.steps


def _agreed(decision: tuple[bool, bool] | None, world: int) -> tuple[bool, bool]:
    """Rank 0's decision on every rank: an eval or a sample grid is a collective under ZeRO-3."""
    if world == 1 and decision is not None:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _samples(family: Family, engines: dict[str, Any], spec: RunSpec, step: int, rank: int) -> None:
    modules = {k: e.module for k, e in engines.items()}
    for m in modules.values():
        m.eval()
    gen = torch.Generator().manual_seed(spec.trainer.seed + step)
    images = family.sample_images(modules, spec.trainer.num_samples, gen)
    for m in modules.values():
        m.train()
    if rank == 0:
        save_grid(images, grid_path(spec.run_dir, step))


def train_worker(spec: RunSpec) -> dict[str, Any]:
    """Train on this rank until ``trainer.steps`` (or ``stop_after`` steps of this process); returns a summary."""
    rank, world, device = _init_distributed()
    _record_pid(spec.run_dir, rank)
    cfg = spec.trainer
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN; DeepSpeed's large buffers make that costly
        # and it adds nothing to reproducibility.
        torch.utils.deterministic.fill_uninitialized_memory = False
    manifest = load_manifest(spec.train_data)
    eval_manifest = load_manifest(spec.eval_data) if spec.eval_data else None
    if eval_manifest is not None:
        check_eval_size(eval_manifest, spec.stream.global_batch, spec.eval_data)
    codec = build_codec(manifest.codec["name"], manifest.codec.get("settings", {}))
    family = family_class(spec.family)(spec.model, data_info(manifest, eval_manifest))
    if eval_manifest is not None:
        family.check_eval_data(data_info(eval_manifest), spec.eval_data)
    store = CheckpointStore(spec.checkpoint_root, rank=rank, world_size=world, keep=cfg.keep_checkpoints,
                            staging=os.path.join(spec.run_dir, ".staging"), async_upload=cfg.async_checkpoint_upload)
    tag, universal = _resume_point(store, world, rank, spec)
    _check_memory(family, spec, world, rank, device)
    engines = build_engines(family, spec, world, universal)
    # Networks are built from one seed on every rank (same initial weights); what is drawn after (dropout) must
    # differ between ranks, or every rank drops the same units. A resume restores each rank's own state instead.
    torch.manual_seed((cfg.seed * 1_000_003 + rank) % (2**63))
    step, state = 0, StreamState()
    order = sample_order(manifest, spec.stream)
    if tag is not None:
        meta = store.load(tag, engines, expect_family=spec.family, universal=universal, zero_stage=spec.zero.stage,
                          model_config=spec.model,
                          on_model_change=spec.trainer.on_model_change)
        step, state = meta.step, StreamState.from_dict(meta.stream_state)
        apply_schedule(engines)
        optim_changes = config_changes((meta.config.get("trainer") or {}).get("optim"), spec.trainer.optim,
                                       "trainer.optim") if meta.config else []  # {}: no config was recorded
        if rank == 0 and optim_changes:
            print(f"[train] the optimizer settings differ from the checkpoint's ({'; '.join(optim_changes)}): the "
                  "run goes on with this config's", flush=True)
        resumed = resume_position(meta.order, order, state, f"{store.root}/{tag}", cfg.on_data_change)
        if rank == 0:
            print(f"[train] resumed from {store.root}/{tag} at step {step} (saved by {meta.world_size} ranks, "
                  f"now {world})", flush=True)
            if resumed != state:
                print(f"[train] the sample order changed since that checkpoint: going on from epoch "
                      f"{resumed.epoch}, batch 0 (trainer.on_data_change=next_epoch)", flush=True)
        state = resumed
    stream = RankStream(manifest, spec.stream, codec.decode, rank, world, state)
    if rank == 0 and step == 0:
        print(f"[train] {manifest.total} samples, {stream.batches_per_epoch} global batches of "
              f"{spec.stream.global_batch} per epoch, {world} ranks", flush=True)
    if rank == 0 and (notice := schedule_notice(cfg, step)):
        print(f"[train] {notice}", flush=True)
    reporter = Reporter(spec.run_dir, cfg.steps, spec.stream.global_batch, rank == 0, step)

    def evaluate_and_report(at: int) -> None:
        with rng_untouched():
            ev = _eval(family, engines, eval_manifest, spec, rank, world, codec.decode, device)
        reporter.scalars(at, "eval", ev)
        if rank == 0:
            print("[eval] step {} {}".format(at, " ".join(f"{k} {v:.4f}" for k, v in ev.items())), flush=True)

    def sample_grid(at: int) -> None:
        with rng_untouched():
            _samples(family, engines, spec, at, rank)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.zero.precision]
    first_step_at: float | None = None
    first_step_wall = 0.0
    last_step_at = started = time.monotonic()
    done_here = non_finite = 0
    losses: list[float] = []
    try:
        if tag is not None:
            # A run that stopped between its checkpoint and that step's eval or sample grid never made them: make them
            # now, before training goes on, so the eval curve and the grids have no hole at the resumed step.
            due = (eval_manifest is not None and eval_due(step, cfg), grid_due(step, cfg))
            redo_eval, redo_grid = _agreed(missed_at_resume(spec.run_dir, step, *due) if rank == 0 else None, world)
            if rank == 0 and (redo_eval or redo_grid):
                made = " and ".join(n for n, redo in (("eval", redo_eval), ("sample grid", redo_grid)) if redo)
                print(f"[train] making step {step}'s {made}, missing since the run stopped", flush=True)
            if redo_eval:
                evaluate_and_report(step)
            if redo_grid:
                sample_grid(step)
        for samples in stream:
            if step >= cfg.steps:
                break
            batch = {k: v.to(device) for k, v in family.collate(samples).items()}
            ctx = StepContext(step=step, rank=rank, world_size=world, device=device, dtype=dtype, seed=cfg.seed)
            metrics = _mean_across_ranks(family.train_step(engines, batch, ctx), device)
            # every rank holds the same mean, so every rank stops at the same step; under fp16 DeepSpeed's loss
            # scaler skips an overflowing step by itself, so a few in a row are its business
            non_finite = 0 if math.isfinite(metrics["loss"]) else non_finite + 1
            if non_finite >= (3 if spec.zero.precision == "fp16" else 1):
                raise DivergedError(
                    f"training diverged: the loss at step {step + 1} is {metrics['loss']} (nothing from this step "
                    "on is checkpointed); lower trainer.optim.lr, lengthen trainer.schedule.warmup_steps or set "
                    "zero.grad_clip, in a fresh run_dir or resuming from the last checkpoint")
            step += 1
            done_here += 1
            last_step_at = time.monotonic()
            if first_step_at is None:
                first_step_at, first_step_wall = last_step_at, time.time()
            losses.append(metrics["loss"])
            reporter.scalars(step, "train", metrics)
            if step % cfg.log_every == 0 or step == cfg.steps:
                reporter.progress(step, metrics)
            stopping = bool(spec.stop_after) and done_here >= spec.stop_after  # checked before the next batch
            # The checkpoint first: an eval or sample grid that fails must not take this step's checkpoint with it
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                meta = CheckpointMeta(step=step, stream_state=stream.state.to_dict(), world_size=world,
                                      family=spec.family, engines=sorted(engines), zero_stage=spec.zero.stage,
                                      config=spec.config, data_info=family.data_info, order=order)
                saved = store.save(step, engines, meta)
                if rank == 0:
                    note = " (uploading in the background)" if store.remote and store.async_upload else ""
                    print(f"[checkpoint] {store.root}/{saved}{note}", flush=True)
            if eval_manifest is not None and eval_due(step, cfg):
                evaluate_and_report(step)
            if grid_due(step, cfg):
                sample_grid(step)
            if stopping:
                break
        store.wait()
    except Exception:
        with contextlib.suppress(Exception):  # never in place of the failure itself
            store.finish_after_failure()  # a checkpoint still uploading is not lost with the failing process
        raise
    finally:
        reporter.close()
    if stream.skipped_shards and rank == 0:
        print(f"[data] skipped {stream.skipped_shards} corrupt shard(s) on rank 0", flush=True)
    elapsed = last_step_at - (first_step_at or started)
    summary = {"step": step, "losses": losses, "rank": rank, "world_size": world,
               "steps_per_s": (done_here - 1) / elapsed if done_here > 1 and elapsed > 0 else 0.0,
               "skipped_shards": stream.skipped_shards, "first_step_wall": first_step_wall,
               "torch_threads": torch.get_num_threads()}
    if rank == 0 and done_here == 0 and os.path.exists(os.path.join(spec.run_dir, SUMMARY)):
        print(f"[train] the run is already at step {step} of trainer.steps={cfg.steps}: nothing to train "
              f"(raise trainer.steps, and trainer.schedule.total_steps with it, to go on); {SUMMARY} keeps the "
              "run's figures", flush=True)
    elif rank == 0:
        with open(os.path.join(spec.run_dir, SUMMARY), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=1)
    return summary

