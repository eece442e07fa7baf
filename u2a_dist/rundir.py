"""The run directory (DESIGN §4): created only after validation, written atomically.

Layout: ``config.yaml``, ``metrics.jsonl``, ``scores.jsonl``, ``checkpoints/<tag>/`` with a
``checkpoints/latest`` pointer, ``model/``, ``report.md``, ``error.json`` when a run fails.
Files that must never be half-written (config, pointers, summaries) go through
``atomic_write``; jsonl logs are appended a whole line at a time and flushed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from u2a_dist.config import ConfigError, RunConfig, load_config


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible rather than invalid
    return value


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def prepare(self, cfg: RunConfig, overwrite: bool = False) -> bool:
        """Create the directory and save the resolved config; True when resuming a run.

        A directory holding a different run is an error (unless overwrite), never silently mixed.
        """
        cfg_file = self.path / "config.yaml"
        if cfg_file.is_file() and not overwrite:
            old = load_config(cfg_file)
            if old.to_dict() != cfg.to_dict():
                raise ConfigError(f"out={str(self.path)!r} holds a different run (its config.yaml "
                                  "differs); choose another `out` or pass --overwrite")
            return self.latest_checkpoint() is not None
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(cfg_file, cfg.to_yaml())
        return False

    def latest_checkpoint(self) -> str | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.checkpoints / tag).is_dir() else None

    def append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.path / name, "a") as fh:
            fh.write(line + "\n")
            fh.flush()

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop log lines from steps after the checkpoint (they will be redone)."""
        for name in ("metrics.jsonl",):
            path = self.path / name
            if not path.is_file():
                continue
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write(path, "".join(f"{line}\n" for line in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")
