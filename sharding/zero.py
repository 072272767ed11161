"""DeepSpeed ZeRO settings: the typed config, the DeepSpeed JSON built from it, and a per-rank memory estimate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ZeroConfig:
    """How the model state is split and stored. Defaults: ZeRO-2, fp32, no offload.

    grad_accum > 1: the optimizer steps once per that many global batches of data.stream.global_batch; the
    trainer's steps (trainer.steps, checkpoint_every, --stop-after) count those batches, the learning-rate
    schedule (trainer.schedule.total_steps) counts optimizer steps.
    """

    stage: int = 2
    precision: str = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum: int = 1
    grad_clip: float = 1.0
    fp16_initial_scale_power: int = 16
    bucket_elements: int = 20_000_000

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"zero.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.offload_params and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage 3 (parameters are only partitioned there)")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage >= 1")
        if self.grad_accum < 1:
            raise ValueError(f"zero.grad_accum must be >= 1, got {self.grad_accum}")
        if self.bucket_elements < 1:
            raise ValueError(f"zero.bucket_elements must be >= 1, got {self.bucket_elements}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"zero.grad_clip must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak rate, over ``total_steps`` optimizer steps.

    Optimizer step k of the warm-up uses k / warmup_steps of the peak (no step is spent at rate 0), step
    max(warmup_steps, 1) the peak (warmup_steps=0: the peak from step 1), step total_steps and later ``min_ratio``.
    """

    warmup_steps: int = 50
    total_steps: int = 1000
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"schedule needs 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})"
            )
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"schedule.min_ratio must be in [0, 1], got {self.min_ratio}")

    def ratio(self, step: int) -> float:
        """The fraction of the peak rate optimizer step ``step`` (1-based) uses."""
        if step <= self.warmup_steps:
            return max(step, 1) / self.warmup_steps
        peak_at = max(self.warmup_steps, 1)
        progress = min(1.0, (step - peak_at) / max(1, self.total_steps - peak_at))
        return self.min_ratio + (1 - self.min_ratio) * (1 + math.cos(math.pi * progress)) / 2


class WarmupCosine:
    """The ``ScheduleConfig`` rate as a DeepSpeed client scheduler. DeepSpeed's own WarmupCosineLR cannot give it:
    its warm-up is logarithmic by default, lasts at least 2 steps, and its first two steps run at rate 0.

    The state is DeepSpeed's (``last_batch_iteration``: optimizer steps done - 1), so checkpoints saved under its
    WarmupCosineLR resume here. Only the position is saved: a resume follows the schedule of its own config.
    """

    def __init__(self, optimizer: Any, schedule: ScheduleConfig) -> None:
        self.optimizer, self.schedule = optimizer, schedule
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_batch_iteration = -1
        self._apply()

    def _apply(self) -> None:
        ratio = self.schedule.ratio(self.last_batch_iteration + 2)  # the step the optimizer takes next
        self._last_lr = [base * ratio for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """After each optimizer step (DeepSpeed calls it; skipped fp16 steps do not count)."""
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        self._apply()

    def get_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, int]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._apply()


def lr_scheduler(schedule: ScheduleConfig) -> Callable[[Any], WarmupCosine]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: it builds the scheduler on the engine's optimizer."""
    return lambda optimizer: WarmupCosine(optimizer, schedule)


