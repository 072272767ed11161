"""Refuse a model whose ZeRO model states cannot fit this rank's share of memory, before anything is allocated.

A model too big for its ranks otherwise dies inside DeepSpeed: a CUDA out-of-memory error deep in a traceback,
or on the CPU the kernel's OOM killer, which leaves Ray nothing to report but a lost worker. The networks are
built on torch's meta device to count their parameters (no memory), and sharding.zero.estimate_memory gives the
bytes DeepSpeed will hold for them. That estimate leaves out activations and communication buckets, so a refusal
is never wrong; a model that passes can still run out of memory on activations, which the warning threshold
points at.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from sharding.zero import MemoryEstimate, ZeroConfig, estimate_memory
from trainer.typed_config import ConfigError

GIB = float(1 << 30)
WARN_FRACTION = 0.8
"""Model states above this share of a rank's memory leave little for activations: warned about, not refused."""


@dataclass(frozen=True)
class RankMemory:
    """The bytes one rank may use: its accelerator's memory (0 on a CPU run) and its share of the host's."""

    device: float
    host: float
    ranks_on_host: int
    device_name: str = ""

    def describe(self) -> str:
        host = f"{self.host / GIB:.1f} GiB of host memory ({self.ranks_on_host} rank(s) share this node)"
        return f"{self.device / GIB:.1f} GiB on {self.device_name} and {host}" if self.device else host


def rank_memory(device: torch.device, env: Mapping[str, str] = os.environ) -> RankMemory:
    """What this rank has: the whole GPU it was given, and the node's RAM split among the node's ranks
    (``LOCAL_WORLD_SIZE``, set by Ray Train and torchrun)."""
    ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    host = min(psutil.virtual_memory().total, _cgroup_limit()) / ranks
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return RankMemory(float(props.total_memory), host, ranks, props.name)
    return RankMemory(0.0, host, ranks)


def _cgroup_limit() -> float:
    """The container's memory limit (cgroup v2, then v1), or infinity: a pod's RAM, not the host's."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return float(text)
    return float("inf")


def count_parameters(build: Callable[[], Mapping[str, nn.Module]]) -> dict[str, tuple[int, int]]:
    """Each network's (parameter count, largest layer's count), from a build on the meta device: no memory is
    allocated, so a model far too big for the machine is counted in a second."""
    from sharding.zero import layer_params

    with torch.device("meta"):
        modules = build()
    return {name: (sum(p.numel() for p in m.parameters()), layer_params(m)) for name, m in modules.items()}


def model_state_estimates(counts: Mapping[str, tuple[int, int]], zero: ZeroConfig,
                          world: int) -> dict[str, MemoryEstimate]:
    return {name: estimate_memory(n, zero, world, layer) for name, (n, layer) in counts.items()}


def check_model_fits(estimates: Mapping[str, MemoryEstimate], memory: RankMemory, zero: ZeroConfig,
                     world: int) -> str:
    """Raise ConfigError when the model states exceed this rank's memory; otherwise return a warning (or "")
    when they take more than WARN_FRACTION of it."""
    device_need = sum(e.device_total for e in estimates.values())
    host_need = sum(e.cpu_total for e in estimates.values())
    if not memory.device:  # a CPU run: "device" memory is host memory too
        host_need, device_need = host_need + device_need, 0.0
    setup = f"ZeRO-{zero.stage}, {zero.precision}, {world} rank(s)"
    over = [(need, have, where) for need, have, where in
            ((device_need, memory.device, memory.device_name), (host_need, memory.host, "host memory"))
            if need and need > have * WARN_FRACTION]
    for need, have, where in over:
        if need > have:
            raise ConfigError(
                f"the model's states need {need / GIB:.2f} GiB of {where} per rank ({setup}; parameters, gradients "
                f"and Adam state, before activations) but a rank has {have / GIB:.2f} GiB: "
                f"{_remedies(zero, on_gpu=bool(memory.device))}")
    if over:
        need, have, where = over[0]
        return (f"[memory] warning: model states take {need / have:.0%} of a rank's {where} ({need / GIB:.2f} of "
                f"{have / GIB:.2f} GiB, {setup}); activations come on top and may not fit")
    return ""


def _remedies(zero: ZeroConfig, on_gpu: bool) -> str:
    """What lowers the per-rank bytes from this config: a higher stage, offload (GPU), lower precision, more ranks."""
    steps = []
    if zero.stage < 3:
        steps.append(f"raise zero.stage (now {zero.stage}; 3 partitions the parameters too)")
    if on_gpu and not zero.offload_optimizer and zero.stage >= 1:
        steps.append("set zero.offload_optimizer: true")
    if zero.precision == "fp32":
        steps.append("train in bf16 (zero.precision)")
    steps.append("use more ranks or machines with more memory, or a smaller model")
    return "; ".join(steps)
