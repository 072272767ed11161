"""Caption tokenizer: round trip, lower-casing, byte fallback for unknown words, no truncation, bad sizes and files,
and `prepare` writing it beside the train manifest and copying it byte for byte to held-out splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer, TokenizerError
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.sources import build_source
from launch.config import load_config

SHAPES = {"resolution": 32, "min_objects": 1, "max_objects": 3}


@pytest.fixture(scope="module")
def captions() -> list[str]:
    source = build_source("shapes", {**SHAPES, "num_samples": 300})
    return [source.sample(i).caption for i in range(len(source))]


@pytest.fixture(scope="module")
def tokenizer(captions: list[str]) -> CaptionTokenizer:
    return CaptionTokenizer.train(captions, vocab_size=400)


def test_round_trip_every_caption_and_training_is_deterministic(captions, tokenizer) -> None:
    assert tokenizer.vocab_size == 400
    for caption in captions:
        ids = tokenizer.encode(caption)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == caption
        assert tokenizer.unknown_words(caption) == []
    again = CaptionTokenizer.train(captions, vocab_size=400)
    assert again.to_bytes() == tokenizer.to_bytes() and again.sha256 == tokenizer.sha256
    # The frequent caption words are single pieces, so a caption is far shorter in ids than in characters.
    assert len(tokenizer.encode("a small red circle left of a blue square")) <= 12


def test_text_is_lower_cased(tokenizer) -> None:
    assert tokenizer.encode("A Small RED Circle") == tokenizer.encode("a small red circle")
    assert tokenizer.decode(tokenizer.encode("Blue SQUARE")) == "blue square"


def test_unknown_words_fall_back_to_bytes_and_are_reported(tokenizer) -> None:
    text = "a red Zebra near a blue über-square"
    ids = tokenizer.encode(text)
    assert 0 not in ids  # byte fallback, never <unk>
    assert tokenizer.decode(ids) == text.lower()
    assert tokenizer.unknown_words(text) == ["zebra", "über-square"]


def test_encoding_never_truncates(tokenizer) -> None:
    long_caption = " and ".join(["a small red circle left of a large blue square"] * 40)
    ids = tokenizer.encode(long_caption)
    assert len(ids) > 256 and tokenizer.decode(ids) == long_caption


def test_bytes_round_trip_and_corrupt_files_are_named(tokenizer, tmp_path: Path) -> None:
    path = str(tmp_path / TOKENIZER_FILE)
    tokenizer.save(path)
    loaded = CaptionTokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256 and loaded.encode("a green triangle") == tokenizer.encode("a green triangle")
    assert CaptionTokenizer.from_bytes(tokenizer.to_bytes()).vocab_size == tokenizer.vocab_size
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(TokenizerError, match=f"{path}: not a sentencepiece model"):
        CaptionTokenizer.load(path)
    missing = str(tmp_path / "absent.model")
    with pytest.raises(TokenizerError, match=f"{missing}: cannot read the tokenizer"):
        CaptionTokenizer.load(missing)


@pytest.mark.parametrize("vocab_size, message", [
    (100, "vocab_size=100 does not fit these 300 captions: Vocabulary size is smaller than required.*byte fallback"),
    (5000, r"vocab_size=5000 does not fit these 300 captions: Vocabulary size too high \(5000\)"),
    (0, "vocab_size must be a positive int, got 0"),
])
def test_bad_vocab_sizes_are_refused_with_the_value(captions, vocab_size: int, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        CaptionTokenizer.train(captions, vocab_size)


def test_no_captions_is_refused() -> None:
    with pytest.raises(TokenizerError, match="no non-empty captions"):
        CaptionTokenizer.train(["", "  "], 300)


def _prepare(out: str, split_seed: int, **tokenizer: object) -> None:
    prepare_dataset(PrepareConfig(output=out, source="shapes", source_settings={**SHAPES, "num_samples": 120,
                                                                               "seed": split_seed},
                                  codec="image", codec_settings={"keep": ["caption", "attributes"]},
                                  samples_per_shard=50, parallel=False, **tokenizer), report=lambda _: None)


def test_prepare_trains_on_train_captions_and_copies_to_held_out(tmp_path: Path) -> None:
    train, held_out = str(tmp_path / "train"), str(tmp_path / "eval")
    _prepare(train, 0)
    shard_files = sorted(p for p in os.listdir(train) if p.endswith((".tar", ".info.json")))
    stamps = {p: os.stat(os.path.join(train, p)).st_mtime_ns for p in shard_files}
    assert "tokenizer" not in load_manifest(train).extra

    # Re-running on finished shards adds the tokenizer without rewriting any shard (not in the fingerprint).
    _prepare(train, 0, tokenizer_vocab_size=300)
    assert {p: os.stat(os.path.join(train, p)).st_mtime_ns for p in shard_files} == stamps
    _prepare(held_out, 1, tokenizer_from=train)

    data = storage.read_bytes(os.path.join(train, TOKENIZER_FILE))
    assert storage.read_bytes(os.path.join(held_out, TOKENIZER_FILE)) == data
    trained = CaptionTokenizer.from_bytes(data)
    source = build_source("shapes", {**SHAPES, "num_samples": 120, "seed": 0})
    assert trained.to_bytes() == CaptionTokenizer.train([source.sample(i).caption for i in range(120)], 300).to_bytes()
    for url in (train, held_out):
        assert load_manifest(url).extra["tokenizer"] == {"file": TOKENIZER_FILE, "sha256": trained.sha256,
                                                         "vocab_size": 300}


def test_held_out_split_without_a_train_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"train.tokenizer.model: no tokenizer to copy \(prepare the train split"):
        _prepare(str(tmp_path / "eval"), 1, tokenizer_from=str(tmp_path / "train"))


def test_config_tokenizer_section(tmp_path: Path) -> None:
    config = tmp_path / "t2i.yaml"
    config.write_text(json.dumps({"data": {"train": "d/train", "eval": "d/eval", "prepare": {
        "source": "shapes", "splits": {"train": {}, "eval": {}}, "tokenizer": {"vocab_size": 400}}}}))
    cfg, _ = load_config(str(config))
    spec = cfg.data.prepare
    assert spec.tokenizer_settings("train", "d/train") == {"tokenizer_vocab_size": 400}
    assert spec.tokenizer_settings("eval", "d/train") == {"tokenizer_from": "d/train"}
    with pytest.raises(ValueError, match="vocab_size"):
        load_config(str(config), ["data.prepare.tokenizer.vocab_size=0"])