def deepspeed_config(
    zero: ZeroConfig, schedule: ScheduleConfig, *, global_batch: int, world_size: int, lr: float
) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine. ``global_batch`` is samples per forward across all ranks.

    It names no scheduler: ``schedule`` is given to ``deepspeed.initialize`` as ``lr_scheduler(schedule)``.
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    micro = global_batch // world_size
    zopt: dict[str, Any] = {"stage": zero.stage}
    if zero.stage >= 1:
        # DeepSpeed's default buckets (5e8 elements, 2 GB in fp32) are sized for large GPUs; they dominate
        # step time and memory for small models on CPU ranks.
        zopt.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": zero.bucket_elements, "allgather_bucket_size": zero.bucket_elements})
    if zero.offload_optimizer:
        zopt["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero.offload_params:
        zopt["offload_param"] = {"device": "cpu", "pin_memory": False}
    if zero.stage == 3:
        zopt.update({"stage3_gather_16bit_weights_on_model_save": False,
                     "stage3_prefetch_bucket_size": zero.bucket_elements,
                     "stage3_param_persistence_threshold": 10_000})
    cfg: dict[str, Any] = {
        "train_batch_size": micro * world_size * zero.grad_accum,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": zero.grad_accum,
        "gradient_clipping": zero.grad_clip,
        "zero_optimization": zopt,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if zero.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif zero.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": zero.fp16_initial_scale_power, "loss_scale_window": 200}
    del lr, schedule  # the rate lives in the optimizer the family builds; lr_scheduler(schedule) scales it
    return cfg


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model state per rank: parameters, gradients, optimizer state (Adam), on device and on CPU.

    ``optimizer`` is what the ZeRO optimizer holds for the rank's partition (fp32 master weights, their gradient,
    Adam's two moments): the part ``offload_optimizer`` moves to CPU.
    """

    params: float
    grads: float
    optimizer: float
    device_total: float
    cpu_total: float

    def describe(self, name: str) -> str:
        gib = 1 << 30
        return (f"[memory] {name}: per rank params {self.params / gib:.3f} GiB, grads {self.grads / gib:.3f} GiB, "
                f"optimizer {self.optimizer / gib:.3f} GiB -> device {self.device_total / gib:.3f} GiB, "
                f"cpu {self.cpu_total / gib:.3f} GiB (model states only; activations and DeepSpeed's "
                f"communication buckets come on top)")


# What DeepSpeed's ZeRO optimizer (stages 1-3) keeps per parameter of the rank's partition, in any precision: an
# fp32 master copy (4 B; a clone even when the model is fp32), that copy's fp32 gradient (4 B), Adam's exp_avg and
# exp_avg_sq (8 B). The 16 B/param that DeepSpeed's estimators count on CPU under optimizer offload.
ZERO_PARTITION_BYTES = 16.0


def layer_params(model: Any) -> int:
    """The largest parameter count one module owns directly: what ZeRO-3 gathers whole (DeepSpeed's
    ``stage3.model_to_params``). Counts ``ds_numel`` for parameters ZeRO-3 has already partitioned."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False))
                for m in model.modules()), default=0)


def estimate_memory(num_params: int, zero: ZeroConfig, world_size: int, largest_layer: Any = 0) -> MemoryEstimate:
    """Model-state memory per rank, as DeepSpeed allocates it (Adam: 2 moments; ``b`` = 2 B mixed, 4 B fp32).

    Stage 0 (no ZeRO optimizer): fp32 runs torch's Adam on the model's own tensors, b + b + 8 B/param; mixed
    precision wraps it in DeepSpeed's FP16_UnfusedOptimizer, which adds an fp32 copy and fp32 grad: 2 + 2 + 16.
    Stages 1-3: b for params and b for grads plus ZERO_PARTITION_BYTES for the rank's 1/world partition; stage 1
    keeps every parameter's grad until the step, stage 2 only its partition's, stage 3 also splits the params and
    gathers one layer at a time (``largest_layer``: its parameter count, or the model to take it from).

    Mixed precision, stages 2-3, agrees with DeepSpeed's ``estimate_zero2/3_model_states_mem_needs`` on device,
    except where DeepSpeed leaves out a buffer it allocates (measured in tests/test_zero_memory.py): the b/world
    grad partition stage 3 keeps (``grad_partitions_flat_buffer``), and under optimizer offload the b/world CPU
    copy of the param partition stages 1-2 keep (``param_buffer_of_bit16_for_cpu_offload_groups``).
    """
    n, w = float(num_params), float(world_size)
    b = 4.0 if zero.precision == "fp32" else 2.0
    if zero.stage == 0:
        optim = n * (8.0 if zero.precision == "fp32" else ZERO_PARTITION_BYTES)
        return MemoryEstimate(b * n, b * n, optim, b * n + b * n + optim, 0.0)
    optim = ZERO_PARTITION_BYTES * n / w
    device = cpu = 0.0
    if zero.stage < 3:
        # Stage 2 drops other ranks' grads once reduced, and under offload its own too (they go straight into the
        # fp32 CPU partition); stage 1 holds them all until the step.
        grads = b * n if zero.stage == 1 else 0.0 if zero.offload_optimizer else b * n / w
        params = b * n
        device += params + grads
        if zero.offload_optimizer:  # a model-dtype copy of the partition on CPU, staging the CPU step's result
            params += b * n / w
            cpu += b * n / w
    else:
        layer = float(layer_params(largest_layer) if hasattr(largest_layer, "modules") else largest_layer)
        params, grads = b * n / w + b * layer, b * n / w + b * layer  # + the gathered layer and its full grads
        device += 2 * b * layer
        if zero.offload_params:
            cpu += b * n / w
        else:
            device += b * n / w
        if zero.offload_optimizer:  # DeepSpeed keeps the grad partition on the optimizer's device
            cpu += b * n / w
        else:
            device += b * n / w
    if zero.offload_optimizer:
        cpu += optim
    else:
        device += optim
    return MemoryEstimate(params, grads, optim, device, cpu)
