"""argparse ``type=`` checks for numeric flags, so a bad value is refused by name before any work starts
(argparse prints ``argument --top-p: ...`` and exits 2) instead of surfacing later as a NaN or a torch error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, text: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def at_least(low: float, kind: type = float, meaning: str = "") -> Callable[[str], float | int]:
    """A number >= ``low``; ``meaning`` says what the smallest value does (e.g. "0 means greedy")."""
    def parse(text: str) -> float | int:
        value = _number(kind, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}{f' ({meaning})' if meaning else ''}")
        return value
    return parse


def positive(kind: type = float) -> Callable[[str], float | int]:
    """A number > 0."""
    def parse(text: str) -> float | int:
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{value} must be above 0")
        return value
    return parse


def probability_mass(text: str) -> float:
    """A nucleus mass in (0, 1]: 1 keeps every token; near 0 keeps only the most likely."""
    value = _number(float, text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]: the probability mass the nucleus keeps "
                                         "(1 keeps every token)")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers such as ``0,3,3,7``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: class labels are 0 or more")
    return values


def seed(text: str) -> int:
    """A random seed torch takes: a signed 64-bit integer (torch.Generator.manual_seed overflows past it)."""
    value = _number(int, text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside -2**63..2**63-1")
    return value
