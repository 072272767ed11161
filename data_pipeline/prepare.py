"""`dgm prepare`: source -> codec -> WebDataset tar shards (local or s3://) + manifest.json.

Shards are written independently (one Ray task each when Ray is available), each first to a local temporary file,
then moved or uploaded whole; a small ``.info.json`` beside each finished shard records its size, count and
sha256. Re-running an interrupted prepare skips every shard whose info matches the plan and writes the rest; a
different complete data set at the output is refused unless ``overwrite`` (see data_pipeline.dataset_output).
For codecs of images, preview.png shows the first samples as stored. The manifest is written last, so a dataset
with a manifest is a complete dataset.

A caption tokenizer (``tokenizer_vocab_size``) is trained on this split's captions and written as tokenizer.model
beside the manifest; a held-out split instead copies the train split's file byte for byte (``tokenizer_from``), so
it never sees a tokenizer trained on held-out captions. The tokenizer is not part of the shard fingerprint: re-running
prepare on finished shards adds or refreshes it without rewriting a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import webdataset as wds

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer, TokenizerError
from data_pipeline.codecs import build_codec
from data_pipeline.dataset_output import FINGERPRINT_KEY, check_output, remove_leftovers
from data_pipeline.manifest import FORMAT_VERSION, Manifest, ShardInfo, save_manifest
from data_pipeline.preview import PREVIEW_CELL, PREVIEW_COUNT, PREVIEW_NAME, fit_cell, grid_uint8, png_bytes
from data_pipeline.scratch import scratch_file
from data_pipeline.sources import build_source

log = logging.getLogger(__name__)
USER_DATA_ERRORS = (ValueError, storage.StorageError, OSError)
"""Errors of a shard task that name the input at fault (BadImageError, SampleDecodeError, JPEGReadError and
DatasetError are ValueErrors): raised as themselves, without Ray's wrapper."""
INDEX_STRIDE = 16  # byte offset of every 16th sample goes into the manifest: readers seek instead of skipping


@dataclass
class PrepareConfig:
    """What to write and where. ``source``/``codec`` settings go into the manifest verbatim."""

    output: str = ""
    source: str = "digits"
    source_settings: dict[str, Any] = field(default_factory=dict)
    codec: str = "image"
    codec_settings: dict[str, Any] = field(default_factory=dict)
    samples_per_shard: int = 256
    parallel: bool = True
    tokenizer_vocab_size: int = 0  # > 0: train a caption tokenizer of this size on this split's captions
    tokenizer_from: str = ""  # a dataset URL whose tokenizer.model this split copies (held-out splits)
    overwrite: bool = False  # replace a different complete data set at ``output`` (otherwise refused)
    verify: bool = False  # re-hash the shards an earlier run finished (S3: a download) and rewrite any that differ

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.tokenizer_vocab_size < 0:
            raise ValueError(f"tokenizer vocab_size must be >= 1, got {self.tokenizer_vocab_size}")
        if self.tokenizer_vocab_size and self.tokenizer_from:
            raise ValueError("prepare: train a tokenizer (tokenizer_vocab_size) or copy one (tokenizer_from), not both")


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    first: int
    stop: int
    fingerprint: str


def _fingerprint(config: PrepareConfig, source: Any) -> str:
    """The plan's identity: settings, and for a source read from files (an image folder) what its scan found, so a
    folder that changed between two runs never gets shards of the old listing reused beside shards of the new."""
    parts: list[Any] = [config.source, config.source_settings, config.codec, config.codec_settings,
                        config.samples_per_shard]
    if (content := getattr(source, "content_digest", None)) is not None:
        parts.append(content)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_prepare_output(config: PrepareConfig, source: Any, say: Callable[[str], None] | None = None,
                         retire: bool = True) -> None:
    """Refuse (or, with ``overwrite`` and ``retire``, retire) a different complete data set at ``config.output``;
    run for every split with ``retire=False``, then with it, before any is written."""
    problem = storage.folder_problem(config.output)
    if problem:
        raise ValueError(f"prepare output {config.output}: {problem}, not a folder; give a folder or an s3:// URL")
    check_shard_count(config, len(source))
    check_output(config.output, _fingerprint(config, source), overwrite=config.overwrite,
                 say=say or (lambda line: print(line, flush=True)), retire=retire)


def check_codec_settings_apply(config: PrepareConfig) -> None:
    """A codec setting the source makes void is refused rather than ignored."""
    if config.source == "image_folder" and config.codec_settings.get("alpha") == "drop":
        raise ValueError("alpha: drop would do nothing for source 'image_folder', whose files are composited on "
                         "white as they are read (their alpha never reaches the codec); leave alpha at white")


