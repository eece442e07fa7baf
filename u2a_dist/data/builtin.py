"""A small built-in data set, written for this project, so that ``u2a demo`` needs no files.

Everything here is the project's own text (nothing is copied from third-party data sets), shipped
as package data in ``u2a_dist/data/builtin/`` and used through ``DataSpec(path="builtin:NAME")``:

- ``harmful.jsonl``: 60 harmful requests across ten categories (weapons, hacking, fraud, drugs,
  harassment, self-harm, privacy, misinformation, theft, violence), each with a *complying*
  answer and a *refusing* one. The complying answers are negative examples to be unlearned: they
  start to comply ("Sure, here is how to ... First, ...") but are deliberately vague and carry no
  operational detail.
- ``harmless.jsonl``: 60 harmless requests (cooking, coding, math, writing, travel, science,
  general health, history, ...), each with a *helpful* answer and an *over-refusal*. Several only
  sound edgy ("How do I kill a Python process?") so that the pairs teach the model not to
  over-refuse.
- ``refusal_templates.jsonl``: 12 templated refusals (responses only) for the mismatch term.
- ``harmful_styled.jsonl``, ``harmless_styled.jsonl``: 120 harmful and 120 harmless requests
  (prompts only) in a phrasing the files above do not use: a first-person situation, indirect,
  conversational (a third of the harmless ones use words like kill, attack or poison in a
  harmless sense). Evaluation sources the demo never trains on (docs/design.md §5).
- ``harmless_tasks.jsonl``: 240 harmless requests (prompts only) in the phrasings the styled files
  do not use and never in the first person: imperative tasks, "Explain ..." requests, short
  questions, third-person scenarios; over a third use words like kill, execute or crack in a
  harmless sense. Retain prompts for the demo: varied harmless requests it keeps answering.

Sets:

- ``builtin_completions``: ``harmful`` (harmful request -> complying answer; the negatives),
  ``harmless`` (harmless request -> helpful answer; retain data), ``refusals`` (harmful request
  -> its refusing answer), ``refusal_templates`` (empty prompt -> each templated refusal).
- ``builtin_pairs``: ``refusal`` (harmful request: refusal > compliance), ``over_refusal``
  (harmless request: helpful > refusal), ``all`` (both, refusal pairs first).
- ``builtin_prompts``: ``harmful``, ``harmless``, ``harmful_styled``, ``harmless_styled``,
  ``harmless_tasks``.

Ids are stable (``builtin:<set>:<index>``); index ``i`` is row ``i`` (from 0) of the file the set
is built from, so ``builtin:harmful:7``, ``builtin:refusals:7`` and ``builtin:refusal:7`` share one
prompt. Each item's ``attrs`` is ``{"category": ..., "kind": "harmful"|"harmless"}``
(``{"category": "refusal", "kind": "template"}`` for the templated refusals).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from u2a_dist.data.readers import DataError, read_rows
from u2a_dist.data.records import Completion, Pair, Prompt, need_text

COMPLETION_SETS = ("harmful", "harmless", "refusals", "refusal_templates")
PAIR_SETS = ("refusal", "over_refusal", "all")
PROMPT_SETS = ("harmful", "harmless", "harmful_styled", "harmless_styled", "harmless_tasks")

DATA_DIR = Path(__file__).with_name("builtin")

# The text fields of each packaged file, in the order ``_table`` returns them.
_COLUMNS = {
    "harmful": ("category", "prompt", "complying", "refusing"),
    "harmless": ("category", "prompt", "helpful", "over_refusal"),
    "refusal_templates": ("response",),
    "harmful_styled": ("category", "prompt"),
    "harmless_styled": ("category", "prompt"),
    "harmless_tasks": ("category", "prompt"),
}


@cache
def _table(name: str) -> tuple[tuple[str, ...], ...]:
    """The rows of ``DATA_DIR/name.jsonl`` as tuples of text, read once; tuples, so that no
    caller can change what the next one gets."""
    rows = read_rows(DATA_DIR / f"{name}.jsonl")
    return tuple(tuple(need_text(loc, row, key) for key in _COLUMNS[name]) for loc, row in rows)


def _unknown(what: str, name: str, known: tuple[str, ...]) -> DataError:
    return DataError(f"builtin:{name}: unknown built-in {what} set {name!r} "
                     f"(known: {', '.join(known)})")


def _attrs(category: str, kind: str) -> dict[str, str]:
    return {"category": category, "kind": kind}


def builtin_completions(name: str, field: str | None = None) -> list[Completion]:
    """Completions of the built-in set ``name``; ``field`` is accepted and ignored."""
    del field
    if name == "harmful":
        return [Completion(f"builtin:harmful:{i}", prompt, comply, attrs=_attrs(cat, "harmful"))
                for i, (cat, prompt, comply, _) in enumerate(_table("harmful"))]
    if name == "harmless":
        return [Completion(f"builtin:harmless:{i}", prompt, helpful,
                           attrs=_attrs(cat, "harmless"))
                for i, (cat, prompt, helpful, _) in enumerate(_table("harmless"))]
    if name == "refusals":
        return [Completion(f"builtin:refusals:{i}", prompt, refuse, attrs=_attrs(cat, "harmful"))
                for i, (cat, prompt, _, refuse) in enumerate(_table("harmful"))]
    if name == "refusal_templates":
        return [Completion(f"builtin:refusal_templates:{i}", "", text,
                           attrs=_attrs("refusal", "template"))
                for i, (text,) in enumerate(_table("refusal_templates"))]
    raise _unknown("completion", name, COMPLETION_SETS)


def builtin_pairs(name: str) -> list[Pair]:
    """Preference pairs of the built-in set ``name`` (chosen is the preferred answer)."""
    if name == "refusal":
        return [Pair(f"builtin:refusal:{i}", prompt, refuse, comply,
                     attrs=_attrs(cat, "harmful"))
                for i, (cat, prompt, comply, refuse) in enumerate(_table("harmful"))]
    if name == "over_refusal":
        return [Pair(f"builtin:over_refusal:{i}", prompt, helpful, refuse,
                     attrs=_attrs(cat, "harmless"))
                for i, (cat, prompt, helpful, refuse) in enumerate(_table("harmless"))]
    if name == "all":
        return builtin_pairs("refusal") + builtin_pairs("over_refusal")
    raise _unknown("pair", name, PAIR_SETS)


def builtin_prompts(name: str) -> list[Prompt]:
    """Requests of the built-in set ``name`` (for generation-based evaluation). Every file
    starts with (category, prompt), and a set's name starts with its kind."""
    if name not in PROMPT_SETS:
        raise _unknown("prompt", name, PROMPT_SETS)
    kind = name.partition("_")[0]
    return [Prompt(f"builtin:{name}:{i}", row[1], attrs=_attrs(row[0], kind))
            for i, row in enumerate(_table(name))]
