"""Config files: a YAML mapping of sections, read with clear errors, composed with its base.

A file may name ``base: OTHER.yaml`` (relative to itself): it is the other file with this one's
keys laid over it (a deep merge; lists are replaced, not joined), so a variant of a recipe's
config states only what differs.
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
