"""The records every data module produces, and the few rules they share.

This module sits at the bottom of ``u2a_dist.data``: it imports only ``readers`` (for
``DataError`` and ``Row``), so ``examples``, ``completions`` and ``builtin`` can all use it
without importing each other.

- ``Completion(prompt, response)``: negatives to forget, retain data, mismatch answers.
- ``Pair(prompt, chosen, rejected)``: preference pairs for J and for pa/accuracy.
- ``Prompt(prompt)``: prompts for generation-based evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from u2a_dist.data.readers import DataError, Row

Messages = list[dict[str, str]]


@dataclass
class Completion:
    """A prompt and one response (to forget, to retain, or a mismatch answer)."""

    id: str
    prompt: str
    response: str
    history: Messages = field(default_factory=list)  # earlier turns (hh-rlhf), before `prompt`
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    history: Messages = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prompt:
    """A prompt alone, for generation-based evaluation."""

    id: str
    prompt: str
    history: Messages = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


def need_text(loc: str, row: Row, key: str) -> str:
    """``row[key]`` as text, or a DataError naming ``loc`` and the key: the one text-field
    check of every reader, so that every schema reports a bad row the same way."""
    if key not in row or row[key] is None:
        raise DataError(f"{loc}: missing field {key!r} (row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{loc}: field {key!r} must be text, got {type(value).__name__}")
    return value


def prompt_key(text: str) -> str:
    """How prompts are compared for held-out checks: case and runs of white space ignored."""
    return " ".join(text.lower().split())


def prompt_hash(text: str) -> int:
    """A stable 64-bit hash of a prompt (case and surrounding space ignored) that assigns it to
    a split or a fold, so that every answer to one prompt lands on the same side.

    It folds less than ``prompt_key`` (runs of inner white space still count): switching it to
    ``prompt_key`` would move prompts between the train and eval splits of existing data.
    """
    digest = hashlib.sha1(text.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "big")
