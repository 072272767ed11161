"""Image tokenisation as a distributed batch job: image shards -> (caption ids, dVAE image codes) shards.

One Ray actor per worker loads the dVAE export once and the caption tokenizer once; output shards are handed out
to whichever actor is free (ray.util.ActorPool). Output shard j holds the input's global samples [j*S, (j+1)*S) in
the input's order, so the result does not depend on the number of workers or on which actor wrote what. Each shard
is written to a local temporary file, moved or uploaded whole with an ``.info.json`` beside it (prepare's
publish_shard), and a re-run skips every shard whose info matches this job's fingerprint (input shards' sha256,
dVAE weights, tokenizer, shard size). tokenizer.model is copied beside the output and the manifest comes last.

An input sample without a caption (or with an empty one) stops the job with an error naming its shard and key:
a caption-conditioned prior must not learn from images with nothing to condition on. Fix or drop the sample and
re-prepare the input. This module imports torch and Ray, never launch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util import ActorPool
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer
from data_pipeline.codecs import build_codec
from data_pipeline.codecs.tokens import TokenSample
from data_pipeline.dataset_output import FINGERPRINT_KEY, check_output, remove_leftovers
from data_pipeline.manifest import (
    FORMAT_VERSION,
    DatasetError,
    Manifest,
    ShardInfo,
    load_manifest,
    save_manifest,
)
from data_pipeline.prepare import INDEX_STRIDE, USER_DATA_ERRORS, ShardPlan, finished_info, publish_shard
from trainer.ray_env import absolute, ensure_ray, worker_env


@dataclass(frozen=True)
class InputSpan:
    """The samples [skip, skip + take) of one input shard."""

    url: str
    sha256: str
    skip: int
    take: int


@dataclass(frozen=True)
class OutputShard:
    plan: ShardPlan
    inputs: tuple[InputSpan, ...]


def plan_output(manifest: Manifest, samples_per_shard: int, fingerprint: str) -> list[OutputShard]:
    """Cut the input's global sample sequence into output shards of ``samples_per_shard``."""
    starts = np.cumsum([0] + manifest.shard_counts)
    total = int(starts[-1])
    out = []
    for j, first in enumerate(range(0, total, samples_per_shard)):
        stop = min(first + samples_per_shard, total)
        spans = []
        for i, info in enumerate(manifest.shards):
            lo, hi = max(first, int(starts[i])), min(stop, int(starts[i + 1]))
            if lo < hi:
                spans.append(InputSpan(manifest.shard_url(i), info.sha256, lo - int(starts[i]), hi - lo))
        out.append(OutputShard(ShardPlan(j, f"shard-{j:06d}.tar", first, stop, fingerprint), tuple(spans)))
    return out


def read_span(span: InputSpan) -> Iterator[dict[str, Any]]:
    """Raw samples of one input span; the shard is checked against its manifest sha256 first."""
    data = storage.read_bytes(span.url)
    if hashlib.sha256(data).hexdigest() != span.sha256:
        raise DatasetError(f"shard {span.url}: sha256 does not match the input manifest (modified or truncated)")
    seen = 0
    for raw in group_by_keys({**m, "__url__": span.url} for m in tar_file_iterator(io.BytesIO(data))):
        if seen >= span.skip + span.take:
            return
        if seen >= span.skip:
            yield raw
        seen += 1
    if seen < span.skip + span.take:
        raise DatasetError(f"shard {span.url}: ended after {seen} samples, expected {span.skip + span.take}")


