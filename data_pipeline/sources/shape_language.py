"""Vocabulary, caption templates, caption parser and scoring for the procedural shape scenes.

Kept apart from the renderer so that the scorer of generated images (see shape_analysis) and the generator share
one definition of every word: a caption the generator writes is always parsed back to the facts it came from.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
"""Clearly distinct colours: the closest pair (blue, purple) is ~110 apart in RGB, the background >100 from all."""
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
BACKGROUND_NAME = "grey"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES: tuple[str, ...] = ("list", "there_are", "count", "relation", "count_relation", "two_relations")
"""Caption templates; the last three state spatial relations between objects."""


def size_px(resolution: int) -> dict[str, int]:
    """Object extent (width = height, pixels) per size class: fractions of the resolution, at least 4 px (a 3 px
    circle covers its whole 3x3 box, a square, and a 3 px triangle an inverted T: the shape is then not drawn)."""
    small = max(4, round(0.12 * resolution))
    return {"small": small, "large": max(small + 2, round(0.22 * resolution))}


def relation_holds(a: dict, b: dict, relation: str) -> bool:
    """Whether object `a` is `relation` object `b`, by centres (x right, y down, as in the image)."""
    (ax, ay), (bx, by) = a["centre"], b["centre"]
    if relation == "left of":
        return ax < bx
    if relation == "right of":
        return ax > bx
    if relation == "above":
        return ay < by
    if relation == "below":
        return ay > by
    raise ValueError(f"unknown relation {relation!r} (known: {', '.join(RELATIONS)})")


def dominant_relation(a: dict, b: dict) -> str:
    """The relation of `a` to `b` along the axis where their centres differ most (the visually obvious one)."""
    dx = a["centre"][0] - b["centre"][0]
    dy = a["centre"][1] - b["centre"][1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def describe(obj: dict, with_size: bool = True) -> str:
    """'a small red circle' (or 'a red circle' without the size)."""
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    return "a " + " ".join(words)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(rng: np.random.Generator, objects: list[dict]) -> tuple[str, str, list[dict]]:
    """Pick a template and write a true, lower-case caption for `objects`.

    Returns (caption, template name, relations stated as [{"subject": i, "relation": r, "object": j}]).
    """
    n = len(objects)
    allowed = [t for t in TEMPLATES if not (t in ("relation", "count_relation") and n < 2)
               and not (t == "two_relations" and n < 4)]
    template = allowed[int(rng.integers(len(allowed)))]
    with_size = rng.random(n) < 0.7
    noun = ("object" if rng.random() < 0.5 else "shape") + ("" if n == 1 else "s")
    count = f"{NUMBER_WORDS[n]} {noun}"
    order = [int(i) for i in rng.permutation(n)]
    relations: list[dict] = []

    def rel_phrase(i: int, j: int) -> str:
        rel = dominant_relation(objects[i], objects[j])
        relations.append({"subject": i, "relation": rel, "object": j})
        return f"{describe(objects[i], bool(with_size[i]))} {rel} {describe(objects[j], bool(with_size[j]))}"

    listing = _join([describe(objects[i], bool(with_size[i])) for i in order])
    if template == "list":
        caption = f"{count}: {listing}"
    elif template == "there_are":
        caption = f"there {'is' if n == 1 else 'are'} {count}: {listing}"
    elif template == "count":
        caption = f"{count} on a {BACKGROUND_NAME} background"
    elif template == "relation":
        caption = rel_phrase(order[0], order[1])
    elif template == "count_relation":
        caption = f"{count}, including {rel_phrase(order[0], order[1])}"
    else:
        caption = f"{rel_phrase(order[0], order[1])}, and {rel_phrase(order[2], order[3])}"
    return caption, template, relations


_MENTION = re.compile(
    r"\b(?:a|an|one)\s+(?:(" + "|".join(SIZES) + r")\s+)?(?:(" + "|".join(PALETTE) + r")\s+)?("
    + "|".join(SHAPES) + r")\b"
)
_COUNT = re.compile(r"\b(" + "|".join(NUMBER_WORDS[1:]) + r")\s+(?:objects?|shapes?)\b")
_BETWEEN = re.compile(r"^\s+(?:is\s+)?(?:(?:to\s+)?the\s+)?(" + "|".join(RELATIONS) + r")\s+$")


def parse_caption(caption: str) -> dict:
    """Facts stated by a caption: {"count": int | None, "mentions": [desc], "relations": [(desc, rel, desc)]}.

    A desc is {"size": str | None, "colour": str | None, "shape": str}; a relation is read between two consecutive
    mentions ("a red circle left of a blue square", "... is to the left of ..."). Unknown words are ignored.
    """
    text = caption.lower()
    count_match = _COUNT.search(text)
    count = NUMBER_WORDS.index(count_match.group(1)) if count_match else None
    matches = list(_MENTION.finditer(text))
    mentions = [{"size": m.group(1), "colour": m.group(2), "shape": m.group(3)} for m in matches]
    relations = []
    for k in range(len(matches) - 1):
        between = _BETWEEN.match(text[matches[k].end():matches[k + 1].start()])
        if between:
            relations.append((mentions[k], between.group(1), mentions[k + 1]))
    return {"count": count, "mentions": mentions, "relations": relations}


def _spec_from_attributes(attributes: dict) -> dict:
    objs = attributes.get("objects")
    if not isinstance(objs, list):
        raise ValueError("attributes must hold an 'objects' list (as written by the shapes source)")
    mentions = [{"size": o.get("size"), "colour": o.get("colour"), "shape": o.get("shape")} for o in objs]
    relations = [(mentions[r["subject"]], r["relation"], mentions[r["object"]]) for r in attributes.get("relations", [])]
    return {"count": int(attributes.get("count", len(objs))), "mentions": mentions, "relations": relations}


def _fits(obj: dict, desc: dict) -> bool:
    return all(desc.get(k) is None or obj.get(k) == desc[k] for k in ("size", "colour", "shape"))


def max_matching(fits: list[list[bool]]) -> int:
    """Size of a maximum one-to-one matching of rows to columns where fits[r][c] (augmenting paths; tiny inputs)."""
    owner: dict[int, int] = {}

    def augment(r: int, seen: set[int]) -> bool:
        for c, ok in enumerate(fits[r]):
            if ok and c not in seen:
                seen.add(c)
                if c not in owner or augment(owner[c], seen):
                    owner[c] = r
                    return True
        return False

    return sum(augment(r, set()) for r in range(len(fits)))


def score_objects(objects: list[dict], target: str | dict) -> dict[str, Any]:
    """Per-attribute hit rates of found `objects` against a caption or a ground-truth attributes dict.

    Keys: count (1.0/0.0), colour / shape / size (multiset overlap of mentioned values with found ones, over the
    mentions that state them), object (mentions matched one-to-one to found objects with every stated attribute),
    relation (stated relations for which some pair of fitting objects satisfies it), all (1.0 when every
    applicable score is 1.0), detected (number of objects found). A score is None when the target states nothing
    it could measure.
    """
    spec = parse_caption(target) if isinstance(target, str) else _spec_from_attributes(target)
    mentions, scores = spec["mentions"], {}
    scores["count"] = None if spec["count"] is None else float(len(objects) == spec["count"])
    for attr in ("colour", "shape", "size"):
        stated = Counter(m[attr] for m in mentions if m[attr] is not None)
        found = Counter(o.get(attr) for o in objects)
        total = sum(stated.values())
        scores[attr] = None if total == 0 else sum(min(c, found[v]) for v, c in stated.items()) / total
    fits = [[_fits(o, m) for o in objects] for m in mentions]
    scores["object"] = max_matching(fits) / len(mentions) if mentions else None
    rels = spec["relations"]
    hits = sum(
        any(_fits(a, da) and _fits(b, db) and relation_holds(a, b, rel)
            for ia, a in enumerate(objects) for ib, b in enumerate(objects) if ia != ib)
        for da, rel, db in rels
    )
    scores["relation"] = hits / len(rels) if rels else None
    applicable = [v for v in scores.values() if v is not None]
    scores["all"] = float(all(v == 1.0 for v in applicable)) if applicable else None
    scores["detected"] = len(objects)
    return scores
