"""Exports: one safetensors file plus config.json (and a family's extra files) that load without DeepSpeed or Ray.

Writing streams tensors into the file one at a time (the safetensors layout is an 8-byte header length, a JSON
header of dtypes, shapes and offsets, then raw little-endian bytes), so an export never holds two full copies of
the weights. config.json records the sha256 of every file; loading checks them, so a tampered or truncated file
is refused by name. This module imports neither DeepSpeed nor Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from data_pipeline.scratch import scratch_dir
from trainer.families import family_class
from trainer.families.base import Family
from trainer.typed_config import ConfigError, from_dict

EXPORT_FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """An export folder that is missing, incomplete or whose files do not match their recorded checksums."""


SETTINGS_KEY = "dgm.settings_sha256"
"""The weights file's metadata entry holding ``settings_digest`` of the config.json it was exported with: the
weights' sha256 is listed in config.json, but nothing covered config.json itself, so an edit that kept the tensor
shapes (another mode, codec quality or image size) loaded and drew other images without a word."""


def settings_digest(config: Mapping[str, Any]) -> str:
    """sha256 of what rebuilds the model from config.json: family, model, data_info and networks."""
    keys = ("family", "model", "data_info", "networks")
    return hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(path: str, tensors: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Stream named tensors into a safetensors file; ``shapes`` (name -> (dtype, shape)) fixes the header first."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in shapes.items():
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            expect = header[name]
            if list(t.shape) != expect["shape"] or _DTYPES[t.dtype] != expect["dtype"]:
                raise ExportError(f"tensor {name}: got {t.dtype} {tuple(t.shape)}, header says {expect}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too


def write_export(out_dir: str, family: Family, state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
                 extra: Mapping[str, Any] | None = None) -> str:
    """Write an export folder atomically (a scratch folder beside it, renamed at the end) where
    ``check_replaceable`` allows. Returns ``out_dir``."""
    check_replaceable(out_dir)
    check_fits(family, state_dicts, out_dir)  # what is published is what loads, checked before a byte is written
    base = out_dir.rstrip("/")
    parent, out_name = os.path.split(os.path.abspath(base))
    os.makedirs(parent, exist_ok=True)
    # named after this process (a killed export's is swept by the next), never a name a user's folder could have
    tmp = scratch_dir(f".{out_name}.partial-", parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is published with the usual mode
    try:
        shapes = {f"{m}.{k}": (v.dtype, tuple(v.shape)) for m, sd in state_dicts.items() for k, v in sd.items()}
        settings = {"family": family.name, "model": dataclasses.asdict(family.config),
                    "data_info": family.data_info, "networks": sorted(state_dicts)}
        write_safetensors(os.path.join(tmp, WEIGHTS),
                          ((f"{m}.{k}", v) for m, sd in state_dicts.items() for k, v in sd.items()), shapes,
                          {SETTINGS_KEY: settings_digest(settings)})
        files = {WEIGHTS: _sha256(os.path.join(tmp, WEIGHTS))}
        for name, data in family.export_files().items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)  # names may hold a sub-folder
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            files[name] = _sha256(os.path.join(tmp, name))
        config = {
            "format": EXPORT_FORMAT,
            **settings,
            "files": files,
            **(extra or {}),
        }
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
        try:  # what is published is what loads: the family reads its own files back (a bundled dVAE export...)
            read_export(tmp)
        except ExportError as e:
            raise ExportError(f"{out_dir}: the new export does not load back, nothing was replaced "
                              f"({str(e).replace(tmp, out_dir)})") from e
        # earlier exports set aside by a write that crashed before it could carry the user's files over
        aside_name = re.compile(re.escape(out_name) + r"\.old-[0-9a-f]{12}")
        stranded = sorted(os.path.join(parent, n) for n in os.listdir(parent) if aside_name.fullmatch(n))
        old = f"{base}.old-{os.urandom(6).hex()}"
        if os.path.exists(out_dir):  # renamed aside, not deleted first: a crash never leaves neither export
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        for aside in [old, *stranded]:
            if os.path.isdir(aside):
                _carry_user_entries(aside, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed write left
    return out_dir


def _carry_user_entries(aside: str, out_dir: str) -> None:
    """Move the files the user put in an earlier export (listed only now that it is set aside, so nothing written
    meanwhile is missed) into the new one, then remove the rest of it; a name the new export uses too stays."""
    if os.listdir(aside) and not _is_export(aside):
        return  # not an export set aside by write_export: not ours to empty
    kept = user_entries(aside)
    clash = [name for name in kept if os.path.lexists(os.path.join(out_dir, name))]
    for name in kept:
        if name not in clash:
            os.replace(os.path.join(aside, name), os.path.join(out_dir, name))
    if clash:
        log.warning("%s: the new export has files named like %s, which were not the earlier export's; they are "
                    "kept in %s", out_dir, ", ".join(clash), aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def check_fits(family: Family, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> None:
    """Every network's weights have the names and shapes of the model ``load_export`` will build (as its strict
    load demands). The model is built on the meta device, so no third copy of the weights is made."""
    try:
        with torch.device("meta"):
            modules = family.build_modules()
    except Exception:  # a module whose construction computes on its tensors: built for real instead
        modules = family.build_modules()
    if sorted(modules) != sorted(state_dicts):
        raise ExportError(f"{where}: the checkpoint has networks {sorted(state_dicts)}, the {family.name!r} model "
                          f"{sorted(modules)}")
    for name, module in modules.items():
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state_dicts[name].items()}
        problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
        problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
        problems += [f"size mismatch for {k}: {got[k]} vs the model's {want[k]}"
                     for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
        if problems:
            raise ExportError(f"{where}: weights of {name!r} do not fit the {family.name!r} model "
                              f"({_summary(problems)})")


def export_names(config: Mapping[str, Any]) -> set[str]:
    """The top-level names an export's config.json accounts for: itself and the first part of every listed file."""
    files = config.get("files")
    return {CONFIG} | {str(n).replace("\\", "/").split("/")[0] for n in files} if isinstance(files, dict) else {CONFIG}


