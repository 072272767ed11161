"""Training checkpoints: DeepSpeed's own files per engine, plus step, data-stream state, config and RNG states.

Layout under the run's checkpoint root (a folder or s3://bucket/prefix):

    step-00000200/meta.json            step, stream state, world size, family, config
    step-00000200/<engine>/ds/...      DeepSpeed's checkpoint of each engine
    step-00000200/rng-rank<r>.safetensors
    step-00000200/_uploaded/rank<r>    (s3:// only) rank r's files are all uploaded
    step-00000200/_failed/rank<r>      (s3:// only) rank r's upload failed: latest will not move there
    latest                             the name of the newest complete checkpoint

A checkpoint is written into a staging folder first (``step-X.partial`` beside it for local roots, a local temp
folder uploaded file by file for s3://); ``latest`` moves to it only after every rank has finished writing (and
uploading), so a crash mid-save never leaves a broken latest. Uploads to s3:// run in a background thread per rank
while training goes on; rank 0 moves ``latest`` when every rank's completion marker is there, and a rank that fails
first lets its upload finish (``finish_after_failure``). Older checkpoints beyond ``keep`` are deleted after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data_pipeline import storage
from trainer.engine_state import (
    optimizer_settings,
    restore_buffers,
    restore_optimizer_settings,
    separate_step_counters,
)
from trainer.typed_config import ConfigError, from_dict

log = logging.getLogger(__name__)
LATEST = "latest"
CONVERTED = ".converted"  # in an engine's ds_universal folder: DeepSpeed's conversion ran to its end
DOWNLOADED = ".downloaded"  # in a local copy of an s3:// checkpoint: every file of it is there
META = "meta.json"
DONE = "_uploaded"
FINALIZE_RETRY_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # rank 0's waits between tries to move latest (30 s in all)
FAILED = "_failed"  # (s3:// only) rank r's upload failed: the checkpoint will never be complete
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, of another model, or does not fit the engines it is loaded into."""


