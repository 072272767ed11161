"""Captions with one attribute changed: hard negatives for the contrastive reranker, and its finer test.

In-batch retrieval is easy when captions differ in many words; a reranker must also prefer "a red circle left
of a blue square" to "a red circle right of a blue square". ``perturb_caption`` changes one colour, shape, size,
count or relation word of a true caption, using the scene vocabulary of ``shape_language``, and keeps the change
only if the scene's ground truth (its attributes) then fails the caption under ``score_objects``, so the result
is a caption that is certainly false for the image.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline.sources.shape_language import (
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    score_objects,
)

KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "relation")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_WORDS: dict[str, tuple[str, ...]] = {"colour": tuple(PALETTE), "shape": SHAPES, "size": SIZES,
                                      "relation": RELATIONS}
_PATTERNS = {kind: re.compile(r"\b(" + "|".join(words) + r")\b") for kind, words in _WORDS.items()}
_COUNT = re.compile(r"\b(?:(there (?:is|are)) )?(" + "|".join(NUMBER_WORDS[1:]) + r")\s+(object|shape)s?\b")


def _replacements(kind: str, caption: str, max_count: int = 9) -> list[str]:
    """Every caption that differs from ``caption`` in one word of ``kind`` (in order of position); counts stay
    within 1..max_count (a count the data never shows would be too easy to reject), with grammar kept."""
    out = []
    if kind == "count":
        for m in _COUNT.finditer(caption):
            for n in range(1, max_count + 1):
                if NUMBER_WORDS[n] != m.group(2):
                    verb = "" if m.group(1) is None else ("there is " if n == 1 else "there are ")
                    phrase = f"{verb}{NUMBER_WORDS[n]} {m.group(3)}{'' if n == 1 else 's'}"
                    out.append(caption[:m.start()] + phrase + caption[m.end():])
        return out
    for m in _PATTERNS[kind].finditer(caption):
        options = [_OPPOSITE[m.group(1)]] if kind == "relation" else [w for w in _WORDS[kind] if w != m.group(1)]
        out.extend(caption[:m.start()] + w + caption[m.end():] for w in options)
    return out


def is_false_for(caption: str, attributes: Mapping[str, Any]) -> bool:
    """Whether the scene's ground-truth objects fail at least one fact the caption states."""
    scores = score_objects(list(attributes["objects"]), caption)
    return scores["all"] is not None and scores["all"] < 1.0


def perturbations(caption: str, attributes: Mapping[str, Any], max_count: int = 9) -> dict[str, list[str]]:
    """Per kind, every one-word change of ``caption`` that is false for the scene (kinds with none are left out)."""
    out = {}
    for kind in KINDS:
        false = [c for c in _replacements(kind, caption, max_count) if is_false_for(c, attributes)]
        if false:
            out[kind] = false
    return out


def perturb_caption(caption: str, attributes: Mapping[str, Any] | None, key: str,
                    kinds: Sequence[str] = KINDS, max_count: int = 9) -> tuple[str, str] | None:
    """One false one-word change of ``caption`` as (caption, kind), chosen by a generator seeded with the sample
    ``key`` (the same sample always gets the same negative); None when the scene offers none (or no attributes)."""
    if not attributes or not isinstance(attributes.get("objects"), list):
        return None
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    for i in rng.permutation(len(kinds)):
        kind = kinds[int(i)]
        options = _replacements(kind, caption, max_count)
        for j in rng.permutation(len(options)):
            if is_false_for(options[int(j)], attributes):
                return options[int(j)], kind
    return None