def export_config(raw: bytes | str) -> dict | None:
    """An export's config.json content as a mapping, or None when it is not an export's (unreadable JSON, another
    shape, another format): what decides whether a folder or prefix may be replaced."""
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    return config if isinstance(config, dict) and config.get("format") == EXPORT_FORMAT else None


def _local_export_config(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, CONFIG), "rb") as f:
            return export_config(f.read())
    except OSError:
        return None


def user_entries(out_dir: str) -> list[str]:
    """Entries of an earlier export folder that its config.json does not list (a sample grid ``dgm sample`` wrote
    there, the user's notes): a new export carries them over instead of deleting them."""
    config = _local_export_config(out_dir)
    return [] if config is None else sorted(set(os.listdir(out_dir)) - export_names(config))


def _is_export(folder: str) -> bool:
    return _local_export_config(folder) is not None


def check_replaceable(out_dir: str) -> None:
    """An export replaces only a missing or empty folder or an earlier export: never a folder of other files (a run
    directory, ``.``), which ``--out`` could otherwise name by mistake and lose."""
    here = os.path.abspath(os.getcwd())
    if os.path.commonpath([here, os.path.abspath(out_dir)]) == os.path.abspath(out_dir):
        # an export replaces its folder by renaming: the folder this process stands in cannot be renamed away
        raise ExportError(f"{out_dir}: is the current folder or holds it; give --out a folder below it")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a folder; give --out a new or empty folder")
    entries = os.listdir(out_dir)
    if not entries:
        return
    if not _is_export(out_dir):
        raise ExportError(f"{out_dir}: holds {len(entries)} entries and is not an earlier export (no {CONFIG} of "
                          f"format {EXPORT_FORMAT}); an export replaces its folder, so it will not write "
                          "there: give --out a new or empty folder")