def check_codec_fits(config: PrepareConfig, source: Any, codec: Any) -> list[int]:
    """Encode the first sample (a codec given a source it cannot read fails here, named, not in a shard task) and
    return the image shape every sample will be stored with; a source of several shapes is refused for a codec
    that stores images as they are (the image models batch one shape)."""
    check_codec_settings_apply(config)
    try:
        first = source.sample(0)
        codec.encode(first)
    except (AttributeError, TypeError) as e:
        raise ValueError(f"codec {config.codec!r} cannot encode samples of source {config.source!r} "
                         f"({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{e}{_resize_hint(source, str(e))}") from e
    shapes = set(source.image_shapes()) if hasattr(source, "image_shapes") else {tuple(first.image.shape)}
    if (stored_shape := getattr(codec, "stored_shape", None)) is not None:  # a codec that resizes (DCT)
        shapes = {tuple(stored_shape(shape)) for shape in shapes}
    shapes = sorted(shapes)
    if len(shapes) > 1:
        examples = ", ".join(f"{h}x{w}" for h, w, _ in shapes[:4])
        raise ValueError(f"source {config.source!r}: images of {len(shapes)} different sizes (HxW {examples}"
                         f"{', ...' if len(shapes) > 4 else ''}) for codec {config.codec!r}, which stores them as "
                         "they are; set the source's resolution so every sample has one shape")
    return list(shapes[0])


def _resize_hint(source: Any, message: str) -> str:
    """A source that can make its images the codec's size (shapes' ``resolution``, digits' ``upscale``) is the
    better fix for a size mismatch than cropping or padding: say which setting."""
    if "does not match the codec resolution" not in message or not hasattr(source, "settings"):
        return ""
    knobs = [key for key in ("resolution", "upscale") if key in source.settings()]
    return f"; or set the split's {knobs[0]!r} so that the source makes images of the codec's size" if knobs else ""


MAX_SHARDS = 1_000_000  # the shard names' six digits; and a plan of billions would fill memory before a word


def check_shard_count(config: PrepareConfig, total: int) -> int:
    """The number of shards ``total`` samples make; more than the names hold is refused (before any split is
    written: ``check_prepare_output`` runs it for each)."""
    n = (total + config.samples_per_shard - 1) // config.samples_per_shard
    if n > MAX_SHARDS:
        raise ValueError(f"{total:,} samples at samples_per_shard={config.samples_per_shard} would make {n:,} shards "
                         f"(at most {MAX_SHARDS:,}): lower the split's num_samples or raise samples_per_shard")
    return n


def plan_shards(config: PrepareConfig, total: int, source: Any) -> list[ShardPlan]:
    fp = _fingerprint(config, source)
    n = check_shard_count(config, total)
    return [
        ShardPlan(i, f"shard-{i:06d}.tar", i * config.samples_per_shard,
                  min((i + 1) * config.samples_per_shard, total), fp)
        for i in range(n)
    ]


def _info_url(output: str, plan: ShardPlan) -> str:
    return storage.join(output, plan.name + ".info.json")


def finished_info(output: str, plan: ShardPlan, verify: bool = False) -> ShardInfo | None:
    """The info of a shard already written by an earlier run of the same plan, or None (then it is written again):
    also None for a damaged info file or a shard whose size is not the recorded one (truncated, overwritten),
    so a re-run repairs what it would otherwise list in the manifest with a checksum that cannot match. Bytes
    changed in place keep the size: ``verify`` re-hashes the shard to find those too."""
    url = _info_url(output, plan)
    shard_url = storage.join(output, plan.name)
    if not storage.exists(url) or not storage.exists(shard_url):
        return None
    try:
        data = json.loads(storage.read_bytes(url))
        if not isinstance(data, dict) or data.get("fingerprint") != plan.fingerprint:
            return None
        info = ShardInfo(**data["shard"])
        if not isinstance(info.labels, dict) or storage.size(shard_url) != info.bytes:
            return None
        return info if not verify or storage.sha256_of(shard_url) == info.sha256 else None
    except (ValueError, TypeError, KeyError, storage.StorageError):
        return None


def sample_offsets(tar_path: str) -> list[int]:
    """Byte offset of each sample's first member header, in order (webdataset groups members by key prefix)."""
    offsets: list[int] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key != last:
                offsets.append(member.offset)
                last = key
    return offsets


