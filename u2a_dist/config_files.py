"""Config files: a YAML mapping of sections, read with clear errors, composed with its base.

A file may name ``base: OTHER.yaml`` (relative to itself): it is the other file with this one's
keys laid over it (a deep merge; lists are replaced, not joined), so a variant of a recipe's
config states only what differs. ``section.key=value`` overrides are laid over the mapping
the same way (:func:`apply_overrides`), before it is typed and validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from u2a_dist.recipes import deep_merge
from u2a_dist.typed import ConfigError


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of the config at ``path``, its base chain merged under it."""
    return _read_yaml(path, [])


def _read_yaml(path: Path, chain: list[Path]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist"
                          + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base configs form a cycle: {[str(p) for p in chain]}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = loaded or {}
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path, got {base!r}")
    return deep_merge(_read_yaml(path.parent / base, [*chain, path.resolve()]), raw)


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars (so `null`, `1e-5`, `[1,2]`, `{a: 1}` all work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config mapping (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, _, text = item.partition("=")
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else _as_dict(node[part], dotted)
            node = node[part]
        node[parts[-1]] = _parse_value(text)
    return raw


def _as_dict(value: Any, dotted: str) -> dict:
    if isinstance(value, str):  # a DataSpec given as a bare path
        return {"path": value}
    raise ConfigError(f"override {dotted!r}: {value!r} is not a section")
