"""What DeepSpeed's checkpoint load leaves out or gets wrong, put right after it.

- Optimizer settings: a normal load brings back the checkpoint's param groups whole, so a changed
  ``trainer.optim.weight_decay`` (or betas, eps) was dropped without a word; DeepSpeed's universal load at ZeRO-3
  copies group 0's settings into every group, so the no-decay group (biases, norms) decayed after a resume on
  another world size, and every later checkpoint kept it. The settings the family built win, as the rate does.
- Buffers: the universal load (another world size) rebuilds the parameters but never reads the module's state
  dict, so persistent buffers (a GAN classifier's EMA weights, the prior's gradient scales) went back to their
  initial values. They are read from the checkpoint's own module state file.
- Step counters: the universal load at ZeRO-3 hands every param group the same ``step`` tensor, so Adam counted two
  steps per step with two groups (its bias correction off for the rest of the run).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

# Param-group entries the engine owns: the tensors, and the rate, which the schedule sets (trainer.loop.apply_schedule)
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def base_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (or the engine's own, without one)."""
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_settings(engine: Any) -> list[dict[str, Any]]:
    """Each param group's settings as the family built them (weight decay, betas, eps, ...), before a load."""
    optimizer = base_optimizer(engine)
    if optimizer is None:
        return []
    return [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups]


def restore_optimizer_settings(engine: Any, settings: list[dict[str, Any]]) -> None:
    """Put the built settings back into the loaded param groups (one per group, in the same order)."""
    optimizer = base_optimizer(engine)
    if optimizer is None or not settings:
        return
    if len(optimizer.param_groups) != len(settings):
        raise RuntimeError(f"the loaded optimizer has {len(optimizer.param_groups)} param groups, the built one had "
                           f"{len(settings)}")
    for group, built in zip(optimizer.param_groups, settings, strict=True):
        group.update(built)


def separate_step_counters(engine: Any) -> None:
    """Give each optimizer state its own ``step`` tensor where a load left several sharing one."""
    optimizer = base_optimizer(engine)
    if optimizer is None:
        return
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def restore_buffers(engine: Any, ds_dir: str) -> list[str]:
    """Load the module's persistent buffers from DeepSpeed's module state file under ``ds_dir`` (a ZeRO checkpoint
    folder, saved at any world size: buffers are whole on every rank). Returns the names loaded; raises
    FileNotFoundError or KeyError when the checkpoint lacks the file or a buffer."""
    module = engine.module
    persistent = set(module.state_dict(keep_vars=True))
    buffers = {name: b for name, b in module.named_buffers() if name in persistent}
    if not buffers:
        return []
    files = sorted(glob.glob(os.path.join(ds_dir, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(os.path.join(ds_dir, "mp_rank_00_model_states.pt"))
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    missing = sorted(set(buffers) - set(saved))
    if missing:
        raise KeyError(f"{os.path.basename(files[0])} lacks the buffers {', '.join(missing)}")
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(saved[name].to(device=buffer.device, dtype=buffer.dtype))
    return sorted(buffers)
