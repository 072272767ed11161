"""DeepSpeed ZeRO settings: the typed config, the DeepSpeed JSON built from it, and a per-rank memory estimate."""

from __future__ import annotations

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


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak rate, over ``total_steps``."""

    warmup_steps: int = 50
    total_steps: int = 1000
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"schedule needs 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})"
            )


def deepspeed_config(
    zero: ZeroConfig, schedule: ScheduleConfig, *, global_batch: int, world_size: int, lr: float
) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine. ``global_batch`` is samples per forward across all ranks."""
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
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": schedule.total_steps,
                "warmup_num_steps": max(1, schedule.warmup_steps),  # DeepSpeed refuses 0
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": schedule.min_ratio,
            },
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if zero.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif zero.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": zero.fp16_initial_scale_power, "loss_scale_window": 200}
    del lr  # the learning rate lives in the optimizer the family builds; the scheduler scales it
    return cfg


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model state per rank: parameters, gradients, optimizer state (Adam), on device and on CPU."""

    params: float
    grads: float
    optimizer: float
    device_total: float
    cpu_total: float

    def describe(self, name: str) -> str:
        gib = 1 << 30
        return (f"[memory] {name}: per rank params {self.params / gib:.3f} GiB, grads {self.grads / gib:.3f} GiB, "
                f"optimizer {self.optimizer / gib:.3f} GiB -> device {self.device_total / gib:.3f} GiB, "
                f"cpu {self.cpu_total / gib:.3f} GiB (model states only; activations come on top)")


def estimate_memory(num_params: int, zero: ZeroConfig, world_size: int) -> MemoryEstimate:
    """Model-state memory per rank under ZeRO (the accounting of the ZeRO paper, Adam: 2 moments).

    fp32: 4 B params + 4 B grads + 8 B moments. Mixed precision: 2 B params + 2 B grads + 12 B (fp32 master +
    moments). Stage 1 splits the optimizer state across ranks, stage 2 also the gradients, stage 3 also the params.
    """
    n, w = float(num_params), float(world_size)
    mixed = zero.precision != "fp32"
    p_bytes, g_bytes, o_bytes = (2.0, 2.0, 12.0) if mixed else (4.0, 4.0, 8.0)
    params = n * p_bytes / (w if zero.stage >= 3 else 1)
    grads = n * g_bytes / (w if zero.stage >= 2 else 1)
    optim = n * o_bytes / (w if zero.stage >= 1 else 1)
    device, cpu = params + grads + optim, 0.0
    if zero.offload_optimizer:
        device -= optim
        cpu += optim
    if zero.offload_params:
        device -= params
        cpu += params
    return MemoryEstimate(params, grads, optim, device, cpu)
