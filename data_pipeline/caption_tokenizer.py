"""Caption tokenizer: a sentencepiece BPE model trained in memory on a dataset's captions.

Text is lower-cased before training and before encoding, so "Red Circle" and "red circle" are the same ids. The
model has byte fallback: a word never seen in training is spelled as UTF-8 byte pieces instead of failing, and
``unknown_words`` names such words so a caller can warn about them. The model file travels as bytes (beside a
manifest, inside an export); its sha256 is what checkpoints and exports compare to catch a mismatched tokenizer.
Truncation to a model's text length is the model family's business, not this module's.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from data_pipeline import storage

TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained (bad vocabulary size, no captions) or loaded (corrupt file)."""


def _lowered(captions: Iterable[str]) -> Iterator[str]:
    for caption in captions:
        text = caption.strip().lower()
        if text:
            yield text


class CaptionTokenizer:
    """Lower-casing BPE tokenizer with byte fallback; ids are 0..vocab_size-1 (0 is <unk>, no BOS/EOS)."""

    def __init__(self, model_bytes: bytes, processor: spm.SentencePieceProcessor) -> None:
        self._bytes = bytes(model_bytes)
        self._sp = processor

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> CaptionTokenizer:
        """Train a BPE model on ``captions`` (lower-cased; empty ones skipped). Deterministic for the same input."""
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerError(f"tokenizer vocab_size must be a positive int, got {vocab_size!r}")
        texts = list(_lowered(captions))
        if not texts:
            raise TokenizerError("tokenizer: no non-empty captions to train on")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, character_coverage=1.0,
                num_threads=1, minloglevel=2,
            )
        except RuntimeError as e:
            hint = " (byte fallback alone takes 256 ids, plus <unk> and one per character)" if (
                "smaller than required" in str(e)) else ""
            raise TokenizerError(f"tokenizer vocab_size={vocab_size} does not fit these {len(texts)} captions: "
                                 f"{str(e).split('] ')[-1]}{hint}") from e
        return cls.from_bytes(out.getvalue(), what="the freshly trained model")

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "tokenizer bytes") -> CaptionTokenizer:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(data))
        except (RuntimeError, TypeError) as e:
            raise TokenizerError(f"{what}: not a sentencepiece model (corrupt or wrong file)") from e
        return cls(data, processor)

    @classmethod
    def load(cls, url: str) -> CaptionTokenizer:
        """Read a tokenizer.model from a local path or s3:// URL; a missing or corrupt file is named."""
        try:
            data = storage.read_bytes(url)
        except storage.StorageError as e:
            raise TokenizerError(f"{url}: cannot read the tokenizer ({e})") from e
        return cls.from_bytes(data, what=url)

    def to_bytes(self) -> bytes:
        return self._bytes

    def save(self, url: str) -> None:
        storage.write_bytes(url, self._bytes)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def info(self, file: str = TOKENIZER_FILE) -> dict[str, object]:
        """What a manifest or export records about this tokenizer."""
        return {"file": file, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        """BPE ids of the lower-cased text (unpadded, untruncated); unknown characters become byte pieces."""
        return list(self._sp.encode(text.lower()))

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids]))

    def unknown_words(self, text: str) -> list[str]:
        """Words (whitespace-separated, lower-cased) the model could only spell with byte pieces or <unk>."""
        unknown = []
        for word in text.lower().split():
            ids = self._sp.encode(word)
            if any(self._sp.is_byte(i) or self._sp.is_unknown(i) for i in ids):
                unknown.append(word)
        return unknown
