"""Plain data -> typed dataclass configs, rejecting unknown keys and wrong types with the key's full path.

Used by the `dgm` configs and by the export loader (which rebuilds a family's config without DeepSpeed or Ray).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the offending key's full path."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        return {k: _convert(v, args[1], f"{path}.{k}") if args else v for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        items = [_convert(v, args[0], f"{path}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            # PyYAML reads 3e-4 (no dot) as a string; accept any text Python reads as a float.
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
        # YAML's .nan and .inf: no setting means "not a number" (every comparison with it passes) or infinity (a
        # weight of .inf turns the loss into inf * 0 = nan at step 0; 1 / .inf passes a temperature's range check)
        if math.isnan(number):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if math.isinf(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types with their full path."""
    where = path or "<config>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(_located(str(e), path, names)) from e


def _located(message: str, path: str, names: set[str]) -> str:
    """A dataclass's own message with its full key once: "trainer.steps must be >= 1" as it is, "loss must be
    ..." as "model.loss must be ...", anything else after its section ("model: ...")."""
    if path and (message.startswith(path + ".") or message.startswith(path + ":")):
        return message
    one_key = re.match(r"(\w+)(?: \([^)]*\))? must ", message)  # "n_head must ...", "d_model (30) must ..."
    if one_key and one_key.group(1) in names:
        return f"{path}.{message}" if path else message
    return f"{path or '<config>'}: {message}"