class TokeniserWorker:
    """Holds one dVAE and the tokenizer; writes whole output shards (a Ray actor, or a plain object in-process)."""

    def __init__(self, dvae_export: str, tokenizer_bytes: bytes, input_codec: dict[str, Any], batch_size: int,
                 threads: int = 1) -> None:
        import torch

        from trainer.export import load_export_url

        torch.set_num_threads(threads)
        self.family, self.modules, _ = load_export_url(dvae_export)
        self.tokenizer = CaptionTokenizer.from_bytes(tokenizer_bytes)
        self.input_codec = build_codec(input_codec["name"], input_codec.get("settings", {}))
        h, w = self.family.grid
        self.codec = build_codec("tokens", {"text_vocab": self.tokenizer.vocab_size,
                                            "image_vocab": int(self.family.num_codes), "image_grid": [int(h), int(w)]})
        self.batch_size = batch_size

    def codec_settings(self) -> dict[str, Any]:
        return self.codec.settings()

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self.family.encode_tokens(self.modules, np.stack(images))
        return tokens.reshape(len(images), -1).cpu().numpy().astype(np.int64)

    def _samples(self, shard: OutputShard) -> Iterator[tuple[str, dict[str, Any], list[int]]]:
        """Each input sample with its caption's ids (encoded once, here, where an empty result is refused)."""
        for span in shard.inputs:
            for raw in read_span(span):
                key = raw["__key__"]
                sample = self.input_codec.decode(raw)
                caption = sample.get("caption")
                if caption is None or not caption.strip():
                    raise DatasetError(f"shard {span.url}: sample {key} has an empty caption "
                                       "(a text-to-image dataset needs a caption for every image)")
                ids = self.tokenizer.encode(caption)
                if not ids:  # only characters sentencepiece normalises away
                    raise DatasetError(f"shard {span.url}: sample {key}: caption {caption!r} has no tokens "
                                       "(a text-to-image dataset needs a caption for every image)")
                yield key, sample, ids

    def write(self, shard: OutputShard, output: str) -> ShardInfo:
        codec = self.codec

        def fill(writer: Any) -> None:
            batch: list[tuple[str, dict[str, Any], list[int]]] = []

            def flush() -> None:
                codes = self.encode_images([s["image"] for _, s, _ in batch])
                for (key, s, ids), image_tokens in zip(batch, codes, strict=True):
                    text = np.asarray(ids, dtype=np.int64)
                    item = TokenSample(key, text, image_tokens, s.get("caption"), s.get("attributes"),
                                       s.get("label"))
                    writer.write({"__key__": key, **codec.encode(item)})
                batch.clear()

            for item in self._samples(shard):
                batch.append(item)
                if len(batch) == self.batch_size:
                    flush()
            if batch:
                flush()

        return publish_shard(output, shard.plan, fill)


def _fingerprint(manifest: Manifest, dvae_config_sha: str, tokenizer_sha: str, samples_per_shard: int) -> str:
    spec = json.dumps([[s.sha256 for s in manifest.shards], dvae_config_sha, tokenizer_sha, samples_per_shard])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _dvae_export(export_url: str) -> tuple[str, str, list[int] | None]:
    """The dVAE export's weights sha256, the sha256 of its whole config.json (every file's digest, and the settings
    such as eps and the grid that change the codes without changing the weights) and the image shape it reads."""
    config_url = storage.join(export_url, "config.json")
    try:
        raw = storage.read_bytes(config_url)
        config = json.loads(raw)
        family, sha = config.get("family"), str(config["files"]["model.safetensors"])
        shape = (config.get("data_info") or {}).get("image_shape")
    except storage.StorageError as e:  # its message names the URL already
        raise DatasetError(f"{export_url}: not a dVAE export folder ({e})") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{export_url}: not a dVAE export folder ({config_url}: {e})") from e
    if family != "dvae":
        raise DatasetError(f"{export_url}: is a {family!r} export, not a dVAE ('dvae') export: tokenising needs the "
                           "dVAE that turns images into codes")
    weights_url = storage.join(export_url, "model.safetensors")
    try:  # checked here: a damaged file met in every worker came back under Ray's stack of each
        actual = _digest(weights_url, storage.version_of(weights_url))
    except storage.StorageError as e:
        raise DatasetError(f"{export_url}: its weights cannot be read ({e})") from e
    if actual != sha:
        raise DatasetError(f"{weights_url}: sha256 {actual[:12]}..., but its config.json records {sha[:12]}...: "
                           "the file is damaged or was replaced; export the dVAE again")
    return sha, hashlib.sha256(raw).hexdigest(), shape


@functools.lru_cache(maxsize=8)
def _digest(url: str, stamp: tuple[int, str]) -> str:
    """sha256 of the weights, once per file state (``storage.version_of``) in this process: every split's plan asks, and
    over s3:// each ask was a whole download."""
    del stamp  # part of the cache key only: a file changed since is hashed again
    return storage.sha256_of(url)


