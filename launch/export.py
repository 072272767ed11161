"""`dgm export`: a training checkpoint -> an export folder (safetensors + config.json) that torch alone loads."""

from __future__ import annotations

import os

import torch

from trainer.checkpoint import CheckpointError, CheckpointStore
from trainer.export import check_replaceable, write_export
from trainer.families import family_class
from trainer.typed_config import ConfigError, from_dict


def consolidated_state(checkpoint_dir: str, network: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one network, merged from its ZeRO partitions by DeepSpeed's own tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = os.path.join(checkpoint_dir, network)
    try:
        return get_fp32_state_dict_from_zero_checkpoint(path, tag="ds")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot consolidate the ZeRO state ({e})") from e


def export_checkpoint(checkpoint_root: str, out_dir: str, tag: str | None = None) -> str:
    """Export the given (default: latest) checkpoint of a run to ``out_dir``; returns ``out_dir``."""
    check_replaceable(out_dir)  # before the consolidation's minutes, not after
    store = CheckpointStore(checkpoint_root, staging=os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".staging"))
    tag = tag or store.latest()
    if tag is None:
        raise CheckpointError(f"{checkpoint_root}: no complete checkpoint to export")
    meta = store.read_meta(tag)
    if meta.zero_stage == 0:
        raise CheckpointError(f"{checkpoint_root}/{tag}: export reads ZeRO checkpoints (stage >= 1)")
    try:
        cls = family_class(meta.family)
        family = cls(from_dict(cls.config_cls, meta.config.get("model") or {}, "model"), meta.data_info)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{checkpoint_root}/{tag}: its meta.json does not rebuild a {meta.family!r} model "
                              f"({e})") from e
    path = store.local_copy(tag)
    states = {name: consolidated_state(path, name) for name in meta.engines}
    return write_export(out_dir, family, states, {"step": meta.step, "checkpoint": f"{checkpoint_root}/{tag}"})
