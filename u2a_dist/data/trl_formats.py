"""TRL's dataset formats (docs/design.md §4, ``schema: trl``) read into u2a's records.

TRL names a data set's type by its fields, each in a standard (text) or a conversational
(``[{"role", "content"}, ...]``) form:

- prompt-only: ``prompt``; conversational language modelling: ``messages`` (prompt = the turns
  before the last assistant turn, completion = that turn; a conversation ending on a user turn is
  a prompt only);
- prompt-completion: ``prompt``, ``completion``;
- preference: ``chosen``, ``rejected`` and an explicit ``prompt``, or an implicit one (the
  shared start of both, as TRL's ``extract_prompt`` finds it);
- unpaired preference: ``prompt``, ``completion``, ``label`` (``false``: a dispreferred answer,
  a negative to forget; ``true``: a preferred one, for retain, mismatch answers or J).

The format is recognised per row from its fields, after ``columns`` (the spec's map from these
names to the file's own) renamed them. A conversational prompt becomes ``history`` + the last
user turn, the same record a standard prompt gives, so both tokenise to the same batch
(``tokenize.format_prompt`` renders the prompt as a user turn in either case; TRL's SFT feeds a
standard prompt raw, u2a always through the chat template).

Rows come from anything ``readers.read_rows`` reads (jsonl/json/csv/parquet, a directory, a
hub id) or from an in-memory ``datasets.Dataset`` (Python API: ``DataSpec(path=ds)``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from u2a_dist.data.readers import DataError, Row, read_rows
from u2a_dist.data.records import Completion, Messages, Pair, Prompt, need_text

#: The fields a format reads; every other field of a row is an attribute ``filter`` selects on.
TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages")

#: The project's schemas that read TRL's formats under their own field names: ``completions``
#: logs (``u2a eval``'s generations.jsonl, red-team logs) spell the completion ``response``.
ALIASES = {"completions": {"response": "completion"}}

_FORMATS = ("prompt-only (prompt), prompt-completion (prompt, completion), preference "
            "(chosen, rejected, optional prompt), unpaired preference (prompt, completion, "
            "label) or conversational (messages)")


@dataclass
class TrlRow:
    """One row in TRL's terms, its prompt split as the records hold it."""

    id: str
    format: str  # prompt-only | prompt-completion | preference | unpaired preference
    prompt: str
    history: Messages
    completion: str | None = None  # prompt-completion and unpaired preference rows
    chosen: str | None = None
    rejected: str | None = None
    label: bool | None = None  # unpaired preference rows
    attrs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- where rows come from

def is_dataset(path: object) -> bool:
    """Whether ``path`` is an in-memory ``datasets`` data set (imported only when it may be)."""
    if isinstance(path, (str, os.PathLike)):
        return False
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(path, (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict))


def describe(path: object) -> str:
    """A spec's path for messages: an in-memory data set by its columns and size."""
    if isinstance(path, (str, os.PathLike)):
        return str(path)
    columns = getattr(path, "column_names", None)
    return f"in-memory {type(path).__name__} (columns {columns})"


def row_id(loc: str, row: Row) -> str:
    """The row's ``id``, else its place (``file:line``, the file without its directory)."""
    if row.get("id") is not None:
        return str(row["id"])
    file, _, where = loc.rpartition(":")
    return f"{Path(file).name}:{where}"


def spec_rows(path: object, hub_split: str, columns: dict[str, str]) -> list[tuple[str, Row]]:
    """Rows of a file, directory, hub id or in-memory data set, renamed by ``columns``."""
    if is_dataset(path):
        if isinstance(path, dict):  # a DatasetDict: its `hub_split`, as for a hub id
            if hub_split not in path:
                raise DataError(f"{describe(path)}: no split {hub_split!r} (splits: "
                                f"{sorted(path)}); set hub_split")
            path = path[hub_split]
        # `dataset:row i` gives ids `dataset:row i`, as `file:row i` does for a parquet file.
        rows = [(f"dataset:row {i}", dict(row)) for i, row in enumerate(path)]
    elif isinstance(path, (str, os.PathLike)):
        rows = read_rows(path, hub_split)
    else:
        raise DataError(f"data path must be a file, a directory, a hub id, builtin:NAME or a "
                        f"datasets.Dataset, got {type(path).__name__}")
    return map_columns(rows, columns, describe(path))


