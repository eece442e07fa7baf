"""Read raw rows from files (jsonl, json, csv, parquet, optionally .gz) or the hub.

Every parse error is a DataError naming the file and the 1-based line (jsonl) or row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad data: the message names the file and the line, row or key."""


Row = dict[str, Any]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lstrip(".") if suffixes else ""


def read_rows(path: str | Path, hub_split: str = "train") -> list[tuple[str, Row]]:
    """Rows with a location string (``file:line``) each, for error messages and ids.

    A file that is not UTF-8 text, or a ``.gz`` that is not gzip, is a DataError naming it.
    """
    p = Path(path)
    key = once_key(p, hub_split) if p.is_file() else None  # a directory: per file
    if key is not None and key in _ROWS:
        return list(_ROWS[key])
    try:
        rows = _read_rows(p, path, hub_split)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                        "UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{p}: not a valid gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if key is not None:
        _ROWS[key] = rows
    return list(rows)


#: Rows of every local file read in this process: a run reads each data spec from several
#: places (trainer, evaluation exclusions, preflight), the disk only once.
_ROWS: dict[tuple, list[tuple[str, Row]]] = {}


def once_key(path: Path, *extra: object) -> tuple | None:
    """A cache key for a local file or directory that changes when it does (None otherwise)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, *extra)


def _read_rows(p: Path, path: str | Path, hub_split: str) -> list[tuple[str, Row]]:
    if p.is_dir():
        rows: list[tuple[str, Row]] = []
        files = sorted(q for q in p.iterdir() if _kind(q) in ("json", "jsonl", "csv", "parquet"))
        if not files:
            raise DataError(f"{p}: directory holds no json/jsonl/csv/parquet files")
        for q in files:
            rows.extend(read_rows(q))
        return rows
    if not p.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")) and p.suffix == "":
            return _read_hub(str(path), hub_split)
        raise DataError(f"data file {str(p)!r} does not exist")
    kind = _kind(p)
    if kind == "jsonl":
        return _read_jsonl(p)
    if kind == "json":
        return _read_json(p)
    if kind == "csv":
        return _read_csv(p)
    if kind == "parquet":
        return _read_parquet(p)
    raise DataError(f"{p}: unknown file type {kind!r} (want jsonl, json, csv or parquet)")


def _read_jsonl(p: Path) -> list[tuple[str, Row]]:
    rows = []
    with _open_text(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got "
                                f"{type(row).__name__}")
            rows.append((f"{p}:{lineno}", row))
    return rows


def _read_json(p: Path) -> list[tuple[str, Row]]:
    try:
        with _open_text(p) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        # One object per line under a .json name (TOFU's *_perturbed.json; `datasets` reads
        # these as its json loader does): JSON Lines.
        if exc.msg == "Extra data" and exc.lineno > 1:
            return _read_jsonl(p)
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: a JSON object must hold exactly one list of rows "
                            f"(found lists under {lists})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a list of rows")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{p}: row {i}: expected an object, got {type(row).__name__}")
        rows.append((f"{p}:row {i}", row))
    return rows


def _read_csv(p: Path) -> list[tuple[str, Row]]:
    with _open_text(p) as fh:
        reader = csv.DictReader(fh)
        return [(f"{p}:{i + 2}", dict(row)) for i, row in enumerate(reader)]


def _read_parquet(p: Path) -> list[tuple[str, Row]]:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    return [(f"{p}:row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[tuple[str, Row]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file and `datasets` is not installed") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same user error
        raise DataError(f"{name!r} is neither a local file nor a loadable hub dataset: "
                        f"{exc}") from None
    return [(f"{name}[{split}]:{i}", dict(row)) for i, row in enumerate(ds)]