def write_shard(config: PrepareConfig, plan: ShardPlan, source: Any = None) -> ShardInfo:
    """Write one shard (in a temporary local file, then moved/uploaded whole) and its info file. ``source`` is the
    one the plan was made from (an image folder is scanned once, not once per shard); None builds it."""
    source = source if source is not None else build_source(config.source, config.source_settings)
    codec = build_codec(config.codec, config.codec_settings)

    length_of = getattr(codec, "sequence_length", None)  # codecs writing variable-length sequences have one
    labels: dict[str, int] = {}

    def fill(writer: wds.TarWriter) -> list[int] | None:
        lengths = []
        for i in range(plan.first, plan.stop):
            sample = source.sample(i)
            fields = codec.encode(sample)
            writer.write({"__key__": sample.key, **fields})
            if length_of is not None:
                lengths.append(length_of(fields))
            if sample.label is not None:
                labels[str(sample.label)] = labels.get(str(sample.label), 0) + 1
        return lengths if length_of is not None else None

    return publish_shard(config.output, plan, fill, getattr(codec, "encode_report", None), labels)


def publish_shard(output: str, plan: ShardPlan, fill: Callable[[wds.TarWriter], list[int] | None],
                  report: Callable[[], dict[str, Any]] | None = None,
                  labels: dict[str, int] | None = None) -> ShardInfo:
    """``fill`` writes the shard's samples into a local temporary tar (returning their sequence lengths, or None);
    it is then moved/uploaded whole to ``output`` and its info file (count, size, sha256, index, lengths, the
    codec's ``report`` of the encodes, the class ``labels`` that ``fill`` counted, plan fingerprint) written
    beside it."""
    target = storage.join(output, plan.name)
    fd, tmp = scratch_file("dgm-shard-", ".tar")
    try:
        with os.fdopen(fd, "wb") as f, wds.TarWriter(f, mtime=0) as writer:
            lengths = fill(writer) or []
        digest = storage.sha256_of(tmp)
        offsets = sample_offsets(tmp)
        if len(offsets) != plan.stop - plan.first:
            raise ValueError(f"shard {target}: wrote {len(offsets)} samples, the plan says {plan.stop - plan.first}")
        if lengths and len(lengths) != len(offsets):
            raise ValueError(f"shard {target}: {len(lengths)} sequence lengths for {len(offsets)} samples")
        info = ShardInfo(plan.name, len(offsets), os.path.getsize(tmp), digest, plan.first, offsets[::INDEX_STRIDE],
                         lengths, report() if report is not None else {},
                         dict(sorted((labels or {}).items(), key=lambda kv: int(kv[0]))))
        storage.upload_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record = {"fingerprint": plan.fingerprint, "shard": asdict(info)}
    storage.write_bytes(_info_url(output, plan), json.dumps(record).encode())
    return info


class Progress:
    """A periodic progress line with rate and ETA (tqdm when attached to a terminal)."""

    def __init__(self, total: int, what: str, report: Callable[[str], None] | None = None, every_s: float = 2.0,
                 done: int = 0):
        """``done``: finished before this run (counted in the total, not in the rate)."""
        self.total, self.what, self.done, self.before = total, what, done, done
        self.start = self.last = time.monotonic()
        self.every_s = every_s
        self.report = report or (lambda line: print(line, flush=True))

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = (self.done - self.before) / max(now - self.start, 1e-9)
            left = self.total - self.done
            eta = left / rate if rate > 0 else (0.0 if not left else float("inf"))
            self.report(f"[{self.what}] {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                        f"{rate:.2f}/s ETA {eta:.0f}s")


def write_tokenizer(config: PrepareConfig, source: Any) -> dict[str, Any] | None:
    """Train (or copy) the split's caption tokenizer beside its manifest; returns the manifest's tokenizer entry."""
    target = storage.join(config.output, TOKENIZER_FILE)
    if config.tokenizer_from:
        origin = storage.join(config.tokenizer_from, TOKENIZER_FILE)
        if not storage.exists(origin):
            raise TokenizerError(f"{origin}: no tokenizer to copy (prepare the train split first)")
        tokenizer = CaptionTokenizer.load(origin)
    elif config.tokenizer_vocab_size:
        captions = [source.sample(i).caption for i in range(len(source))]
        if any(c is None for c in captions):
            raise TokenizerError(f"source {config.source!r} has samples without captions: cannot train a tokenizer")
        tokenizer = CaptionTokenizer.train(captions, config.tokenizer_vocab_size)
    else:
        return None
    tokenizer.save(target)
    return tokenizer.info()


def write_preview(config: PrepareConfig, source: Any, codec: Any, say: Callable[[str], None]) -> None:
    """preview.png beside the manifest: the first samples as the codec stores them (codecs of images only). A
    preview that cannot be made is reported and skipped: it never stops the manifest."""
    preview = getattr(codec, "preview_images", None)
    if preview is None:
        return
    n = min(PREVIEW_COUNT, len(source))
    url = storage.join(config.output, PREVIEW_NAME)
    try:
        images = list(preview([source.sample(i) for i in range(n)]))
        if len({img.shape for img in images}) > 1 or max(images[0].shape[:2]) > PREVIEW_CELL:
            images = [fit_cell(img) for img in images]  # photos: one cell size, a bounded grid
        grid = grid_uint8(images)
        storage.write_bytes(url, png_bytes(grid))
    except (ValueError, OSError, storage.StorageError) as e:
        say(f"[prepare] no preview: {type(e).__name__}: {e}")
        return
    say(f"[prepare] preview of the first {n} samples as stored: {url}")


def describe_encoding(encoding: dict[str, Any], codec: str) -> str:
    """One line of the codec's summed encoding report; the counts a user acts on first, then examples."""
    counts = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in encoding.items() if key != "examples")
    examples = encoding.get("examples", [])
    return f"{codec} codec: {counts}" + (f"; for example: {' | '.join(examples)}" if examples else "")