def map_columns(rows: list[tuple[str, Row]], columns: dict[str, str],
                where: str) -> list[tuple[str, Row]]:
    """Each row with the file's field ``columns[name]`` renamed to ``name``.

    A mapped field missing from a row is an error naming the row, rather than the format
    silently changing under it (a prompt-completion row read as prompt-only).
    """
    if not columns:
        return rows
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()):
        raise DataError(f"{where}: `columns` maps field names to the file's field names, "
                        f"got {columns!r}")
    theirs = set(columns.values())
    out = []
    for loc, row in rows:
        for ours, name in columns.items():
            if name not in row:
                raise DataError(f"{loc}: `columns` takes {ours!r} from field {name!r}, which "
                                f"the row lacks (fields found: {sorted(row)})")
        renamed = {k: v for k, v in row.items() if k not in theirs}
        renamed.update({ours: row[name] for ours, name in columns.items()})
        out.append((loc, renamed))
    return out


# ---------------------------------------------------------------- one row

def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m for m in value))


def _messages(loc: str, key: str, value: Any) -> Messages:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m.get("content"), str):
            raise DataError(f"{loc}: {key}[{i}] needs text `content`, got "
                            f"{type(m.get('content')).__name__}")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _prompt(loc: str, key: str, value: Any) -> tuple[Messages, str]:
    """(history, prompt) of a standard or conversational prompt: the record's prompt is the
    last user turn, so a one-turn conversation and its text render alike."""
    if not _is_messages(value):
        return [], need_text(loc, {key: value}, key)
    turns = _messages(loc, key, value)
    if turns[-1]["role"] != "user":
        raise DataError(f"{loc}: conversational {key} must end with a user turn, not "
                        f"{turns[-1]['role']!r}")
    return turns[:-1], turns[-1]["content"]


def _answer(loc: str, key: str, value: Any) -> str:
    """A standard completion, or a conversational one of exactly one assistant turn (one
    response is what a log-prob and its loss are over)."""
    if not _is_messages(value):
        return need_text(loc, {key: value}, key)
    turns = _messages(loc, key, value)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"{loc}: conversational {key} must be one assistant turn, got roles "
                        f"{[m['role'] for m in turns]}")
    return turns[0]["content"]


