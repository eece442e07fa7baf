"""Turn raw rows of each schema into the three example kinds the trainer uses.

- ``Completion(prompt, response)``: negatives to forget, retain data, mismatch answers.
- ``Pair(prompt, chosen, rejected)``: preference pairs for J and for pa/accuracy.
- ``Prompt(prompt)``: prompts for generation-based evaluation.

Schemas (design.md §4): ``pairs`` (prompt/chosen/rejected), ``refusal-pairs`` (same, plus model and
category), ``hh-rlhf`` (two whole dialogues that differ in the last Assistant turn),
``completions`` (labelled model completions, a file or a directory of them), ``prompts``
(``instruction``), ``qa`` (``question``/``answer``, or TruthfulQA's CSV columns), and ``trl``
(TRL's formats, recognised per row: ``trl_formats``). ``completions`` beyond the labelled files
is TRL's prompt-completion with ``response`` for ``completion``. Every schema read from rows
takes the spec's ``columns`` renames and an in-memory ``datasets.Dataset`` as its ``path``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

from u2a_dist.data.builtin import builtin_completions, builtin_pairs, builtin_prompts
from u2a_dist.data.completions import (
    LabelledCompletion,
    load_labelled_completions,
    over_refusal_pairs,
)
from u2a_dist.data.noise import near_duplicates
from u2a_dist.data.readers import DataError, Row

# The record types live in ``records``; other modules import them from here too.
from u2a_dist.data.records import (
    Completion,
    Messages,
    Pair,
    Prompt,
    need_text,
    prompt_hash,
    prompt_key,
)
from u2a_dist.data.trl_formats import (
    describe,
    spec_rows,
    trl_completions,
    trl_pairs,
    trl_prompts,
)
from u2a_dist.data.trl_formats import row_id as _row_id
from u2a_dist.data_spec import DataSpec, source_name


def _rows(spec: DataSpec) -> list[tuple[str, Row]]:
    return spec_rows(spec.path, spec.hub_split, spec.columns)


def _where(spec: DataSpec) -> str:
    return describe(spec.path)


# ---------------------------------------------------------------- hh-rlhf dialogue parsing

def parse_dialogue(text: str, loc: str) -> tuple[Messages, str]:
    """Split ``\\n\\nHuman: ... \\n\\nAssistant: ...`` into (messages before, last answer)."""
    turns: Messages = []
    rest = text
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    pos = []
    for marker, role in markers.items():
        start = 0
        while (i := rest.find(marker, start)) != -1:
            pos.append((i, marker, role))
            start = i + 1
    pos.sort()
    if not pos or pos[-1][2] != "assistant":
        raise DataError(f"{loc}: hh-rlhf dialogue must end with an Assistant turn")
    for k, (i, marker, role) in enumerate(pos):
        end = pos[k + 1][0] if k + 1 < len(pos) else len(rest)
        turns.append({"role": role, "content": rest[i + len(marker):end].strip()})
    return turns[:-1], turns[-1]["content"]


def _hh_pair(loc: str, row: Row) -> Pair:
    """Prompt = the longest shared prefix ending at an Assistant marker (as TRL does).

    A few HH-RLHF rows differ before their last turn; the shared part is the context, the rest
    of each dialogue is that side's answer.
    """
    chosen, rejected = need_text(loc, row, "chosen"), need_text(loc, row, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker, 0, n)  # the last marker lying wholly inside the shared prefix
    if cut < 0:
        raise DataError(f"{loc}: hh-rlhf chosen and rejected share no Human/Assistant context")
    turns, _ = parse_dialogue(chosen[:cut] + marker + " x", loc)
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"{loc}: hh-rlhf dialogue has no Human turn before the answer")
    start = cut + len(marker)
    # human_turns: `filter: {human_turns: 1}` keeps the dialogues that open with the request
    # (HH's red-team prompts as single-turn requests, e.g. for a red-team log).
    return Pair(_row_id(loc, row), turns[-1]["content"], chosen[start:].strip(),
                rejected[start:].strip(), history=turns[:-1],
                attrs={"human_turns": sum(t["role"] == "user" for t in turns)})


# ---------------------------------------------------------------- per-schema conversion

def _pairs(spec: DataSpec, rows: list[tuple[str, Row]]) -> list[Pair]:
    if spec.schema in ("pairs", "refusal-pairs"):
        out = []
        for loc, row in rows:
            attrs = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
            out.append(Pair(_row_id(loc, row), need_text(loc, row, "prompt"),
                            need_text(loc, row, "chosen"), need_text(loc, row, "rejected"),
                            attrs=attrs))
        return out
    if spec.schema == "hh-rlhf":
        return [_hh_pair(loc, row) for loc, row in rows]
    if spec.schema == "qa":  # TruthfulQA: best answer ≻ first incorrect answer
        out = []
        for loc, row in rows:
            wrong = need_text(loc, row, "Incorrect Answers").split(";")[0].strip()
            out.append(Pair(_row_id(loc, row), need_text(loc, row, "Question"),
                            need_text(loc, row, "Best Answer"), wrong))
        return out
    raise DataError(f"{_where(spec)}: schema {spec.schema!r} does not give preference pairs")


def _completions(spec: DataSpec, rows: list[tuple[str, Row]]) -> list[Completion]:
    if spec.schema in ("pairs", "refusal-pairs", "hh-rlhf"):
        if spec.field not in ("chosen", "rejected"):
            raise DataError(f"{_where(spec)}: schema {spec.schema!r} used as completions needs "
                            "`field: chosen|rejected`")
        return [Completion(p.id, p.prompt, getattr(p, spec.field), p.history, p.attrs)
                for p in _pairs(spec, rows)]
    if spec.schema == "qa":
        out = []
        for loc, row in rows:
            if "question" in row:
                prompt, answer = need_text(loc, row, "question"), need_text(loc, row, "answer")
            else:
                prompt, answer = need_text(loc, row, "Question"), need_text(loc, row, "Best Answer")
            out.append(Completion(_row_id(loc, row), prompt, answer))
        return out
    raise DataError(f"{_where(spec)}: schema {spec.schema!r} does not give completions")


def _labelled(spec: DataSpec) -> list[LabelledCompletion]:
    try:
        return load_labelled_completions(spec.path)
    except FileNotFoundError as exc:
        raise DataError(f"{spec.path}: {exc}") from None


def _keep(spec: DataSpec, attrs: dict[str, Any], prompt: str) -> bool:
    for key, want in spec.filter.items():
        have = attrs.get(key)
        if isinstance(want, list):
            if have not in want and str(have) not in map(str, want):
                return False
        elif have != want and str(have) != str(want):
            return False
    if spec.split is not None:
        in_eval = prompt_hash(prompt) / 2**64 < spec.eval_fraction
        if in_eval != (spec.split == "eval"):
            return False
    return True


def _finish(spec: DataSpec, items: list, what: str) -> list:
    items = [x for x in items if _keep(spec, x.attrs, x.prompt)]
    if spec.exclude:  # a source kept out of training (data.hold_out_sources)
        drop = {prompt_key(p.prompt) for ex in spec.exclude for p in load_prompts(ex)}
        items = [x for x in items if prompt_key(x.prompt) not in drop]
    if spec.limit is not None:
        items = items[: spec.limit]
    if not items:
        raise DataError(f"{_where(spec)}: no {what} left after reading "
                        f"(schema={spec.schema}, filter={spec.filter}, split={spec.split}"
                        + (f", without {[source_name(e) for e in spec.exclude]}"
                           if spec.exclude else "") + ")")
    if spec.near_duplicates:
        items = items + near_duplicates(items, spec.near_duplicates,
                                        seed=f"{_where(spec)}:{spec.near_duplicates}")
    if spec.label is not None:  # ground truth for reports: nothing that trains reads it
        items = [dataclasses.replace(x, attrs={**x.attrs, "label": spec.label}) for x in items]
    return items


def _concat(parts: list[list]) -> list:
    """Several specs' items in order; an id that two specs share would make scores and
    weights ambiguous, so it is an error naming it."""
    items = [x for part in parts for x in part]
    seen: set[str] = set()
    for x in items:
        if x.id in seen:
            raise DataError(f"id {x.id!r} occurs in more than one of the listed data specs")
        seen.add(x.id)
    return items


def _builtin(spec: DataSpec) -> str | None:
    path = spec.path
    return path[len("builtin:"):] if isinstance(path, str) and path.startswith("builtin:") \
        else None


def _labelled_files(spec: DataSpec) -> bool:
    """Whether a ``completions`` spec names labelled-completion files
    (``MODEL__SETTING_evaluations.json``, or a directory holding them); anything else, a
    ``.jsonl`` log, a parquet file, a hub id or a Dataset, is read as TRL rows."""
    if spec.schema != "completions" or not isinstance(spec.path, str):
        return False
    p = Path(spec.path)
    files = list(p.glob("*.json")) if p.is_dir() else [p] if p.suffix == ".json" else []
    return any("__" in q.name for q in files)


def load_completions(spec: DataSpec | list[DataSpec]) -> list[Completion]:
    if isinstance(spec, list):
        return _concat([load_completions(one) for one in spec])
    if (name := _builtin(spec)) is not None:
        return _finish(spec, builtin_completions(name, spec.field), "completions")
    if _labelled_files(spec):
        items = [Completion(f"{c.source_model}__{c.setting}:{i}", c.prompt, c.response,
                            attrs={"source_model": c.source_model, "setting": c.setting,
                                   "category": c.category, "harmful": c.harmful,
                                   "no_refusal": c.no_refusal})
                 for i, c in enumerate(_labelled(spec))]
        return _finish(spec, items, "completions")
    if spec.schema in ("trl", "completions"):  # a completions log (``u2a eval``'s
        # generations.jsonl, a red-team log): every other field an attribute `filter` selects on
        return _finish(spec, trl_completions(_rows(spec), spec.field, _where(spec), spec.schema),
                       "completions")
    return _finish(spec, _completions(spec, _rows(spec)), "completions")


def load_pairs(spec: DataSpec | list[DataSpec]) -> list[Pair]:
    if isinstance(spec, list):
        return _concat([load_pairs(one) for one in spec])
    if (name := _builtin(spec)) is not None:
        return _finish(spec, builtin_pairs(name), "pairs")
    if _labelled_files(spec):  # over-refusal pairs: helpful ≻ refusal on harmless prompts
        labelled = _labelled(spec)
        items = [Pair(f"over_refusal:{i}", prompt, helpful, refusal,
                      attrs={"kind": "over_refusal"})
                 for i, (prompt, helpful, refusal) in enumerate(over_refusal_pairs(labelled))]
        return _finish(spec, items, "pairs")
    if spec.schema in ("trl", "completions"):
        return _finish(spec, trl_pairs(_rows(spec), _where(spec), spec.schema), "pairs")
    return _finish(spec, _pairs(spec, _rows(spec)), "pairs")


def load_prompts(spec: DataSpec | list[DataSpec]) -> list[Prompt]:
    if isinstance(spec, list):
        return _concat([load_prompts(one) for one in spec])
    if (name := _builtin(spec)) is not None:
        return _finish(spec, builtin_prompts(name), "prompts")
    if spec.schema == "prompts":
        items = []
        for loc, row in _rows(spec):
            # Alpaca/AdvBench spell it `instruction`, TRL `prompt`, QA sets (TOFU) `question`.
            key = next((k for k in ("instruction", "prompt", "question") if k in row), "prompt")
            items.append(Prompt(_row_id(loc, row), need_text(loc, row, key),
                                attrs={k: v for k, v in row.items() if k != key}))
        return _finish(spec, items, "prompts")
    if _labelled_files(spec):
        items = [Prompt(f"{c.id}", c.prompt, attrs=c.attrs) for c in load_completions(spec)]
        return _finish(spec, items, "prompts")
    if spec.schema in ("trl", "completions"):
        return _finish(spec, trl_prompts(_rows(spec), spec.schema), "prompts")
    pairs = load_pairs(spec)
    return _finish(spec, [Prompt(p.id, p.prompt, p.history, p.attrs) for p in pairs], "prompts")


def mismatch_answers(examples: list[Completion], answers: list[Completion],
                     where: str) -> list[str]:
    """y'_i for each negative: an answer to its own prompt where ``answers`` has one (the
    refusal pairs' chosen side, a helpful answer to an over-refused prompt: grounded in the
    prompt), else a prompt-less one (a templated refusal). One fixed answer per example (i mod
    the count of its candidates), so m_i is a deterministic function of θ that the selector can
    score."""
    grounded, templates = _answers_by_prompt(answers)
    out = []
    for i, e in enumerate(examples):
        own = grounded.get(prompt_key(e.prompt)) or templates
        if not own:
            raise DataError(f"{where}: no mismatch answer for forget example {e.id!r} (its prompt "
                            "has none and there are no prompt-less answers to fall back on)")
        out.append(own[i % len(own)])
    return out


def _answers_by_prompt(answers: list[Completion]) -> tuple[dict[str, list[str]], list[str]]:
    """The mismatch candidates as (answers by prompt key, prompt-less templates)."""
    grounded: dict[str, list[str]] = defaultdict(list)
    templates: list[str] = []
    for a in answers:
        (grounded[prompt_key(a.prompt)] if a.prompt.strip() else templates).append(a.response)
    return grounded, templates


def grounded_answers(examples: list[Completion], answers: list[Completion]) -> list[bool]:
    """Which negatives :func:`mismatch_answers` gives an answer to their own prompt (not a
    template): a report on a labelled pool says when this differs by label, since the score's
    mismatch part can then tell the labels apart by the targets alone (BENCHMARKS, Noisy pools)."""
    grounded, _ = _answers_by_prompt(answers)
    return [prompt_key(e.prompt) in grounded for e in examples]


def with_rejected_refusals(pairs: list[Pair], refusals: list[str], where: str) -> list[Pair]:
    """``pairs`` with each over-refusal pair's (helpful ≻ refusal on a harmless prompt: ``kind``
    ``over_refusal`` from labelled completions, ``harmless`` from the built-in sets) rejected
    side replaced by ``refusals`` in turn (the k-th such pair gets refusal k mod their count);
    the other pairs as they are (``data.pa_refusals``)."""
    if not refusals:
        raise DataError(f"{where}: data.pa_refusals holds no refusals")
    out, k = [], 0
    for pair in pairs:
        if pair.attrs.get("kind") in ("over_refusal", "harmless"):
            pair = dataclasses.replace(pair, rejected=refusals[k % len(refusals)])
            k += 1
        out.append(pair)
    if k == 0:
        raise DataError(f"{where}: data.pa has no over-refusal pairs (labelled completions with "
                        "helpful and refusing answers to harmless prompts) for data.pa_refusals")
    return out