def _first_line(message: str) -> str:
    """The last line that names an error in a Ray failure message (its cause), else the first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line.split(":", 1)[0]]
    return (named[-1] if named else lines[0] if lines else message)[:500]


class _ProgressLine:
    """'[tokenise] shards 3/10, images 768/2560, 120.5 images/s, ETA 15s' at most every ``every_s`` seconds."""

    def __init__(self, shards: int, images: int, say: Callable[[str], None], every_s: float = 2.0) -> None:
        self.shards, self.images, self.say, self.every_s = shards, images, say, every_s
        self.done_shards = self.done_images = self.new_images = 0
        self.start = self.last = time.monotonic()

    def update(self, shards: int, images: int, new: bool = True) -> None:
        self.done_shards += shards
        self.done_images += images
        self.new_images += images if new else 0
        now = time.monotonic()
        if now - self.last < self.every_s and self.done_shards < self.shards:
            return
        self.last = now
        rate = self.new_images / max(now - self.start, 1e-9)
        eta = (self.images - self.done_images) / rate if rate > 0 else 0.0
        self.say(f"[tokenise] shards {self.done_shards}/{self.shards}, images {self.done_images}/{self.images}, "
                 f"{rate:.1f} images/s, ETA {eta:.0f}s")


@dataclass
class TokenisePlan:
    """What a tokenisation job reads and how it splits its output: fixed before anything is written."""

    source: Manifest
    tokenizer: CaptionTokenizer
    dvae_export_dir: str
    weights_sha: str
    per_shard: int
    fingerprint: str


def plan_tokenise(input_url: str, dvae_export_dir: str, samples_per_shard: int | None = None) -> TokenisePlan:
    """Check the input data set, its tokenizer and the dVAE export; the plan's fingerprint names the output."""
    source = load_manifest(input_url)
    if source.codec.get("name") != "image":
        raise DatasetError(f"{input_url}: codec {source.codec.get('name')!r} is not the image codec (PNG + caption)")
    kept = (source.codec.get("settings") or {}).get("keep")
    if kept is not None and "caption" not in kept:
        raise DatasetError(f"{input_url}: its shards store no captions (codec_settings.keep {list(kept)}); prepare "
                           "it again with 'caption' in data.prepare.codec_settings.keep")
    tokenizer_url = storage.join(input_url, TOKENIZER_FILE)
    if not storage.exists(tokenizer_url):
        raise DatasetError(f"{tokenizer_url}: missing; prepare the dataset with data.prepare.tokenizer "
                           "so its captions have a tokenizer")
    tokenizer = CaptionTokenizer.load(tokenizer_url)
    recorded = source.extra.get("tokenizer", {}).get("sha256")
    if recorded and recorded != tokenizer.sha256:
        raise DatasetError(f"{tokenizer_url}: sha256 {tokenizer.sha256[:12]}... does not match the manifest's "
                           f"tokenizer entry {recorded[:12]}... (replaced after the data set was prepared?)")
    per_shard = samples_per_shard or int(source.extra.get("samples_per_shard") or source.shards[0].count)
    if per_shard < 1:
        raise ValueError(f"tokenise: samples_per_shard must be >= 1, got {per_shard}")
    dvae_export_dir = absolute(dvae_export_dir)
    weights_sha, config_sha, dvae_shape = _dvae_export(dvae_export_dir)
    images = source.extra.get("image_shape")
    if dvae_shape is not None and images is not None and list(images) != list(dvae_shape):
        raise DatasetError(f"{input_url}: images of shape {list(images)}, but the dVAE export {dvae_export_dir} "
                           f"reads {list(dvae_shape)}")
    return TokenisePlan(source, tokenizer, dvae_export_dir, weights_sha, per_shard,
                        _fingerprint(source, config_sha, tokenizer.sha256, per_shard))


def check_tokenise_output(input_url: str, dvae_export_dir: str, output_url: str, *, overwrite: bool = False,
                          samples_per_shard: int | None = None, plan: TokenisePlan | None = None) -> TokenisePlan:
    """Refuse (or with ``overwrite`` retire) a different data set at ``output_url``: run for every split first.
    ``plan``: the split's plan when the caller already made it."""
    plan = plan or plan_tokenise(input_url, dvae_export_dir, samples_per_shard)
    check_output(output_url, plan.fingerprint, overwrite=overwrite, say=lambda line: print(line, flush=True),
                 job="tokenise")
    return plan


def check_splits_agree(plans: dict[str, TokenisePlan]) -> None:
    """Every split of one text-to-image data set reads its captions with one tokenizer: the prior is trained on
    one split's ids and scored on another's, and ids of another vocabulary pass every range check."""
    seen = {split: plan.tokenizer.sha256 for split, plan in plans.items()}
    if len(set(seen.values())) > 1:
        said = ", ".join(f"{split}: {sha[:12]}... ({plans[split].source.url})" for split, sha in seen.items())
        raise DatasetError(f"the splits' caption tokenizers differ ({said}): prepare the held-out split with "
                           "data.prepare's tokenizer_from the train split")


