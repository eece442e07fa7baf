"""Near-duplicates of data rows, for noisy pools (issue 22): flagged-output logs repeat
themselves — the same request reported twice, asked again with a typo, answered again with a
word changed — and a selector has to cope with the repeats (``DataSpec.near_duplicates``).

A copy differs from its row by one or two small edits of each text (the prompt and every
response field), seeded by the spec so that a pool is the same on every rank and every run.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import TypeVar

Item = TypeVar("Item")
#: The text fields a copy edits (those a record has).
TEXT_FIELDS = ("prompt", "response", "chosen", "rejected")


def _drop_word(words: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(words))
    return words[:i] + words[i + 1:] if len(words) > 1 else words


def _swap_words(words: list[str], rng: random.Random) -> list[str]:
    if len(words) < 2:
        return words
    i = rng.randrange(len(words) - 1)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def _typo(words: list[str], rng: random.Random) -> list[str]:
    """Two neighbouring letters of one word swapped (``the`` → ``teh``)."""
    long = [i for i, w in enumerate(words) if len(w) > 3]
    if not long:
        return words
    i = rng.choice(long)
    w = words[i]
    j = rng.randrange(len(w) - 1)
    return words[:i] + [w[:j] + w[j + 1] + w[j] + w[j + 2:]] + words[i + 1:]


def _case(words: list[str], rng: random.Random) -> list[str]:
    del rng
    return [words[0].swapcase()] + words[1:]


EDITS: tuple[Callable[[list[str], random.Random], list[str]], ...] = (
    _drop_word, _swap_words, _typo, _case)


def near_duplicate(text: str, rng: random.Random) -> str:
    """``text`` with one or two small edits; never ``text`` itself (a trailing mark at worst)."""
    words = text.split(" ")
    for _ in range(rng.choice((1, 2))):
        words = rng.choice(EDITS)(words, rng)
    edited = " ".join(words)
    return edited if edited != text else text + rng.choice(("?", ".", "!", " "))


def near_duplicates(items: list[Item], n: int, seed: str) -> list[Item]:
    """``n`` copies of rows drawn from ``items`` (with replacement), each edited; a copy's id is
    ``<id>~dup<k>`` and its attributes say which row it copies (``near_duplicate_of``)."""
    rng = random.Random(seed)  # a str seed is hashed stably (not Python's salted hash)
    out = []
    for k in range(n):
        item = items[rng.randrange(len(items))]
        edits = {f: near_duplicate(getattr(item, f), rng)
                 for f in TEXT_FIELDS if hasattr(item, f) and getattr(item, f)}
        out.append(dataclasses.replace(item, id=f"{item.id}~dup{k}", **edits,
                                       attrs={**item.attrs, "near_duplicate_of": item.id}))
    return out
