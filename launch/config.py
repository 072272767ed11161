"""Experiment configs: YAML files in configs/ loaded into typed, validated dataclasses, with dotted overrides.

Every problem (an unknown key, a wrong type, a bad value) is reported with the key's full path, e.g.
``trainer.optim.lr: expected float, got str 'fast'``, before anything starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from data_pipeline.stream import StreamConfig
from sharding.zero import ZeroConfig
from trainer.families import FAMILIES, family_class
from trainer.loop import TrainerConfig
from trainer.typed_config import ConfigError, from_dict


@dataclass
class TokenizerSpec:
    """A caption tokenizer trained on the train split's captions (held-out splits get a byte-identical copy)."""

    vocab_size: int = 512

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")


@dataclass
class PrepareSpec:
    """How `dgm prepare` makes this experiment's data sets: one source, a codec, settings per split."""

    source: str = "digits"
    codec: str = "image"
    codec_settings: dict[str, Any] = field(default_factory=dict)
    samples_per_shard: int = 128
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None

    def tokenizer_settings(self, split: str, train_url: str) -> dict[str, Any]:
        """PrepareConfig keywords for one split: the train split trains the tokenizer, the others copy its file."""
        if self.tokenizer is None:
            return {}
        if split == "train":
            return {"tokenizer_vocab_size": self.tokenizer.vocab_size}
        return {"tokenizer_from": train_url}


@dataclass
class TokenizeSpec:
    """How `dgm tokenize` makes this experiment's token data: image datasets per split and the dVAE export."""

    inputs: dict[str, str] = field(default_factory=dict)
    dvae_export: str = ""
    workers: int = 2
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.dvae_export:
            raise ValueError("data.tokenize.dvae_export: the dVAE export folder is required")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"data.tokenize: workers and batch_size must be >= 1, got {self.workers}, "
                             f"{self.batch_size}")


@dataclass
class DataConfig:
    train: str = ""
    eval: str = ""
    prepare: PrepareSpec | None = None
    tokenize: TokenizeSpec | None = None
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class ClusterConfig:
    """Where the worker group runs: an embedded local Ray cluster (address empty) or an existing one."""

    address: str = ""
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"cluster.workers must be >= 1, got {self.workers}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < 0:  # Ray reads -1 as "retry forever", also for an error no retry can fix
            raise ValueError(f"cluster.max_failures must be >= 0, got {self.max_failures}")
        if self.object_store_mb < 75:  # Ray refuses an object store under 75 MiB
            raise ValueError(f"cluster.object_store_mb must be >= 75 (Ray's minimum), got {self.object_store_mb}")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str = ""
    checkpoint_root: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    family: str = "image_gpt"
    model: Any = None
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        parts = self.name.replace("\\", "/").split("/")
        if not self.name.strip() or self.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            # the run folder is runs/<name> when run_dir is not set: an empty name made runs/ itself the run folder
            raise ValueError(f"name must be a relative folder path under runs/ with no empty, '.' or '..' part, "
                             f"got {self.name!r}")
        if "://" in self.run_dir:
            raise ValueError(f"run_dir={self.run_dir}: a local folder (logs, metrics, sample grids, Ray's run "
                             "storage); checkpoints go to S3 through checkpoint_root=s3://...")

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_root or os.path.join(self.run_dir, "checkpoints")


def set_dotted(raw: dict[str, Any], dotted: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw config mapping."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected key.path=value")
    key, text = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted!r}: {key.strip()!r} is not a key path (names joined by dots, e.g. "
                          "trainer.steps=100)")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # a missing section, or an empty one (``trainer:`` with nothing under it)
            node[part] = {}
        nxt = node[part]
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = nxt
    try:
        value = _override_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key.strip()}: value {text!r} is not valid YAML ({str(e).splitlines()[0]}); "
                          "quote it for a string with brackets or colons") from e
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = _merged(node[last], value)  # a section given as a mapping keeps the keys it does not name
    else:
        node[last] = value


_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")


def _override_value(text: str) -> Any:
    """An override's value parsed as YAML, except that digits with a leading zero are a decimal number (YAML 1.1
    would read 0100 as octal 64)."""
    if not text.strip():
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, int) and not isinstance(value, bool) and _LEADING_ZERO.fullmatch(text.strip()):
        return int(text.strip().replace("_", ""))  # 0100: YAML 1.1's octal 64, meant as 100 ('08' stays text)
    return value


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping (from YAML plus overrides) into an ExperimentConfig with a typed model config."""
    raw = dict(raw)
    family = raw.get("family", "image_gpt")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ConfigError(f"family: unknown family {family!r}; known: {sorted(FAMILIES)}")
    model_raw = raw.pop("model", None)
    cfg = from_dict(ExperimentConfig, raw)
    cls = family_class(family)
    cfg.model = from_dict(cls.config_cls, model_raw, "model")
    if cfg.zero.stage > cls.max_zero_stage:
        raise ConfigError(f"zero.stage: {cfg.zero.stage}, but the {family} family trains with ZeRO stages up to "
                          f"{cls.max_zero_stage} ({cls.zero_stage_limit})")
    accum = cfg.zero.grad_accum
    for key, value in (("trainer.steps", cfg.trainer.steps), ("trainer.checkpoint_every", cfg.trainer.checkpoint_every)):
        if accum > 1 and value % accum:  # a checkpoint mid-accumulation would lose the gradients gathered so far
            raise ConfigError(f"{key}: {value} is not a multiple of zero.grad_accum={accum}; steps count "
                              "micro-batches, and checkpoints must fall where the optimizer has just stepped")
    if not cfg.run_dir:
        cfg.run_dir = default_run_dir(cfg.name)
    return cfg


def default_run_dir(name: str) -> str:
    """Where a run without its own run_dir keeps its logs, metrics and sample grids."""
    return os.path.join("runs", name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a second `trainer:` section dropped the first one's settings.
    Checked on the document as written, before merges (`<<: *base`) bring in keys that may be set again."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_repeated_keys(node, set())
        return super().construct_document(node)


def _refuse_repeated_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: the anchored node is checked once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice (lines {lines[key]} and {line}): the first "
                        "would be dropped; merge the two", key_node.start_mark)
                lines[key] = line
            _refuse_repeated_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, seen)


def read_yaml(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping with dotted overrides applied; file problems name the file."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file (e.g. configs/demo.yaml)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for o in overrides or []:
        set_dotted(raw, o)
    return raw


def load_config(path: str, overrides: list[str] | None = None) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Read a YAML experiment file, apply overrides, validate; returns the config and the raw mapping."""
    raw = read_yaml(path, overrides)
    return build_config(raw), raw