def prepare_dataset(config: PrepareConfig, report: Callable[[str], None] | None = None,
                    source: Any = None) -> Manifest:
    """Write every missing shard, then the manifest. Uses Ray tasks when ``parallel`` and Ray is initialised.
    ``source``: the source already built from ``config`` (by the CLI's checks), so files are scanned once."""
    if not config.output:
        raise ValueError("prepare: an output URL (folder or s3://bucket/prefix) is required")
    source = source if source is not None else build_source(config.source, config.source_settings)
    codec = build_codec(config.codec, config.codec_settings)
    say = report or (lambda line: print(line, flush=True))
    image_shape = check_codec_fits(config, source, codec)
    check_prepare_output(config, source, say)
    plans = plan_shards(config, len(source), source)
    infos: dict[int, ShardInfo] = {}
    wants_lengths = hasattr(codec, "sequence_length")
    labelled = source.sample(0).label is not None  # a source labels all its samples or none
    for plan in plans:
        info = finished_info(config.output, plan, config.verify)
        # shards written without lengths or labels (an older dgm) or with a damaged list are written again
        if (info is not None and (len(info.lengths) == info.count if wants_lengths else not info.lengths)
                and sum(info.labels.values()) == (info.count if labelled else 0)):
            infos[plan.index] = info
    todo = [p for p in plans if p.index not in infos]
    tokenizer = write_tokenizer(config, source)
    say(f"[prepare] {len(source)} samples of {config.source!r} -> {len(plans)} shards at {config.output} "
        f"({len(infos)} already done)")
    if config.verify or infos:  # a re-run: name the shards that were there but are written again
        redo = [p.name for p in todo if storage.exists(storage.join(config.output, p.name))]
        if redo:
            say(f"[prepare] rewriting {len(redo)} shard(s) that differ from what was recorded (damaged, truncated "
                f"or changed): {', '.join(redo[:5])}{', ...' if len(redo) > 5 else ''}")
    progress = Progress(len(plans), "prepare shards", say, done=len(infos))
    if infos and not todo:
        progress.update(0)
    if config.parallel and ray.is_initialized() and len(todo) > 1:
        remote = ray.remote(num_cpus=1)(write_shard)
        shared = ray.put(source)
        pending = {remote.remote(config, p, shared): p for p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                plan = pending.pop(ref)
                try:
                    infos[plan.index] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    if isinstance(e.cause, USER_DATA_ERRORS):  # a bad file, storage: the user's one-line error
                        raise e.cause from None
                    raise  # anything else keeps Ray's remote traceback
                progress.update()
    else:
        for plan in todo:
            infos[plan.index] = write_shard(config, plan, source)
            progress.update()
    write_preview(config, source, codec, say)
    manifest = Manifest(
        source={"name": config.source, "settings": source.settings()},
        codec={"name": config.codec, "settings": codec.settings()},
        shards=[infos[p.index] for p in plans],
        format_version=FORMAT_VERSION,
        extra={"samples_per_shard": config.samples_per_shard, "index_stride": INDEX_STRIDE,
               "image_shape": image_shape, FINGERPRINT_KEY: plans[0].fingerprint},
        url=config.output,
    )
    if tokenizer is not None:
        manifest.extra["tokenizer"] = tokenizer
    if lengths := manifest.sequence_lengths:
        manifest.extra["sequence_length"] = {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 2),
                                             "max": max(lengths), "total": sum(lengths)}
    save_manifest(config.output, manifest)
    say(f"[prepare] wrote manifest with {manifest.total} samples in {len(plans)} shards")
    remove_leftovers(config.output, [p.name for p in plans], say)
    if "sequence_length" in manifest.extra:
        say(f"[prepare] sequence lengths (rows per sample): {manifest.extra['sequence_length']}")
    if counts := manifest.label_counts:
        say("[prepare] class labels (samples): " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    if encoding := manifest.encoding:
        say(f"[prepare] {describe_encoding(encoding, config.codec)}")
    return manifest