def tokenise_dataset(input_url: str, dvae_export_dir: str, output_url: str, *, workers: int = 2,
                     batch_size: int = 64, samples_per_shard: int | None = None, progress: bool = True,
                     report: Callable[[str], None] | None = None, overwrite: bool = False,
                     verify: bool = False) -> Manifest:
    """Tokenise the image dataset at ``input_url`` with the dVAE export into token shards at ``output_url``;
    a different complete data set there is refused unless ``overwrite`` (data_pipeline.dataset_output).
    ``verify`` re-hashes the shards an earlier run finished and rewrites any whose bytes changed in place."""
    if workers < 1 or batch_size < 1:
        raise ValueError(f"tokenise: workers and batch_size must be >= 1, got {workers} and {batch_size}")
    plan = plan_tokenise(input_url, dvae_export_dir, samples_per_shard)
    source, tokenizer, per_shard = plan.source, plan.tokenizer, plan.per_shard
    dvae_export_dir, weights_sha, fingerprint = plan.dvae_export_dir, plan.weights_sha, plan.fingerprint
    shards = plan_output(source, per_shard, fingerprint)
    say = report or (lambda line: print(line, flush=True))
    check_output(output_url, fingerprint, overwrite=overwrite, say=say, job="tokenise")
    done = {s.plan.index: info for s in shards if (info := finished_info(output_url, s.plan, verify)) is not None}
    todo = [s for s in shards if s.plan.index not in done]
    say(f"[tokenise] {source.total} images in {len(source.shards)} shards -> {len(shards)} token shards at "
        f"{output_url} ({len(done)} already done, {min(workers, max(len(todo), 1))} workers)")
    line = _ProgressLine(len(shards), source.total, say if progress else (lambda _: None))
    line.update(len(done), sum(i.count for i in done.values()), new=False)

    ensure_ray()
    remote = ray.remote(num_cpus=1)(TokeniserWorker).options(runtime_env={"env_vars": {**worker_env(),
                                                                                       "OMP_NUM_THREADS": "1"}})
    actors = [remote.remote(dvae_export_dir, tokenizer.to_bytes(), source.codec, batch_size)
              for _ in range(max(1, min(workers, len(todo))))]
    try:
        try:
            codec_settings = ray.get([actor.codec_settings.remote() for actor in actors])[0]
        except ray.exceptions.ActorDiedError as e:  # the export failed to load in the worker
            raise DatasetError(f"{dvae_export_dir}: the tokenise workers could not load this dVAE export "
                               f"({_first_line(e.error_msg)})") from None
        say(f"[tokenise] {len(actors)} workers ready after {time.monotonic() - line.start:.1f}s "
            "(each loaded the dVAE export once)")
        line.start = time.monotonic()  # the rate counts tokenising, not starting the workers
        if todo:
            pool = ActorPool(actors)
            try:
                for info in pool.map_unordered(lambda actor, s: actor.write.remote(s, output_url), todo):
                    done[info.first_index // per_shard] = info
                    line.update(1, info.count)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, USER_DATA_ERRORS):  # a bad sample, storage: the user's one-line error
                    raise e.cause from None
                raise
    finally:
        for actor in actors:
            ray.kill(actor)

    tokenizer.save(storage.join(output_url, TOKENIZER_FILE))
    codec = build_codec("tokens", codec_settings)
    manifest = Manifest(
        source={"name": "tokenise", "settings": {"input": absolute(input_url), "input_source": source.source,
                                                 "input_codec": source.codec}},
        codec={"name": "tokens", "settings": codec.settings()},
        shards=[done[s.plan.index] for s in shards],
        format_version=FORMAT_VERSION,
        extra={"samples_per_shard": per_shard, "index_stride": INDEX_STRIDE,
               "text_vocab": tokenizer.vocab_size, "image_vocab": codec_settings["image_vocab"],
               "image_grid": codec_settings["image_grid"], "image_shape": source.extra.get("image_shape"),
               "tokenizer": tokenizer.info(), "dvae_export": dvae_export_dir, "dvae_weights_sha256": weights_sha,
               FINGERPRINT_KEY: fingerprint},
        url=output_url,
    )
    save_manifest(output_url, manifest)
    say(f"[tokenise] wrote manifest with {manifest.total} samples in {len(shards)} shards")
    remove_leftovers(output_url, [s.plan.name for s in shards], say, job="tokenise")
    return manifest
