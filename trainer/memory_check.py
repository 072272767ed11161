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

from sharding.zero import MemoryEstimate, ZeroConfig, estimate_memory, layer_params
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
    host_limit: str = "RAM"  # what bounds the host figure: the node's RAM, or its container's cgroup limit

    def describe(self) -> str:
        host = (f"{self.host / GIB:.1f} GiB of host memory (the node's {self.host_limit} over {self.ranks_on_host} "
                "rank(s))")
        return f"{self.device / GIB:.1f} GiB on {self.device_name} and {host}" if self.device else host


def rank_memory(device: torch.device, env: Mapping[str, str] = os.environ) -> RankMemory:
    """What this rank has: the whole GPU it was given, and the node's RAM (or its container's limit) split among
    the node's ranks (``LOCAL_WORLD_SIZE``, set by Ray Train and torchrun)."""
    ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    ram, limit = float(psutil.virtual_memory().total), cgroup_limit()
    host, bound = (limit, "cgroup memory limit") if limit < ram else (ram, "RAM")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return RankMemory(float(props.total_memory), host / ranks, ranks, props.name, bound)
    return RankMemory(0.0, host / ranks, ranks, host_limit=bound)


def cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float:
    """This process's memory limit from its own cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) or the
    mount's root, or infinity: a pod's RAM, not the host's. "max" and v1's near-2^63 "unlimited" read as none."""
    candidates = []
    try:
        with open(proc_cgroup) as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    candidates.append(os.path.join(root, path.lstrip("/"), "memory.max"))
                elif "memory" in controllers.split(","):
                    candidates.append(os.path.join(root, "memory", path.lstrip("/"), "memory.limit_in_bytes"))
    except (OSError, ValueError):
        pass
    candidates += [os.path.join(root, "memory.max"), os.path.join(root, "memory", "memory.limit_in_bytes")]
    limits = []
    for path in candidates:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(float(text))
    return min(limits, default=float("inf"))


def count_parameters(build: Callable[[], Mapping[str, nn.Module]]) -> dict[str, tuple[int, int]]:
    """Each network's (parameter count, largest layer's count), from a build on the meta device: no memory is
    allocated, so a model far too big for the machine is counted in a second."""
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
    over = [(need, have, on_device) for need, have, on_device in
            ((device_need, memory.device, True), (host_need, memory.host, False))
            if need and need > have * WARN_FRACTION]
    for need, have, on_device in over:
        where = memory.device_name if on_device else "host memory"
        if need > have:
            raise ConfigError(
                f"the model's states need {need / GIB:.2f} GiB of {where} per rank ({setup}; parameters, gradients "
                f"and Adam state, before activations) but a rank has {have / GIB:.2f} GiB ({memory.describe()}): "
                f"{_remedies(zero, world, on_device, on_gpu=bool(memory.device))}")
    if over:
        need, have, on_device = over[0]
        where = memory.device_name if on_device else "host memory"
        return (f"[memory] warning: model states take {need / have:.0%} of a rank's {where} ({need / GIB:.2f} of "
                f"{have / GIB:.2f} GiB, {setup}); activations come on top and may not fit")
    return ""


def _remedies(zero: ZeroConfig, world: int, on_device: bool, on_gpu: bool) -> str:
    """What lowers the bytes that overflowed: partitioning over more ranks (pointless at one rank), moving state
    off the GPU (only when the GPU overflowed: it lands on the host), lower precision, more or bigger machines."""
    steps = []
    if world > 1 and zero.stage < 3:
        steps.append(f"raise zero.stage (now {zero.stage}; 3 partitions the parameters too)")
    if on_device and on_gpu:
        if zero.stage >= 1 and not zero.offload_optimizer:
            steps.append("set zero.offload_optimizer: true (Adam's state moves to host memory)")
        if zero.stage == 3 and not zero.offload_params:
            steps.append("set zero.offload_params: true")
    if not on_device and on_gpu and (zero.offload_optimizer or zero.offload_params):
        steps.append("offload less (zero.offload_optimizer / zero.offload_params put that state in host memory)")
    if zero.precision == "fp32":
        steps.append("train in bf16 (zero.precision)")
    if on_device and on_gpu:
        steps.append("use more GPUs or GPUs with more memory, or a smaller model")
    else:
        steps.append("use more nodes (each rank's partition shrinks), fewer ranks per node, nodes with more memory, "
                     "or a smaller model")
    return "; ".join(steps)
