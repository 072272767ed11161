"""`dgm export`: a training checkpoint -> an export folder (safetensors + config.json) loadable without DeepSpeed
or Ray."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from data_pipeline import storage
from data_pipeline.scratch import scratch_dir
from trainer.checkpoint import CheckpointError, CheckpointStore
from trainer.export import CONFIG, ExportError, check_replaceable, write_export
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
    """Export the given (default: latest) checkpoint of a run to ``out_dir`` (a folder or an s3:// URL); returns
    ``out_dir``. An s3:// checkpoint is downloaded into a temporary folder beside the export, removed after."""
    remote_out = storage.is_remote(out_dir)
    if remote_out:
        check_remote_replaceable(out_dir)
    else:
        check_replaceable(out_dir)  # before the consolidation's minutes, not after
    local_out = out_dir
    parent = tempfile.gettempdir() if remote_out else os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = scratch_dir(".dgm-export-", parent)
    try:
        store = CheckpointStore(checkpoint_root, staging=scratch)
        tag = tag.strip("/") if tag else tag
        if tag and not storage.exists(storage.join(checkpoint_root, tag, "meta.json")):
            have = store.all_tags()  # listed only when the tag is not there
            raise CheckpointError(f"{checkpoint_root}/{tag}: no such checkpoint (there: "
                                  f"{', '.join(have[-8:]) if have else 'none'})")
        tag = tag or store.latest()
        if tag is None:
            raise CheckpointError(f"{checkpoint_root}: no complete checkpoint to export (is the run's checkpoint_root "
                                  "elsewhere, e.g. s3://...?)")
        meta = store.read_meta(tag)
        if meta.zero_stage == 0:
            raise CheckpointError(f"{checkpoint_root}/{tag}: export reads ZeRO checkpoints (stage >= 1)")
        try:
            cls = family_class(meta.family)
            family = cls(from_dict(cls.config_cls, meta.config.get("model") or {}, "model"), meta.data_info)
        except (ConfigError, ValueError) as e:
            raise CheckpointError(f"{checkpoint_root}/{tag}: its meta.json does not rebuild a {meta.family!r} "
                                  f"model ({e})") from e
        path = store.local_copy(tag)
        states = {name: consolidated_state(path, name) for name in meta.engines}
        if remote_out:
            local_out = os.path.join(scratch, "export")
        write_export(local_out, family, states, {"step": meta.step, "checkpoint": f"{checkpoint_root}/{tag}"})
        if remote_out:
            publish_remote(local_out, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


PUBLISHING = ".dgm-publishing"  # beside an s3:// export while it is being uploaded


def check_remote_replaceable(url: str) -> None:
    """As ``check_replaceable`` for an s3:// export: only an empty prefix or an earlier export is replaced."""
    names = _names_below(url)
    if not names:
        return
    if CONFIG not in names and PUBLISHING not in names:  # an export, or one whose publishing was cut
        raise ExportError(f"{url}: holds {len(names)} objects and is not an earlier export (no {CONFIG}); an "
                          "export replaces its prefix whole, so it will not write there: give --out a new prefix")


def publish_remote(local_dir: str, url: str) -> None:
    """Upload an export with config.json last (an earlier export's config.json removed first), so a cut upload is
    never a loadable export; objects of the earlier export that the new one lacks are removed after."""
    earlier = set(_names_below(url))
    storage.write_bytes(storage.join(url, PUBLISHING), b"")  # a cut publish stays recognisably ours, retryable
    if CONFIG in earlier:
        storage.delete(storage.join(url, CONFIG))
    written = []
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            if rel != CONFIG:
                storage.upload_file(os.path.join(root, name), storage.join(url, rel))
                written.append(rel)
    storage.upload_file(os.path.join(local_dir, CONFIG), storage.join(url, CONFIG))
    for stale in sorted(earlier - set(written) - {CONFIG, PUBLISHING}):
        storage.delete(storage.join(url, stale))
    storage.delete(storage.join(url, PUBLISHING))


def _names_below(url: str) -> list[str]:
    """Object names below an s3:// prefix, relative to it."""
    base = url.rstrip("/") + "/"
    return [u[len(base):] for u in storage.list_prefix(url) if u.startswith(base)]
