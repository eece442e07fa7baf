"""Typed dataclasses from plain mappings (YAML, JSON, ``key=value`` overrides): each value
coerced to its field's type, finite numbers only, unknown keys refused; every error names the
dotted key (``unlearn.lr``), so a user can fix a file without reading the code."""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional
    return tp, False


def _coerce(key: str, tp: Any, value: Any) -> Any:
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    listed = [a for a in get_args(inner) if dataclasses.is_dataclass(a)] \
        if get_origin(inner) in (Union, types.UnionType) else []
    if listed:  # `Spec | list[Spec]`: one or several, in order
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{key} is an empty list")
            return [_coerce(f"{key}[{i}]", listed[0], v) for i, v in enumerate(value)]
        return _coerce(key, listed[0], value)
    if dataclasses.is_dataclass(inner):
        if isinstance(value, str) and fields(inner)[0].name == "path":
            value = {"path": value}  # a data spec given as its bare path
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return build_dataclass(inner, value, key)
    if inner is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true/false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or not _is_intlike(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(float(value)) if isinstance(value, str) else int(value)  # "1e3" -> 1000
    if inner is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if inner is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if get_origin(inner) in (Union, types.UnionType):  # float | str ("auto"), str | list[str]
        arm = next((a for a in get_args(inner) if get_origin(a) is list), None)
        if arm is not None:  # one name or a list of them, each kept as given
            return _coerce(key, arm if isinstance(value, list) else str, value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return str(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number or 'auto', got {value!r}")
        return number
    if get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if get_origin(inner) is list:
        (item,) = get_args(inner)
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v] if item is str else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    return value


def _is_intlike(value: Any) -> bool:
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        return False


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**raw)`` with every value coerced to its field's type; errors name the key."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; known: {sorted(names)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(where, hints[f.name], raw[f.name])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None
