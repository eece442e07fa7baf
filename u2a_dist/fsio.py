"""Files and directories u2a owns: crash-safe writes, and the rule that nothing is lost.

u2a marks every directory it creates with :data:`MARKER` and deletes or replaces only entries it
wrote itself (:data:`RUN_ENTRIES`) inside a marked directory. A directory holding anything else
is refused with an error naming the path; an output never overlaps an input
(:func:`check_disjoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from u2a_dist.config import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what is wrong."""


#: The file by which u2a recognises a directory it created (its content says what kind).
MARKER = ".u2a"
#: What u2a writes into a run directory; ``--overwrite`` removes these and nothing else.
RUN_ENTRIES = frozenset({
    MARKER, "config.yaml", "job.json", "metrics.jsonl", "scores.jsonl", "checkpoints", "model",
    "report.md", "summary.json", "best.json", "error.json", "before.json", "logs", "select",
    ".prepared", "eval.json", "generations.jsonl", "tensorboard", "plots", "check-theta0",
})


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write under a temporary name, fsync, then rename over ``path``: readers see the old or
    the new content, never a torn one, even across a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def is_marked(path: Path, kind: str | None = None) -> bool:
    """Whether u2a created ``path`` (of ``kind``: run, select, export, when given)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    if kind is None:
        return True
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
    except (ValueError, UnicodeDecodeError):
        return False


def mark(path: Path, kind: str) -> None:
    atomic_write(Path(path) / MARKER, json.dumps({"created_by": "u2a", "kind": kind}) + "\n")


def claim_dir(path: Path, kind: str) -> bool:
    """Make ``path`` a u2a directory of ``kind``; True when it already was one.

    A missing or empty directory is created and marked. A marked one is kept. Anything else
    (a file, or a directory with content u2a did not write) is a ConfigError naming it.
    """
    path = Path(path)
    if check_claimable(path):
        return True
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    return False


def check_claimable(path: Path) -> bool:
    """:func:`claim_dir`'s test alone, creating nothing: True when ``path`` is u2a's already,
    False when it is missing or empty, a ConfigError naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory; u2a leaves it alone")
    if path.is_dir() and any(path.iterdir()):
        if is_marked(path):
            return True
        raise ConfigError(f"{path} exists and holds files u2a did not write (e.g. "
                          f"{_first(path.iterdir())}); choose a new or empty directory")
    return False


def clear_u2a_entries(path: Path, entries: frozenset[str] = RUN_ENTRIES) -> None:
    """Remove what u2a wrote in a marked directory, keeping the marker; refuse (deleting
    nothing) when it holds anything else or has no marker."""
    path = Path(path)
    if not is_marked(path):
        raise ConfigError(f"{path} was not created by u2a (no {MARKER} marker): --overwrite "
                          "only replaces u2a's own run directories; move it away yourself")
    foreign = sorted(p.name for p in path.iterdir()
                     if p.name not in entries and not _u2a_temp(p.name))
    if foreign:
        raise ConfigError(f"{path} holds files u2a did not write ({', '.join(foreign[:5])}); "
                          "--overwrite deletes nothing then: move them away first")
    for p in path.iterdir():
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _u2a_temp(name: str) -> bool:
    """atomic_write's temporaries (``.NAME.tmp``) of u2a's own entries."""
    return name.startswith(".") and name.endswith(".tmp") and name[1:-4] in RUN_ENTRIES


def _first(items) -> str:
    return str(next(iter(sorted(items))))


def check_disjoint(out: Path, inputs: list[Path], what: str = "out") -> None:
    """An output directory may neither contain an input nor lie inside one (or be one)."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == out or out in src.parents or src in out.parents:
            raise ConfigError(f"{what}={str(out)!r} overlaps the input {str(src)!r}: an output "
                              "directory may neither contain nor lie inside what it reads")