@dataclass
class CheckpointMeta:
    step: int
    stream_state: dict[str, int]
    world_size: int
    family: str
    engines: list[str]
    zero_stage: int
    config: dict[str, Any]
    data_info: dict[str, Any]
    format: int = FORMAT
    order: dict[str, Any] = field(default_factory=dict)  # what fixes the sample order (see trainer.loop)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fail_together(error: Exception | None, what: str) -> None:
    """Collective: when any rank failed at ``what``, every rank raises (the others a CheckpointError naming the
    rank and its cause). A rank that raised alone would leave the others in the next barrier until the process
    group's timeout: torchrun does not end the group for them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        rank, report = failed[0]
        report = report.removeprefix(f"{what} failed: ")  # the failing rank's own message may begin as ours
        raise CheckpointError(f"{what} failed on rank {rank}: {report}")


def error_of(work: Callable[[], None], *kinds: type[Exception]) -> Exception | None:
    """Run ``work``; the error of one of ``kinds`` it raised (for ``fail_together``), or None."""
    try:
        work()
    except kinds as e:
        return e
    return None


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """The step a tag names (``step-00000200`` -> 200), or None for another name."""
    digits = tag.removeprefix("step-")
    return int(digits) if tag.startswith("step-") and digits.isdigit() else None


class CheckpointStore:
    """Saves and finds checkpoints under one root, for one rank of a world."""

    def __init__(self, root: str, *, rank: int = 0, world_size: int = 1, keep: int = 3, staging: str | None = None,
                 async_upload: bool = True):
        self.root, self.rank, self.world_size, self.keep = root, rank, world_size, keep
        self.remote = storage.is_remote(root)
        self.staging = staging or tempfile.gettempdir()
        self.async_upload = async_upload
        self._uploader: threading.Thread | None = None
        self._finalizer: threading.Thread | None = None
        self._upload_error: Exception | None = None
        self._finalize_error: CheckpointError | None = None
        self._stop = threading.Event()
        self._upload_failed = False  # some rank's upload failed, as every rank learnt in save() or wait()

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None when there is none."""
        url = storage.join(self.root, LATEST)
        tag = self._latest_name()
        if tag is None:
            return None
        if not tag.startswith("step-") or not storage.exists(storage.join(self.root, tag, META)):
            raise CheckpointError(f"{url} points at {tag!r}, which is not a complete checkpoint")
        return tag

    def is_complete(self, tag: str) -> bool:
        """Whether ``tag`` names a whole checkpoint: a finished local save (not a cut ``.partial`` one), or an
        s3:// one that every rank finished uploading."""
        if step_of_tag(tag) is None or not storage.exists(storage.join(self.root, tag, META)):
            return False
        return not self.remote or self._uploaded_ranks(tag) >= self.read_meta(tag).world_size

    def _latest_name(self) -> str | None:
        """What ``latest`` says, unchecked; None when there is no ``latest``."""
        url = storage.join(self.root, LATEST)
        if not storage.exists(url):
            return None
        return storage.read_bytes(url).decode("utf-8", errors="replace").strip()

    def read_meta(self, tag: str) -> CheckpointMeta:
        url = storage.join(self.root, tag, META)
        try:
            data = json.loads(storage.read_bytes(url))
            meta = CheckpointMeta(**data)
        except (storage.StorageError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {url}: unreadable metadata ({e})") from e
        if meta.format != FORMAT:
            raise CheckpointError(f"checkpoint {url}: format {meta.format}, this dgm reads {FORMAT}")
        wrong = [name for name, ok in (
            ("step", type(meta.step) is int and meta.step >= 0),
            ("world_size", type(meta.world_size) is int and meta.world_size >= 1),
            ("zero_stage", type(meta.zero_stage) is int), ("family", isinstance(meta.family, str)),
            ("engines", isinstance(meta.engines, list) and all(isinstance(e, str) for e in meta.engines)),
            *((name, isinstance(getattr(meta, name), dict))
              for name in ("stream_state", "config", "data_info", "order"))) if not ok]
        if wrong:  # read as given, "engines": "model" named the networks m, o, d, e, l
            raise CheckpointError(f"checkpoint {url}: unreadable metadata (wrong type of {', '.join(wrong)})")
        return meta

    def _write_dir(self, tag: str) -> str:
        if self.remote:
            return os.path.join(self.staging, f"dgm-ckpt-save-rank{self.rank}", tag)
        return os.path.join(_local(self.root), tag + ".partial")

    def save(self, step: int, engines: Mapping[str, Any], meta: CheckpointMeta) -> str:
        """Collective: every rank calls it. Local roots: returns once ``latest`` points at the new checkpoint.
        s3:// roots with ``async_upload``: returns once the checkpoint is staged locally; the upload runs in the
        background and ``latest`` moves when every rank's upload is complete (see ``wait``)."""
        tag = tag_for(step)
        self._fail_together_on_upload(error_of(self._join_upload, CheckpointError))
        out = self._write_dir(tag)
        if self.remote:  # this rank's earlier tags whose upload a killed process left: no upload is in flight now
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        elif self.rank == 0 and os.path.exists(out):
            shutil.rmtree(out)
        if self.remote and self.rank == 0:
            self._clear_remote(tag)
        _barrier()
        os.makedirs(out, exist_ok=True)
        for name, engine in engines.items():
            engine.save_checkpoint(os.path.join(out, name), tag="ds", save_latest=False,
                                   client_state=universal_info())
        save_file(rng_state(), os.path.join(out, f"rng-rank{self.rank}.safetensors"))
        if self.rank == 0:
            with open(os.path.join(out, META), "w") as f:
                json.dump(asdict(meta), f, indent=1)
        _barrier()
        if not self.remote:
            if self.rank == 0:
                final = os.path.join(_local(self.root), tag)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(out, final)
                self._point_latest(tag)
            _barrier()
            return tag
        if self.async_upload:
            self._uploader = threading.Thread(target=self._upload, args=(out, tag), daemon=True)
            self._uploader.start()
            if self.rank == 0:
                previous = self._finalizer
                self._finalizer = threading.Thread(target=self._finalize, args=(tag, previous), daemon=True)
                self._finalizer.start()
        else:
            self._upload(out, tag)
            fail_together(error_of(self._raise_upload_error, CheckpointError),
                          f"checkpoint upload to {self.root}")
            if self.rank == 0:
                self._finalize(tag, None)
            _barrier()
        return tag

    def _clear_remote(self, tag: str) -> None:
        """Remove what an earlier, interrupted save of ``tag`` left under the root (other ranks' files, their
        completion markers, which would count towards this save), unless ``latest`` points at it."""
        if self._latest_name() == tag:
            return
        storage.delete_prefix(storage.join(self.root, tag) + "/")

    def _upload(self, out: str, tag: str) -> None:
        """Upload this rank's staged files, then its completion marker (the finalizer counts the markers)."""
        if threading.current_thread() is not threading.main_thread():
            try:  # Linux schedules threads as tasks: a nice upload thread leaves the cores to the training step
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
            except (OSError, AttributeError):
                pass
        try:
            storage.upload_dir(out, storage.join(self.root, tag))
            storage.write_bytes(storage.join(self.root, tag, DONE, f"rank{self.rank}"), b"")
            shutil.rmtree(out, ignore_errors=True)
        except Exception as e:  # surfaced by wait(); training goes on meanwhile
            log.error("checkpoint upload of %s/%s failed on rank %d: %s", self.root, tag, self.rank, e)
            self._upload_error = e
            with contextlib.suppress(Exception):  # tells rank 0's finalizer not to wait for this rank's marker
                storage.write_bytes(storage.join(self.root, tag, FAILED, f"rank{self.rank}"), str(e).encode())

    def _uploaded_ranks(self, tag: str) -> int:
        return len(storage.list_prefix(storage.join(self.root, tag, DONE) + "/"))

    def _failed_ranks(self, tag: str) -> int:
        return len(storage.list_prefix(storage.join(self.root, tag, FAILED) + "/"))

    def _finalize(self, tag: str, previous: threading.Thread | None) -> None:
        """Rank 0, in the background: ``_finalize_once``, retried through S3 errors that outlast boto3's own
        retries (a few seconds' outage); one that outlasts these too is raised by ``wait`` (this thread died of it,
        and the run ended "finished" with ``latest`` behind its last checkpoint)."""
        if previous is not None:
            previous.join()
        for delay in (*FINALIZE_RETRY_S, None):
            try:
                self._finalize_once(tag)
                self._finalize_error = None
                return
            except Exception as e:  # noqa: BLE001 - a dead thread would say nothing
                if delay is None:
                    self._finalize_error = CheckpointError(
                        f"checkpoint {self.root}/{tag}: could not check its ranks' markers or move 'latest' to it "
                        f"({len(FINALIZE_RETRY_S) + 1} tries over {sum(FINALIZE_RETRY_S):g} s): {e}; 'latest' "
                        f"still names the checkpoint before it (once every rank's marker is under {tag}/{DONE}/, "
                        f"write {tag} into {self.root}/{LATEST} to resume from it)")
                    log.error("%s", self._finalize_error)
                    return
                log.warning("checkpoint %s/%s: moving latest failed (%s); retrying in %g s", self.root, tag, e, delay)
                time.sleep(delay)

    def _finalize_once(self, tag: str) -> None:
        """Move ``latest`` to ``tag`` once every rank's marker exists; give up when ``wait`` says so."""
        while self._uploaded_ranks(tag) < self.world_size:
            if self._failed_ranks(tag):
                log.error("checkpoint %s/%s: a rank's upload failed: latest stays where it was", self.root, tag)
                return
            if self._stop.wait(0.2):
                if self._uploaded_ranks(tag) < self.world_size:
                    log.error("checkpoint %s/%s incomplete: latest stays where it was", self.root, tag)
                    return
        self._point_latest(tag)

    def _point_latest(self, tag: str) -> None:
        storage.write_bytes(storage.join(self.root, LATEST), tag.encode())
        self._prune(tag)

    def _join_upload(self) -> None:
        if self._uploader is not None:
            self._uploader.join()
            self._uploader = None
        self._raise_upload_error()

    def _raise_upload_error(self) -> None:
        if self._upload_error is not None:
            error, self._upload_error = self._upload_error, None
            raise CheckpointError(f"checkpoint upload to {self.root} failed: {error}") from error

    def wait(self) -> None:
        """Collective: finish this rank's upload; rank 0 then moves ``latest`` to the last complete checkpoint."""
        error = error_of(self._join_upload, CheckpointError)
        _barrier()
        if self.rank == 0 and self._finalizer is not None:
            self._stop.set()
            self._finalizer.join()
            self._finalizer = None
            self._stop.clear()
            error, self._finalize_error = error or self._finalize_error, None
        self._fail_together_on_upload(error)

    def _fail_together_on_upload(self, error: Exception | None) -> None:
        """``fail_together`` for an upload, remembering a failure: the checkpoint it was for will never be
        complete, so nothing waits for it after (``finish_after_failure``)."""
        try:
            fail_together(error, f"checkpoint upload to {self.root}")
        except CheckpointError:
            self._upload_failed = True
            raise

    def finish_after_failure(self, timeout_s: float = 600.0) -> None:
        """Not collective: a rank that is failing gives its background upload, and rank 0 the move of ``latest``,
        up to ``timeout_s`` to finish. The upload threads are daemons, so a failure right after a checkpoint (an
        eval, a sample grid, the next steps) ended the process with them, and the checkpoint was lost."""
        if not any(t is not None and t.is_alive() for t in (self._uploader, self._finalizer)):
            return
        if self._upload_failed:  # the failure is the upload's: latest cannot move to that checkpoint
            self._stop.set()
            if self._finalizer is not None:
                self._finalizer.join()
            return
        if self.rank == 0:
            print(f"[checkpoint] finishing the upload to {self.root} before the run ends (up to {timeout_s:.0f} s)",
                  flush=True)
        start = time.monotonic()
        deadline = start + timeout_s
        if self._uploader is not None:
            self._uploader.join(max(0.0, deadline - time.monotonic()))
        if self._finalizer is not None:
            # the other ranks upload alike checkpoints at the same time, and a failed upload leaves a marker that
            # ends the finalizer; a rank that died leaves neither, so its wait is bounded by what this one took
            grace = max(60.0, 2 * (time.monotonic() - start))
            self._finalizer.join(max(0.0, min(deadline, time.monotonic() + grace) - time.monotonic()))
            self._stop.set()
            self._finalizer.join()

    def all_tags(self) -> list[str]:
        if self.remote:
            names = {u[len(self.root.rstrip("/")) + 1:].split("/")[0] for u in storage.list_prefix(self.root)}
        else:
            names = set(os.listdir(_local(self.root))) if os.path.isdir(_local(self.root)) else set()
        return sorted(n for n in names if n.startswith("step-") and not n.endswith(".partial"))

    def _prune(self, newest: str) -> None:
        """Keep ``newest`` and the ``keep - 1`` complete checkpoints before it; an older tag whose upload a crash
        cut is removed, not counted (it took a complete checkpoint's place and stayed for good). Tags after
        ``newest`` (an upload in flight, an orphan of an interrupted run) are not this save's to judge."""
        old = [t for t in self.all_tags() if t < newest]
        cut = [t for t in old if self.remote and self._proven_incomplete(t)]  # a local save is renamed whole
        whole = [t for t in old if t not in cut]
        for tag in cut + whole[: max(0, len(whole) - (self.keep - 1))]:
            if self.remote:
                storage.delete_prefix(storage.join(self.root, tag) + "/")
            else:
                shutil.rmtree(os.path.join(_local(self.root), tag), ignore_errors=True)

    def _proven_incomplete(self, tag: str) -> bool:
        """Whether ``tag`` is known to be cut short (unreadable metadata proves nothing: it is left alone)."""
        try:
            return not self.is_complete(tag)
        except (CheckpointError, storage.StorageError):
            return False

    def local_copy(self, tag: str) -> str:
        """A local folder holding the checkpoint (the folder itself, or a download of an s3:// one)."""
        if not self.remote:
            path = os.path.join(_local(self.root), tag)
            if not os.path.isdir(path):
                raise CheckpointError(f"checkpoint {path} does not exist")
            return path
        # Keyed by root and tag (two runs' step-100 are different checkpoints), and reused only while the remote
        # meta.json is the one downloaded with it (a run restarted from scratch rewrites its tags).
        root_key = hashlib.sha256(self.root.encode()).hexdigest()[:12]
        path = os.path.join(self.staging, f"dgm-ckpt-load-rank{self.rank}", root_key, tag)
        stamp = hashlib.sha256(storage.read_bytes(storage.join(self.root, tag, META))).hexdigest()
        if _stamp_of(path, DOWNLOADED) == stamp:
            return path
        _remove_other_copies(os.path.dirname(path), keep=tag)
        _publish_dir(path, DOWNLOADED, lambda work: storage.download_dir(storage.join(self.root, tag), work), stamp)
        return path

    def check(self, tag: str, meta: CheckpointMeta, *, expect_family: str, engines: list[str] | None = None,
              zero_stage: int | None = None, model_config: Any = None, on_model_change: str = "error") -> None:
        """Refuse a checkpoint of another model before any file of it is read (or converted): another family,
        other networks, a ZeRO stage DeepSpeed cannot load it into, or another model config (one that keeps the
        parameter shapes, such as model.transformer.n_head, would load without a word and train nonsense)."""
        where = storage.join(self.root, tag)
        if meta.family != expect_family:
            raise CheckpointError(f"checkpoint {where} is of family {meta.family!r}, this run trains {expect_family!r}")
        if engines is not None and sorted(meta.engines) != sorted(engines):
            raise CheckpointError(f"checkpoint {where} has networks {meta.engines}, this model has {sorted(engines)}")
        if zero_stage is not None and not _stages_compatible(meta.zero_stage, zero_stage):
            raise CheckpointError(f"checkpoint {where} was saved under ZeRO-{meta.zero_stage}, this run uses "
                                  f"ZeRO-{zero_stage}: set zero.stage={meta.zero_stage} (DeepSpeed loads a checkpoint "
                                  "into its own stage only; stages 1 and 2 load each other's), or train this stage "
                                  "in another run_dir")
        if model_config is not None and meta.config:  # an empty config: none was recorded
            changed = config_changes(meta.config.get("model"), model_config, "model")
            if changed and on_model_change == "warn":
                log.warning("resuming checkpoint %s under another model config (%s; trainer.on_model_change=warn)",
                            where, "; ".join(changed))
            elif changed:
                raise CheckpointError(
                    f"checkpoint {where} was trained with another model config ({'; '.join(changed)}): restore "
                    "those settings, start fresh with another run_dir or checkpoint_root, or, for a setting that "
                    "leaves the networks as they are (a loss weight, a sampling limit), set "
                    "trainer.on_model_change=warn")

    def load(self, tag: str, engines: Mapping[str, Any], *, expect_family: str, universal: bool = False,
             zero_stage: int | None = None, model_config: Any = None, on_model_change: str = "error"
             ) -> CheckpointMeta:
        """Load every engine's state and this rank's RNG state; check the checkpoint is of this model (see
        ``check``). A file that cannot be read is named as such, not taken for a model that does not fit."""
        meta = self.read_meta(tag)
        where = storage.join(self.root, tag)
        self.check(tag, meta, expect_family=expect_family, engines=sorted(engines), zero_stage=zero_stage,
                   model_config=model_config, on_model_change=on_model_change)
        path = self.local_copy(tag)
        for name, engine in engines.items():
            load_dir = os.path.join(path, name)
            ds_tag = "ds_universal" if universal else "ds"
            settings = optimizer_settings(engine)
            # this rank's own files CRC-checked first (read once more, from the page cache for DeepSpeed's read):
            # a flipped byte in a master weight would otherwise load and train on, to a NaN loss blamed on the lr
            bad = None if universal else unreadable_file(os.path.join(load_dir, ds_tag), self.rank)
            if bad is not None:
                raise _damaged(where, path, bad)
            try:
                loaded, _ = engine.load_checkpoint(load_dir, tag=ds_tag, load_module_strict=True)
            except Exception as e:
                bad = unreadable_file(os.path.join(load_dir, ds_tag))
                if bad is not None:
                    raise _damaged(where, path, bad) from e
                if isinstance(e, FileNotFoundError):
                    raise CheckpointError(f"checkpoint {where}: network {name!r}: {e.filename} is missing (an "
                                          "incomplete checkpoint)") from e
                if isinstance(e, RuntimeError | KeyError | ValueError | AssertionError):
                    raise CheckpointError(f"checkpoint {where}: network {name!r} does not fit this model "
                                          f"({type(e).__name__}: {e})") from e
                raise
            if loaded is None:
                raise CheckpointError(f"checkpoint {where}: DeepSpeed found no state for network {name!r}")
            restore_optimizer_settings(engine, settings)  # see trainer.engine_state for why each of these
            if universal:
                separate_step_counters(engine)
                try:
                    restore_buffers(engine, os.path.join(load_dir, "ds"))
                except (FileNotFoundError, KeyError) as e:
                    raise CheckpointError(f"checkpoint {where}: network {name!r}: its buffers cannot be restored "
                                          f"at another world size ({e})") from e
        rng_file = os.path.join(path, f"rng-rank{self.rank}.safetensors")
        if meta.world_size == self.world_size and os.path.exists(rng_file):
            try:
                set_rng_state(load_file(rng_file))
            except Exception as e:
                raise CheckpointError(f"checkpoint file {where}/{os.path.basename(rng_file)} is unreadable: "
                                      f"truncated or corrupt ({type(e).__name__}: {e})") from e
        return meta


def _stages_compatible(saved: int, now: int) -> bool:
    """Whether DeepSpeed loads a ZeRO-``saved`` checkpoint into a ZeRO-``now`` engine: only into its own stage,
    except 1 and 2, whose optimizer state files are alike (checked: 0->1/2 miss files, 3<->any other fails)."""
    return saved == now or {saved, now} == {1, 2}


def config_changes(saved: Any, now: Any, prefix: str) -> list[str]:
    """``key: saved -> now`` for each setting under ``prefix`` that differs (dotted paths). ``saved`` is the raw
    mapping a checkpoint recorded; read through ``now``'s config class, so a default written out is no change."""
    if is_dataclass(now):
        try:
            saved = asdict(from_dict(type(now), saved or {}, prefix))
        except ConfigError as e:
            return [f"the saved {prefix} config does not read as this one: {e}"]
        now = asdict(now)
    flat_saved, flat_now = _flatten(saved or {}, prefix), _flatten(now or {}, prefix)

    def shown(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "unset"

    return [f"{k}: {shown(flat_saved, k)} -> {shown(flat_now, k)}" for k in sorted(set(flat_saved) | set(flat_now))
            if k not in flat_saved or k not in flat_now or flat_saved[k] != flat_now[k]]


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _remove_other_copies(folder: str, keep: str) -> None:
    """A rank loads one checkpoint of a root at a time: the copies of older tags (earlier resumes) would otherwise
    pile up in the staging folder, a whole checkpoint per rank per resume."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name != keep and not name.startswith(keep + "."):  # keep's own work folders are _publish_dir's
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def unreadable_file(folder: str, rank: int | None = None) -> tuple[str, str] | None:
    """The first of DeepSpeed's files under ``folder`` (only those rank ``rank`` loads, when given) that is not a
    whole torch archive, and why: every byte read and CRC-checked, which DeepSpeed's readers never do."""
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if not name.endswith(".pt") or (rank is not None and not _loaded_by(name, rank)):
                continue
            file = os.path.join(dirpath, name)
            try:
                with zipfile.ZipFile(file) as z:
                    bad = z.testzip()
                if bad is not None:
                    return file, f"member {bad} fails its CRC check"
            except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
                return file, f"{type(e).__name__}: {e}"
    return None


def _damaged(where: str, local: str, bad: tuple[str, str]) -> CheckpointError:
    """The error for ``unreadable_file``'s answer about checkpoint ``where`` (read from folder ``local``)."""
    return CheckpointError(f"checkpoint file {where}/{os.path.relpath(bad[0], local)} is unreadable: truncated or "
                           f"corrupt ({bad[1]})")


def _loaded_by(name: str, rank: int) -> bool:
    """Whether a rank resuming at the same world size reads DeepSpeed file ``name``: the shared module state and
    its own partitions."""
    return name.startswith("mp_rank_") or re.match(rf"(bf16_)?zero_pp_rank_{rank}_mp_rank_", name) is not None


def _stamp_of(folder: str, marker: str) -> str | None:
    """The text of a completed folder's marker (what it was built from), or None while it is not complete."""
    try:
        with open(os.path.join(folder, marker)) as f:
            return f.read()
    except OSError:
        return None


def _publish_dir(final: str, marker: str, fill: Callable[[str], None], stamp: str = "") -> None:
    """Build a folder beside ``final`` (``fill`` writes into it), mark it complete (the marker holds ``stamp``,
    what it was built from) and rename it into place: work cut short (crash, outage, OOM) is never taken for the
    folder, and the next try starts over. A complete ``final`` of the same stamp that another process put there
    meanwhile is kept."""
    work = f"{final}.partial-{uuid.uuid4().hex[:12]}"
    try:
        fill(work)
        with open(os.path.join(work, marker), "w") as f:
            f.write(stamp)
        if _stamp_of(final, marker) != stamp:
            shutil.rmtree(final, ignore_errors=True)  # what an older dgm, a cut attempt or another build left
            try:
                os.replace(work, final)
            except OSError:
                if _stamp_of(final, marker) != stamp:
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def universal_info() -> dict[str, Any]:
    """The client state DeepSpeed's universal conversion requires (written by Megatron-style trainers)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def to_universal(checkpoint_dir: str, engine_name: str) -> None:
    """Convert one engine's ZeRO checkpoint into DeepSpeed's universal format (loadable at any world size)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    src = os.path.join(checkpoint_dir, engine_name, "ds")
    dst = os.path.join(checkpoint_dir, engine_name, "ds_universal")
    if os.path.exists(os.path.join(dst, CONVERTED)):
        return

    def convert(work: str) -> None:
        # checked before, not after a failure: DeepSpeed converts a flipped byte in a master weight without a word
        bad = unreadable_file(src)
        if bad is not None:
            raise CheckpointError(f"checkpoint file {bad[0]} is unreadable: truncated or corrupt ({bad[1]}); it "
                                  "cannot be converted to load at another world size")
        ds_to_universal(type("Args", (), dict(input_folder=src, output_folder=work, num_extract_workers=1,
                                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                                              inject_missing_state=True))())

    _publish_dir(dst, CONVERTED, convert)
    with open(os.path.join(checkpoint_dir, engine_name, "latest_universal"), "w") as f:
        f.write("ds_universal")  # DeepSpeed wrote the side folder's name there
