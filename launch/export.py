"""`dgm export`: a training checkpoint -> an export folder (safetensors + config.json) loadable without DeepSpeed
or Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from data_pipeline import storage
from data_pipeline.scratch import scratch_dir
from trainer.checkpoint import CheckpointError, CheckpointStore, unreadable_file
from trainer.export import (
    CONFIG,
    EXPORT_FORMAT,
    ExportError,
    check_replaceable,
    export_config,
    export_names,
    write_export,
)
from trainer.families import family_class
from trainer.families.base import Family, OptimConfig
from trainer.typed_config import ConfigError, from_dict


def consolidated_state(checkpoint_dir: str, network: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one network, merged from its ZeRO partitions by DeepSpeed's own tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = os.path.join(checkpoint_dir, network)
    check_whole(path)
    try:
        return get_fp32_state_dict_from_zero_checkpoint(path, tag="ds")
    except Exception as e:  # a damaged file is named above; what is left is a checkpoint of another layout
        raise CheckpointError(f"checkpoint {path}: cannot consolidate the ZeRO state ({type(e).__name__}: {e})") from e


def check_whole(network_dir: str) -> None:
    """Every byte of the network's DeepSpeed files read and CRC-checked: DeepSpeed's readers never check, so one
    flipped byte in a master weight was exported as a weight of 1e36 (the export reads every byte anyway)."""
    bad = unreadable_file(os.path.join(network_dir, "ds"))
    if bad is not None:
        raise CheckpointError(f"checkpoint file {bad[0]} is unreadable: truncated or corrupt ({bad[1]}); export an "
                              "earlier checkpoint (--tag)")


def stage0_state(checkpoint_dir: str, network: str, family: Family, optim: OptimConfig) -> dict[str, torch.Tensor]:
    """Full weights of a network trained without ZeRO: the module state, with the fp32 master weights put back
    where DeepSpeed's bf16/fp16 optimizer kept them (in the family's own param-group order)."""
    path = os.path.join(checkpoint_dir, network)
    check_whole(path)
    file = os.path.join(path, "ds", "mp_rank_00_model_states.pt")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=False)
        state = dict(saved["module"])
        masters = (saved.get("optimizer") or {}).get("fp32_groups")
    except Exception as e:
        raise CheckpointError(f"checkpoint file {file}: cannot read its module state ({type(e).__name__}: {e})") from e
    if masters is None:  # fp32 training: the module's weights are the master weights
        return state
    modules = family.build_modules()
    named = {id(p): n for n, p in modules[network].named_parameters()}
    groups = family.build_optimizers(modules, optim)[network].param_groups
    order = [named[id(p)] for g in groups for p in g["params"]]
    flat = [t for group in masters for t in group]
    if [tuple(t.shape) for t in flat] != [tuple(state[n].shape) for n in order]:
        raise CheckpointError(f"checkpoint file {file}: its fp32 master weights do not follow the {network!r} "
                              "network's parameter groups")
    state.update({n: t.float() for n, t in zip(order, flat, strict=True)})
    return state


def export_checkpoint(checkpoint_root: str, out_dir: str, tag: str | None = None, *, family: str | None = None,
                      model_config: Any = None, on_model_change: str = "error") -> str:
    """Export the given (default: latest) checkpoint of a run to ``out_dir`` (a folder or an s3:// URL); returns
    ``out_dir``. An s3:// checkpoint is downloaded into a temporary folder beside the export, removed after.
    ``family``/``model_config`` (the config ``dgm export`` was given) must be the checkpoint's, as on resume: the
    export is built from the checkpoint's own config, so a config of another model would be silently ignored."""
    remote_out = storage.is_remote(out_dir)
    if not remote_out:
        out_dir = storage.local_path(out_dir)  # file:///abs/path is a folder, not ./file:/abs/path
    if remote_out:
        check_remote_replaceable(out_dir)
    else:
        check_replaceable(out_dir)  # before the consolidation's minutes, not after
    local_out = out_dir
    parent = tempfile.gettempdir() if remote_out else os.path.dirname(os.path.abspath(out_dir))
    made = _first_missing(parent)
    os.makedirs(parent, exist_ok=True)
    scratch = scratch_dir(".dgm-export-", parent)
    published = False
    try:
        store = CheckpointStore(checkpoint_root, staging=scratch)
        tag = tag.strip("/") if tag else tag
        if tag and not storage.exists(storage.join(checkpoint_root, tag, "meta.json")):
            have = store.all_tags()  # listed only when the tag is not there
            raise CheckpointError(f"{checkpoint_root}/{tag}: no such checkpoint (there: "
                                  f"{', '.join(have[-8:]) if have else 'none'})")
        if tag and not store.is_complete(tag):
            raise CheckpointError(f"{checkpoint_root}/{tag}: an incomplete checkpoint (a save that was cut, or an "
                                  "upload still missing ranks): export a complete one")
        tag = tag or store.latest()
        if tag is None:
            raise CheckpointError(f"{checkpoint_root}: no complete checkpoint to export (is the run's checkpoint_root "
                                  "elsewhere, e.g. s3://...?)")
        meta = store.read_meta(tag)
        if family is not None:
            store.check(tag, meta, expect_family=family, model_config=model_config, on_model_change=on_model_change)
        try:
            cls = family_class(meta.family)
            family = cls(from_dict(cls.config_cls, meta.config.get("model") or {}, "model"), meta.data_info)
        except (ConfigError, ValueError) as e:
            raise CheckpointError(f"{checkpoint_root}/{tag}: its meta.json does not rebuild a {meta.family!r} "
                                  f"model ({e})") from e
        path = store.local_copy(tag)
        if meta.zero_stage == 0:
            optim = from_dict(OptimConfig, (meta.config.get("trainer") or {}).get("optim") or {}, "trainer.optim")
            states = {name: stage0_state(path, name, family, optim) for name in meta.engines}
        else:
            states = {name: consolidated_state(path, name) for name in meta.engines}
        if remote_out:
            local_out = os.path.join(scratch, "export")
        write_export(local_out, family, states, {"step": meta.step, "checkpoint": f"{checkpoint_root}/{tag}"})
        if remote_out:
            publish_remote(local_out, out_dir)
        published = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not published and made:  # a failed export leaves no empty folders it made on the way
            with contextlib.suppress(OSError):
                _remove_empty_up_to(parent, made)
    return out_dir


def _first_missing(folder: str) -> str:
    """The outermost folder of ``folder``'s path that does not exist yet ('' when it exists)."""
    missing = ""
    while folder and not os.path.isdir(folder):
        missing, folder = folder, os.path.dirname(folder)
    return missing


def _remove_empty_up_to(folder: str, top: str) -> None:
    """Remove ``folder`` and its parents up to ``top`` included, while they are empty."""
    while True:
        os.rmdir(folder)
        if folder == top:
            return
        folder = os.path.dirname(folder)


PUBLISHING = ".dgm-publishing"  # beside an s3:// export while it is being uploaded


def check_remote_replaceable(url: str) -> None:
    """As ``check_replaceable`` for an s3:// export: only an empty prefix or an earlier export is replaced."""
    names = _names_below(url)
    if not names or PUBLISHING in names:  # empty, or an export whose publishing was cut
        return
    if _earlier_config(url) is None:
        raise ExportError(f"{url}: holds {len(names)} objects and is not an earlier export (no {CONFIG} of format "
                          f"{EXPORT_FORMAT}); an export replaces its prefix, so it will not write there: give --out "
                          "a new prefix")


def _earlier_config(url: str) -> dict | None:
    """The config.json of an earlier export at ``url``; None when there is none or it is not an export's."""
    try:
        return export_config(storage.read_bytes(storage.join(url, CONFIG)))
    except storage.StorageNotFoundError:
        return None


def publish_remote(local_dir: str, url: str) -> None:
    """Upload an export with config.json last (an earlier export's config.json removed first), so a cut upload is
    never a loadable export; files of the earlier export that the new one lacks are removed after, objects it did
    not list (a sample grid put beside it) are left."""
    config, names = _earlier_config(url), _names_below(url)
    if config is not None:
        earlier = {n for n in names if n.split("/")[0] in export_names(config)}
    else:  # a publish that was cut after removing config.json: its marker kept the earlier export's names
        earlier = set(_marker_names(url)) & set(names) if PUBLISHING in names else set()
    # the marker: a cut publish stays recognisably ours and retryable, and remembers what the earlier export held
    storage.write_bytes(storage.join(url, PUBLISHING), json.dumps(sorted(earlier)).encode())
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


def _marker_names(url: str) -> list[str]:
    """The earlier export's object names that a cut publish's marker recorded (none for an unreadable marker)."""
    try:
        names = json.loads(storage.read_bytes(storage.join(url, PUBLISHING)) or b"[]")
    except (storage.StorageNotFoundError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _names_below(url: str) -> list[str]:
    """Object names below an s3:// prefix, relative to it."""
    base = url.rstrip("/") + "/"
    return [u[len(base):] for u in storage.list_prefix(url) if u.startswith(base)]
