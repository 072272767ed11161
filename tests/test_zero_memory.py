"""The per-rank memory estimate ``dgm train`` prints: DeepSpeed's own estimators agree with it where they count every
buffer, and a real ZeRO engine (one rank, CPU, gloo) holds the tensors it counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sharding.zero import ZeroConfig, estimate_memory, layer_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, L = 123_456_789, 2_000_000  # parameters, and those of the largest layer (stage 3 gathers one whole)


def _deepspeed(stage: int, world: int, offload: bool, offload_params: bool) -> tuple[float, float]:
    """DeepSpeed's (device, cpu) bytes per rank for one node of ``world`` ranks, without its 1.5x CPU margin."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        cpu, dev = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=world, cpu_offload=offload,
                                                         additional_buffer_factor=1)
    else:
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(P, L, num_gpus_per_node=world, cpu_offload=offload,
                                                            cpu_offload_params=offload_params,
                                                            additional_buffer_factor=1)
    # DeepSpeed's CPU figure is the node's; without offload it is the model loaded on CPU before the engine, not
    # model state, and that load term (4 B/param per rank) also dominates offload at stage 2 above 4 ranks.
    return float(dev), float(cpu) / world if offload else 0.0


# (stage, precision, offload_optimizer, offload_params, world, extra device, extra cpu), the extras in bytes per
# partitioned parameter: buffers DeepSpeed allocates but its estimators leave out (measured below).
CASES = [
    (2, "bf16", False, False, 1, 0, 0),
    (2, "bf16", False, False, 4, 0, 0),
    (2, "fp16", False, False, 2, 0, 0),
    (2, "bf16", True, False, 1, 0, 2),  # the bf16 copy of the partition the CPU step writes into
    (2, "bf16", True, False, 4, 0, 2),
    (3, "bf16", False, False, 1, 2, 0),  # the bf16 gradient partition (grad_partitions_flat_buffer)
    (3, "bf16", False, False, 8, 2, 0),
    (3, "bf16", True, False, 8, 0, 2),  # ... kept on the CPU under optimizer offload
    (3, "fp16", True, True, 4, 0, 2),
]


@pytest.mark.parametrize("stage,precision,offload,offload_params,world,extra_dev,extra_cpu", CASES)
def test_mixed_precision_agrees_with_deepspeeds_estimators(stage, precision, offload, offload_params, world,
                                                           extra_dev, extra_cpu):
    zero = ZeroConfig(stage=stage, precision=precision, offload_optimizer=offload, offload_params=offload_params)
    est = estimate_memory(P, zero, world, L)
    dev, cpu = _deepspeed(stage, world, offload, offload_params)
    assert est.device_total == pytest.approx(dev + extra_dev * P / world, abs=2)  # DeepSpeed truncates to int
    assert est.cpu_total == pytest.approx(cpu + extra_cpu * P / world, abs=2)
    assert est.params + est.grads + est.optimizer == pytest.approx(est.device_total + est.cpu_total)


def test_stage_1_holds_every_gradient_and_stage_0_and_fp32_count_what_deepspeed_allocates():
    """Outside DeepSpeed's estimators, from its code (and the measurement below at one rank): stage 1 frees the
    gradients of other ranks' partitions only at the step; fp32 ZeRO still clones an fp32 master copy; stage 0
    runs torch's Adam on fp32 models, DeepSpeed's FP16_UnfusedOptimizer (fp32 copy + fp32 grads) on mixed ones."""
    n = 1_000_000

    def per_param(stage: int, precision: str, world: int, **kw) -> tuple[float, float, float, float]:
        e = estimate_memory(n, ZeroConfig(stage=stage, precision=precision, **kw), world, 1000)
        return e.params / n, e.grads / n, e.optimizer / n, e.cpu_total / n

    assert per_param(1, "bf16", 4) == (2, 2, 4, 0)
    assert per_param(1, "bf16", 4, offload_optimizer=True) == (2.5, 2, 4, 4.5)
    assert per_param(2, "fp32", 4) == (4, 1, 4, 0)
    assert per_param(3, "fp32", 4) == (1.004, 1.004, 4, 0)
    assert per_param(0, "fp32", 8) == (4, 4, 8, 0)
    assert per_param(0, "bf16", 8) == (2, 2, 16, 0)


def test_the_largest_layer_comes_from_the_model_as_deepspeed_counts_it():
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params

    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Sequential(torch.nn.Linear(32, 64)), torch.nn.ReLU())
    assert layer_params(net) == model_to_params(net)[1] == 32 * 64 + 64
    zero = ZeroConfig(stage=3, precision="bf16")
    n = sum(p.numel() for p in net.parameters())
    assert estimate_memory(n, zero, 2, net) == estimate_memory(n, zero, 2, 32 * 64 + 64)