def read_export(export_dir: str) -> tuple[Family, dict[str, Any]]:
    """An export folder's family, rebuilt from config.json once every listed file's sha256 is checked and the
    family has read back its own files (tokenizer, bundled exports); the weights are not loaded."""
    cfg_path = os.path.join(export_dir, CONFIG)
    if not os.path.isfile(cfg_path):
        raise ExportError(f"{export_dir}: not an export folder (no {CONFIG})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ExportError(f"{cfg_path}: cannot be read ({e.strerror or e})") from e
    if not isinstance(config, dict):
        raise ExportError(f"{cfg_path}: must be a JSON object, got {type(config).__name__}")
    fmt = config.get("format")
    if isinstance(fmt, int) and fmt > EXPORT_FORMAT:
        raise ExportError(f"{cfg_path}: export format {fmt} was written by a newer dgm (this one reads format "
                          f"{EXPORT_FORMAT}); upgrade dgm to load it")
    if fmt != EXPORT_FORMAT:
        raise ExportError(f"{cfg_path}: unknown export format {fmt!r} (this dgm reads format {EXPORT_FORMAT})")
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or not all(isinstance(d, str) for d in files.values()):
        raise ExportError(f"{cfg_path}: 'files' must map each exported file, {WEIGHTS} included, to its sha256")
    for name, digest in files.items():
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts:
            raise ExportError(f"{cfg_path}: file {name!r} is not a path inside the export folder")
        path = os.path.join(export_dir, name)
        if not os.path.isfile(path):
            raise ExportError(f"{path}: missing from the export (or not a file)")
        try:
            matches = _sha256(path) == digest
        except OSError as e:
            raise ExportError(f"{path}: cannot be read ({e.strerror or e})") from e
        if not matches:
            raise ExportError(f"{path}: sha256 does not match config.json (modified or truncated)")
    data_info = config.get("data_info", {})
    if not isinstance(data_info, dict):
        raise ExportError(f"{cfg_path}: 'data_info' must be a JSON object, got {type(data_info).__name__}")
    missing = [key for key in ("family", "model") if key not in config]
    if missing:
        raise ExportError(f"{cfg_path}: missing {' and '.join(repr(k) for k in missing)}: not a config.json dgm "
                          "export wrote, or edited since")
    try:
        cls = family_class(config["family"])
        family = cls(from_dict(cls.config_cls, config["model"], "model"), data_info)
    except (ConfigError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{cfg_path}: cannot rebuild the model ({e})") from e
    family.attach_export(export_dir)
    return family, config


def load_export(export_dir: str, device: str = "cpu") -> tuple[Family, dict[str, nn.Module], dict[str, Any]]:
    """Rebuild a family and its networks from an export folder, after checking every file's sha256."""
    family, config = read_export(export_dir)
    modules = family.build_modules()
    weights = os.path.join(export_dir, WEIGHTS)
    try:
        with safe_open(weights, framework="pt", device=device) as f:
            recorded = (f.metadata() or {}).get(SETTINGS_KEY)  # exports written before it was recorded have none
            keys = set(f.keys())
            tensors = {name: {k[len(name) + 1:]: f.get_tensor(k) for k in keys if k.startswith(name + ".")}
                       for name in modules}
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ExportError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if recorded is not None and recorded != settings_digest(config):
        raise ExportError(f"{os.path.join(export_dir, CONFIG)}: its family, model, data_info or networks were changed "
                          "after the export (they no longer match what its weights were exported with); export "
                          "the checkpoint again rather than editing them")
    for name, module in modules.items():
        state = module.state_dict()
        cast = [k for k, t in tensors[name].items()
                if k in state and state[k].is_floating_point() != t.is_floating_point()]
        if cast:
            raise ExportError(f"{weights}: tensor {name}.{cast[0]} is {tensors[name][cast[0]].dtype}, the model's is "
                              f"{state[cast[0]].dtype} (loading would cast it)")
        try:
            module.load_state_dict(tensors[name], strict=True)
        except RuntimeError as e:
            raise ExportError(f"{export_dir}: weights of {name!r} do not fit the model built from {CONFIG} "
                              f"({_first_problems(str(e))})") from e
        module.to(device).eval()
    return family, modules, config


def _first_problems(message: str) -> str:
    """torch lists every mismatched tensor (hundreds of lines when a size setting differs): the first few and a
    count."""
    return _summary([line.strip() for line in message.splitlines()[1:] if line.strip()] or [message])


def _summary(problems: list[str], keep: int = 2) -> str:
    """The first ``keep`` problems and how many more: one line, however many tensors disagree."""
    more = f"; and {len(problems) - keep} more" if len(problems) > keep else ""
    return "; ".join(problems[:keep]) + more


def load_export_url(url: str, device: str = "cpu") -> tuple[Family, dict[str, nn.Module], dict[str, Any]]:
    """``load_export`` for a folder or an s3:// URL. A remote export's config.json is read first and only the files it
    lists are downloaded (a URL that is not an export costs one request, not a download of everything under it),
    into a temporary folder removed once the weights are in memory; errors name the URL."""
    from data_pipeline import storage

    if not storage.is_remote(url):
        return load_export(storage.local_path(url), device)
    config_url = storage.join(url, CONFIG)
    try:
        raw = storage.read_bytes(config_url)
    except storage.StorageNotFoundError as e:
        raise ExportError(f"{url}: not an export (no {CONFIG})") from e
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{config_url}: not valid JSON ({e})") from e
    files = config.get("files") if isinstance(config, dict) else None
    if not isinstance(files, dict):
        raise ExportError(f"{config_url}: 'files' must map each exported file to its sha256")
    tmp = scratch_dir("dgm-export-")
    try:
        with open(os.path.join(tmp, CONFIG), "wb") as f:
            f.write(raw)
        for name in files:
            parts = str(name).replace("\\", "/").split("/")
            if os.path.isabs(name) or ".." in parts:
                raise ExportError(f"{config_url}: file {name!r} is not a path inside the export folder")
            try:
                storage.download_file(storage.join(url, name), os.path.join(tmp, name))
            except storage.StorageNotFoundError as e:
                raise ExportError(f"{storage.join(url, name)}: missing from the export") from e
        try:
            return load_export(tmp, device)
        except ExportError as e:
            raise ExportError(str(e).replace(tmp, url.rstrip("/"))) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