def _label(loc: str, value: Any) -> bool:
    """TRL's bool, or the 0/1 and "true"/"false" that csv files and class labels give."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{loc}: field 'label' must be true or false, got {value!r}")


def _common_start(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The length of the longest common start of two sequences (turns or characters)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _implicit(loc: str, chosen: Any, rejected: Any) -> tuple[Messages, str, str, str]:
    """The prompt both sides share (TRL's ``extract_prompt``): whole leading turns of two
    conversations, or the common start of two texts (less a space before the split)."""
    if _is_messages(chosen) and _is_messages(rejected):
        n = _common_start(chosen, rejected)
        if n == 0:
            raise DataError(f"{loc}: chosen and rejected share no leading turn (no implicit "
                            "prompt); give a `prompt` field")
        history, prompt = _prompt(loc, "prompt", chosen[:n])
        return history, prompt, _answer(loc, "chosen", chosen[n:]), \
            _answer(loc, "rejected", rejected[n:])
    a, b = need_text(loc, {"chosen": chosen}, "chosen"), need_text(loc, {"rejected": rejected},
                                                                   "rejected")
    n = _common_start(a, b)
    if n and a[n - 1] == " ":
        n -= 1
    if n == 0:
        raise DataError(f"{loc}: chosen and rejected share no leading text (no implicit "
                        "prompt); give a `prompt` field")
    return [], a[:n], a[n:], b[n:]


def parse_row(loc: str, row: Row, schema: str = "trl") -> TrlRow:
    """One row as its TRL format says; an unrecognised row is an error naming it (``loc``
    starts with the file) and the fields found."""
    for theirs, ours in ALIASES.get(schema, {}).items():
        if theirs in row and ours not in row:
            row = {(ours if k == theirs else k): v for k, v in row.items()}
    have = {k for k, v in row.items() if v is not None}
    attrs = {k: v for k, v in row.items() if k not in TEXT_FIELDS}
    rid = row_id(loc, row)
    if {"chosen", "rejected"} <= have:
        chosen, rejected = row["chosen"], row["rejected"]
        # An explicit prompt counts when it has the sides' form (TRL's maybe_extract_prompt).
        if "prompt" in have and _is_messages(row["prompt"]) == _is_messages(chosen):
            history, prompt = _prompt(loc, "prompt", row["prompt"])
            chosen, rejected = _answer(loc, "chosen", chosen), _answer(loc, "rejected", rejected)
        else:
            history, prompt, chosen, rejected = _implicit(loc, chosen, rejected)
        return TrlRow(rid, "preference", prompt, history, chosen=chosen, rejected=rejected,
                      attrs=attrs)
    if {"prompt", "completion"} <= have:
        history, prompt = _prompt(loc, "prompt", row["prompt"])
        answer = _answer(loc, "completion", row["completion"])
        if "label" in have:
            return TrlRow(rid, "unpaired preference", prompt, history, completion=answer,
                          label=_label(loc, row["label"]), attrs=attrs)
        return TrlRow(rid, "prompt-completion", prompt, history, completion=answer, attrs=attrs)
    if "messages" in have and _is_messages(row["messages"]):
        turns = _messages(loc, "messages", row["messages"])
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=-1)
        if last == len(turns) - 1:  # ends on the answer: prompt-completion
            if last == 0:
                raise DataError(f"{loc}: messages hold an answer but no prompt before it")
            history, prompt = _prompt(loc, "messages", turns[:-1])
            return TrlRow(rid, "prompt-completion", prompt, history,
                          completion=turns[-1]["content"], attrs=attrs)
        history, prompt = _prompt(loc, "messages", turns)
        return TrlRow(rid, "prompt-only", prompt, history, attrs=attrs)
    if "prompt" in have:
        history, prompt = _prompt(loc, "prompt", row["prompt"])
        return TrlRow(rid, "prompt-only", prompt, history, attrs=attrs)
    raise DataError(f"{loc}: not a format this reader knows (fields found: {sorted(row)}); "
                    f"want {_FORMATS}, or map your field names with `columns`, e.g. "
                    "columns: {prompt: question, completion: answer}")


# ---------------------------------------------------------------- rows into records

def trl_completions(rows: list[tuple[str, Row]], side: str | None, where: str,
                    schema: str = "trl") -> list[Completion]:
    """Completions: each prompt-completion row; the ``side`` (``chosen`` | ``rejected``) of
    each preference row; unpaired rows whose label is that side (``rejected``: label false,
    the negatives; ``chosen``: label true)."""
    out = []
    for loc, raw in rows:
        r = parse_row(loc, raw, schema)
        if r.format == "prompt-only":
            raise DataError(f"{loc}: a prompt-only row has no completion (fields found: "
                            f"{sorted(raw)}); prompts to answer go in a `schema: prompts` spec")
        if r.format != "prompt-completion" and side not in ("chosen", "rejected"):
            raise DataError(f"{where}: {r.format} rows used as completions need `field: "
                            "rejected` (the dispreferred answers; label false) or `field: "
                            f"chosen` (label true), got field={side!r} (first at {loc})")
        if r.format == "preference":
            answer = r.chosen if side == "chosen" else r.rejected
        elif r.format == "unpaired preference" and r.label != (side == "chosen"):
            continue
        else:
            answer = r.completion
        out.append(Completion(r.id, r.prompt, answer or "", r.history, r.attrs))
    return out


def trl_pairs(rows: list[tuple[str, Row]], where: str, schema: str = "trl") -> list[Pair]:
    """Preference pairs: each preference row; unpaired rows paired within a prompt (its k-th
    label-true answer with its k-th label-false one, in row order; the rest pair with none)."""
    out: list[Pair] = []
    good: dict[tuple, list[TrlRow]] = defaultdict(list)
    bad: dict[tuple, list[TrlRow]] = defaultdict(list)
    order: list[tuple] = []
    for loc, raw in rows:
        r = parse_row(loc, raw, schema)
        if r.format == "preference":
            out.append(Pair(r.id, r.prompt, r.chosen or "", r.rejected or "", r.history,
                            r.attrs))
        elif r.format == "unpaired preference":
            key = (repr(r.history), r.prompt)
            if key not in good and key not in bad:
                order.append(key)
            (good if r.label else bad)[key].append(r)
        else:
            raise DataError(f"{where}: {r.format} rows give no preference pairs (first at "
                            f"{loc}); J needs chosen/rejected rows, or unpaired rows with "
                            "both labels for a prompt")
    for key in order:
        for g, b in zip(good[key], bad[key]):
            out.append(Pair(f"{g.id}|{b.id}", g.prompt, g.completion or "", b.completion or "",
                            g.history, g.attrs))
    return out


def trl_prompts(rows: list[tuple[str, Row]], schema: str = "trl") -> list[Prompt]:
    """The prompt of every row, whatever its format (a prompt answered twice comes twice, as
    with the other schemas)."""
    out = []
    for loc, raw in rows:
        r = parse_row(loc, raw, schema)
        out.append(Prompt(r.id, r.prompt, r.history, r.attrs))
    return out
