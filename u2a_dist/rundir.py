"""The run directory (docs/design.md §4): created only after validation, written atomically.

Layout: ``config.yaml``, ``metrics.jsonl``, ``scores.jsonl``, ``checkpoints/<tag>/`` with a
``checkpoints/latest`` pointer, ``model/``, ``report.md`` with its ``plots/``,
``tensorboard/`` (``runtime.report_to``), ``error.json`` when a run fails, ``select/`` for
``u2a select``. Files that must never be half-written (config, pointers,
summaries) go through ``atomic_write``; jsonl logs are appended a whole line at a time and
flushed.

Nothing lost: :mod:`u2a_dist.fsio` says which directories and entries are u2a's to replace.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from u2a_dist.checkpoint import CheckpointStore
from u2a_dist.config import ConfigError, RunConfig, load_config
from u2a_dist.fsio import atomic_write, claim_dir, clear_u2a_entries, is_marked, mark

#: Config keys that may change when a run is resumed: they extend its budget or say how it is
#: launched, not what it computes. ``+`` keys may only grow.
RESUMABLE_KEYS = {"unlearn.steps": "+", "unlearn.time_budget_s": "+", "selector.rounds": "+",
                  "runtime.max_failures": "", "runtime.timeout_s": "", "runtime.launcher": "",
                  "runtime.ray_address": "", "runtime.checkpoint_every": "",
                  "runtime.report_to": "",  # what is watched, not what is computed
                  "runtime.theta0_cache": "",  # where θ0's results are kept, not what they are
                  "runtime.micro_batches": "",  # the same gradient in more or fewer passes
                  "runtime.gradient_checkpointing": "",  # the same gradient, recomputed
                  "out": ""}  # a run directory may be moved or copied


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible rather than invalid
    return value


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("filter", "require", "floors"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: RunConfig, new: RunConfig) -> tuple[list[str], list[str]]:
    """(keys that may change on resume and did, keys that may not and did), each as
    ``key (old -> new)``."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        text = f"{key} ({a.get(key)!r} -> {b.get(key)!r})"
        rule = RESUMABLE_KEYS.get(key)
        grows = isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)) \
            and (b[key] >= a[key] or (key == "unlearn.time_budget_s" and b[key] == 0))
        if rule == "" or (rule == "+" and grows):
            allowed.append(text)
        else:
            refused.append(text + (": may only grow" if rule == "+" else ""))
    return allowed, refused


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def prepare(self, cfg: RunConfig, overwrite: bool = False, kind: str = "run") -> bool:
        """Create (or reuse) the directory and save the resolved config; True when resuming.

        A directory holding a different run is an error naming the keys that differ (budget
        keys, :data:`RESUMABLE_KEYS`, may grow); ``overwrite`` replaces only a u2a run
        directory, and only u2a's own entries in it.
        """
        cfg_file = self.path / "config.yaml"
        if overwrite and self.path.exists():
            clear_u2a_entries(self.path)
        if cfg_file.is_file():
            old = load_config(cfg_file)
            allowed, refused = config_changes(old, cfg)
            if refused:
                raise ConfigError(
                    f"out={str(self.path)!r} holds a different run: its config.yaml differs in "
                    f"{'; '.join(refused)}. Choose another `out`, or pass --overwrite to replace "
                    "it")
            if allowed:
                print(f"[u2a] {self.path}: resuming with {'; '.join(allowed)}", flush=True)
                if not is_marked(self.path):
                    mark(self.path, kind)  # a run directory of an older u2a
                atomic_write(cfg_file, cfg.to_yaml())
            return self.has_checkpoint()
        claim_dir(self.path, kind)
        atomic_write(cfg_file, cfg.to_yaml())
        return False

    def has_checkpoint(self) -> bool:
        """Whether any checkpoint tag exists (complete or not: resume decides, loudly)."""
        return CheckpointStore(self.checkpoints).exists()

    def latest_checkpoint(self) -> str | None:
        """The checkpoint to resume from (:meth:`CheckpointStore.resume_tag`), or None."""
        return CheckpointStore(self.checkpoints).resume_tag()

    def append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.path / name, "a") as fh:
            fh.write(line + "\n")
            fh.flush()

    def _rows(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """(line, row) of a JSON-lines log; a line a crash cut short (a rank killed while
        appending) does not parse and is skipped, so a killed run still resumes."""
        path = self.path / name
        out = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
        return out

    def _keep_rows(self, name: str, keep) -> None:
        if (self.path / name).is_file():
            atomic_write(self.path / name,
                         "".join(f"{line}\n" for line, row in self._rows(name) if keep(row)))

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop log lines from steps after the checkpoint (they will be redone)."""
        self._keep_rows("metrics.jsonl", lambda row: row.get("step", 0) <= step)

    def drop_scores_from_round(self, first_round: int) -> None:
        """On resume: forget scores.jsonl rows of rounds the restored state has not reached."""
        self._keep_rows("scores.jsonl", lambda row: row["round"] < first_round)

    def read_metrics(self) -> list[dict[str, Any]]:
        return [row for _, row in self._rows("metrics.jsonl")]

    def read_scores(self) -> list[dict[str, Any]]:
        """scores.jsonl's rows (a line a crash cut short skipped)."""
        return [row for _, row in self._rows("scores.jsonl")]

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")

    def summary(self) -> dict[str, Any]:
        """summary.json, which rank 0 writes last: what the launch returns."""
        return json.loads((self.path / "summary.json").read_text())
