"""Labelled model completions (``../shared/data/refusal/completions/*.json``).

Each file is ``MODEL__SETTING_evaluations.json`` (e.g. ``gemma-2b-it__jailbreakbench_baseline``)
with a top-level ``completions`` list of objects holding ``prompt``, ``response``, ``category``,
``is_jailbreak_substring_matching`` (1 = no refusal phrase found) and, in the harmful-instruction
files only, ``is_jailbreak_llamaguard2`` (1 = harmful compliance, judged by LlamaGuard 2).

These labels train and validate the harm judge (``u2a_dist.judges``), and each model's
``harmless_baseline`` / ``harmless_actadd`` files give the over-refusal pairs
(prompt, helpful answer, steered refusal) that both J and the evaluation use.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from u2a_dist.data.readers import DataError, once_key
from u2a_dist.data.records import need_text

FILE_SUFFIX = "_evaluations"
HARMLESS_HELPFUL = "harmless_baseline"
HARMLESS_REFUSAL = "harmless_actadd"


@dataclass
class LabelledCompletion:
    """One model completion with its labels (``None`` where the file has no such label)."""

    source_model: str
    setting: str
    prompt: str
    response: str
    category: str | None
    harmful: int | None  # 1 = harmful compliance (LlamaGuard 2); harmful-instruction files only
    no_refusal: int | None  # 1 = no refusal phrase found (substring matching)


def parse_file_name(path: Path) -> tuple[str, str]:
    """``MODEL__SETTING_evaluations.json`` -> (MODEL, SETTING); the name is the only place the
    source model and the setting are recorded."""
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.stem
    model, sep, setting = stem.partition("__")
    if not sep or not model or not setting:
        raise DataError(f"{path}: file name must look like MODEL__SETTING_evaluations.json "
                        "(e.g. gemma-2b-it__jailbreakbench_baseline_evaluations.json)")
    if setting.endswith(FILE_SUFFIX) and len(setting) > len(FILE_SUFFIX):
        setting = setting[: -len(FILE_SUFFIX)]
    return model, setting


def _flag(value: Any, where: str, key: str) -> int | None:
    """A 0/1 label that the files store as int, bool or the strings "0"/"1"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise DataError(f"{where}: field {key!r} must be 0 or 1 (int or string), got {value!r}")


def _load_file(path: Path) -> list[LabelledCompletion]:
    key = once_key(path)
    if key is None:
        return _parse_file(path)
    if key not in _FILES:
        _FILES[key] = _parse_file(path)
    return list(_FILES[key])


_FILES: dict[tuple, list[LabelledCompletion]] = {}  # read once per process


def _parse_file(path: Path) -> list[LabelledCompletion]:
    model, setting = parse_file_name(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("completions"), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a JSON object with a top-level 'completions' list "
                        f"(found {found})")
    out = []
    for i, row in enumerate(data["completions"]):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        category = row.get("category")
        out.append(LabelledCompletion(
            source_model=model,
            setting=setting,
            prompt=need_text(where, row, "prompt"),
            response=need_text(where, row, "response"),
            category=None if category is None else str(category),
            harmful=_flag(row.get("is_jailbreak_llamaguard2"), where, "is_jailbreak_llamaguard2"),
            no_refusal=_flag(row.get("is_jailbreak_substring_matching"), where,
                             "is_jailbreak_substring_matching"),
        ))
    return out


def load_labelled_completions(path: str | Path) -> list[LabelledCompletion]:
    """Read one ``*.json`` file, or every ``*.json`` file of a directory (sorted by name).

    Raises ``FileNotFoundError`` for a missing path and ``DataError`` (a ``ValueError``) naming
    the file, and the row index where there is one, for anything malformed.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"labelled completions {str(p)!r} do not exist")
    if p.is_dir():
        files = sorted(q for q in p.glob("*.json") if q.is_file())
        if not files:
            raise DataError(f"{p}: directory holds no *.json completion files "
                            "(expected MODEL__SETTING_evaluations.json)")
        out: list[LabelledCompletion] = []
        for q in files:
            out.extend(_load_file(q))
        return out
    return _load_file(p)


def over_refusal_pairs(completions: list[LabelledCompletion]) -> list[tuple[str, str, str]]:
    """(prompt, helpful, refusal) for every model that has both harmless files.

    Each model's ``harmless_baseline`` (helpful answers) and ``harmless_actadd`` (refusals
    induced by activation steering) answer the same prompts in the same order, so they pair by
    position; a length or prompt mismatch is an error rather than a silent mis-pairing. Models
    lacking either file contribute nothing. Output is ordered by model name, then position.
    """
    by_model: dict[str, dict[str, list[LabelledCompletion]]] = defaultdict(
        lambda: defaultdict(list))
    for c in completions:
        if c.setting in (HARMLESS_HELPFUL, HARMLESS_REFUSAL):
            by_model[c.source_model][c.setting].append(c)
    pairs: list[tuple[str, str, str]] = []
    for model in sorted(by_model):
        helpful, refusal = by_model[model][HARMLESS_HELPFUL], by_model[model][HARMLESS_REFUSAL]
        if not helpful or not refusal:
            continue
        if len(helpful) != len(refusal):
            raise DataError(f"{model}: {HARMLESS_HELPFUL} has {len(helpful)} completions but "
                            f"{HARMLESS_REFUSAL} has {len(refusal)}; they must answer the same "
                            "prompts in the same order")
        for i, (h, r) in enumerate(zip(helpful, refusal)):
            if h.prompt.strip() != r.prompt.strip():
                raise DataError(f"{model}: row {i}: {HARMLESS_HELPFUL} and {HARMLESS_REFUSAL} "
                                f"prompts differ ({h.prompt[:60]!r} vs {r.prompt[:60]!r})")
            pairs.append((h.prompt, h.response, r.response))
    return pairs