# One process, world size 1: builds each engine, runs two steps, and reports the bytes of the tensors DeepSpeed's
# optimizer holds for its partition (deduplicated by storage): at the inner optimizer step, where the fp32 grads
# and Adam's moments are all alive, and the model-dtype gradient buffer right after backward.
SCRIPT = r"""
import json, sys
import deepspeed, torch
from sharding.zero import ScheduleConfig, ZeroConfig, deepspeed_config

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")

def nbytes(tensors):
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())

for stage, precision, offload in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    zero = ZeroConfig(stage=stage, precision=precision, offload_optimizer=offload, bucket_elements=4096)
    cfg = deepspeed_config(zero, ScheduleConfig(warmup_steps=0, total_steps=10), global_batch=4, world_size=1,
                           lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    zo, out = engine.optimizer, {}
    if stage == 3:
        params = lambda: zo.fp16_partitioned_groups_flat
        grads = lambda: [zo.grad_partitions_flat_buffer]
        masters = zo.fp32_partitioned_groups_flat
    else:
        params = lambda: zo.bit16_groups_flat + list(getattr(zo, "param_buffer_of_bit16_for_cpu_offload_groups", []))
        grads = lambda: ([zo.grads_in_partition] + [p.grad for p in model.parameters()]
                         + [t for g in zo.averaged_gradients.values() if g is not None for t in g])
        masters = zo.single_partition_of_fp32_groups
    inner, inner_step = zo.optimizer, zo.optimizer.step

    def step(*args, **kwargs):
        result = inner_step(*args, **kwargs)
        held = [t for m in masters for t in (m, m.grad)]
        held += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        out["optimizer"] = nbytes(held)
        return result

    inner.step = step
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 64).to(dtype)).float().pow(2).mean())
        out["grads"] = nbytes(grads())
        engine.step()
    out["params"] = nbytes(params())
    print("MEASURED " + json.dumps({"case": [stage, precision, offload], "P": sum(p.ds_numel if hasattr(p, "ds_numel")
          else p.numel() for p in model.parameters()), **out}), flush=True)
"""
MEASURED_CASES = [(2, "fp32", False), (2, "bf16", False), (2, "bf16", True), (3, "bf16", False)]
# 16 B/param of DeepSpeed's alignment padding for a few elements, and Adam's per-parameter-group step counters.
TOLERANCE = 16 * 8 + 64


@pytest.fixture(scope="module")
def measured() -> dict[tuple, dict]:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MEASURED_CASES)], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("MEASURED ")]
    return {tuple(r["case"]): r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_zero_2_engine_holds_what_the_estimate_counts(measured, precision):
    """The fp32 master partition, its gradient and Adam's moments are the optimizer figure; the model-dtype
    parameters and gradient partition are the params and grads figures."""
    got = measured[(2, precision, False)]
    est = estimate_memory(got["P"], ZeroConfig(stage=2, precision=precision), 1)
    assert got["optimizer"] == pytest.approx(est.optimizer, abs=TOLERANCE)
    assert got["grads"] == pytest.approx(est.grads, abs=TOLERANCE)
    assert got["params"] == pytest.approx(est.params, abs=TOLERANCE)
    assert got["optimizer"] + got["grads"] <= est.optimizer + est.grads + TOLERANCE


@pytest.mark.slow
def test_the_buffers_deepspeeds_estimators_leave_out_are_allocated(measured):
    """Stage 3 keeps a bf16 gradient partition next to the fp32 one; stages 1-2 with optimizer offload keep a bf16
    copy of the partition on CPU. The estimate counts both; DeepSpeed's estimators do not."""
    got = measured[(3, "bf16", False)]
    n = got["P"]
    est = estimate_memory(n, ZeroConfig(stage=3, precision="bf16"), 1, 64 * 64 + 64)
    assert got["grads"] == pytest.approx(2 * n, abs=TOLERANCE)
    assert got["optimizer"] == pytest.approx(est.optimizer, abs=TOLERANCE)
    gathered = 2 * 2 * (64 * 64 + 64)  # one layer's bf16 params and grads, gathered only while it runs
    assert got["params"] + got["grads"] + got["optimizer"] == pytest.approx(est.device_total - gathered,
                                                                           abs=TOLERANCE)
    got = measured[(2, "bf16", True)]
    est = estimate_memory(n, ZeroConfig(stage=2, precision="bf16", offload_optimizer=True), 1)
    assert got["grads"] == 0  # the reduced grads went straight into the fp32 partition
    assert got["params"] == pytest.approx(est.params, abs=TOLERANCE)  # bf16 model + the CPU step's bf16 copy
    assert got["optimizer"] == pytest.approx(est.optimizer, abs=TOLERANCE)
    assert got["params"] + got["optimizer"] == pytest.approx(est.device_total + est.cpu_total, abs=TOLERANCE)
