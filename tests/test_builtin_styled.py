"""The built-in prompt-only files: the styled ones (u2a_dist/data/builtin/harmful_styled.jsonl and
harmless_styled.jsonl): requests in a phrasing the training data does not use (a first-person
situation, conversational, often indirect), for telling "refuse harmful requests" apart from
"refuse this phrasing"; and harmless_tasks.jsonl, varied retain prompts never in that style.
Prompts only: no answers, no model needed."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from u2a_dist.data.builtin import DATA_DIR, PROMPT_SETS
from u2a_dist.data.examples import load_prompts
from u2a_dist.data.records import prompt_key
from u2a_dist.data_spec import DataSpec

NAMES = ("harmful_styled", "harmless_styled")
ROWS = 120
BANNED_OPENERS = ("explain", "write", "give", "describe", "create", "provide", "list",
                  "how do i")
# words that make a harmless request *sound* harmful (over-refusal probes)
EDGY = re.compile(r"\b(kill\w*|shoot\w*|shot|attack\w*|hack\w*|poison\w*|knife|knives|bomb\w*|"
                  r"steal\w*|stole\w*|stab\w*|grenade|gun\w*|explosion\w*|destroy\w*|fatal)\b")


def _rows(name: str) -> list[dict]:
    path = DATA_DIR / f"{name}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _prompts(name: str) -> list[str]:
    return [row["prompt"] for row in _rows(name)]


@pytest.mark.parametrize("name", NAMES)
def test_rows_and_fields(name):
    rows = _rows(name)
    assert len(rows) == ROWS
    for row in rows:
        assert set(row) == {"category", "prompt"}, row
        assert isinstance(row["prompt"], str) and isinstance(row["category"], str)
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", row["category"]), row["category"]
        assert row["prompt"] == row["prompt"].strip()


@pytest.mark.parametrize("name", NAMES)
def test_no_duplicates(name):
    keys = [prompt_key(p) for p in _prompts(name)]
    assert len(set(keys)) == len(keys), [k for k, n in Counter(keys).items() if n > 1]
    openings = Counter(" ".join(k.split()[:5]) for k in keys)
    assert max(openings.values()) == 1, [o for o, n in openings.items() if n > 1]


def test_files_do_not_share_prompts():
    harmful = {prompt_key(p) for p in _prompts("harmful_styled")}
    harmless = {prompt_key(p) for p in _prompts("harmless_styled")}
    assert not harmful & harmless


@pytest.mark.parametrize("name", NAMES)
def test_length_and_style(name):
    for prompt in _prompts(name):
        assert 8 <= len(prompt.split()) <= 60, prompt
        low = prompt.lower()
        assert not low.startswith(BANNED_OPENERS), prompt
        assert "step-by-step" not in low and "tutorial" not in low, prompt


@pytest.mark.parametrize("name", NAMES)
def test_no_overlap_with_training_style_builtin(name):
    old = {prompt_key(row["prompt"]) for base in ("harmful", "harmless")
           for row in _rows(base)}
    assert len(old) == 120
    assert not {prompt_key(p) for p in _prompts(name)} & old


def test_categories_are_spread():
    harmful = Counter(row["category"] for row in _rows("harmful_styled"))
    harmless = Counter(row["category"] for row in _rows("harmless_styled"))
    assert len(harmful) >= 9 and len(harmless) >= 9
    assert min(harmful.values()) >= 8 and max(harmful.values()) <= 16
    assert min(harmless.values()) >= 8 and max(harmless.values()) <= 16
    assert not set(harmful) & set(harmless)


def test_harmless_has_edgy_sounding_requests():
    edgy = [p for p in _prompts("harmless_styled") if EDGY.search(p.lower())]
    assert len(edgy) >= ROWS // 4, len(edgy)


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_prompt_file(name):
    items = load_prompts(DataSpec(path=str(DATA_DIR / f"{name}.jsonl"), schema="prompts"))
    rows = _rows(name)
    assert [q.prompt for q in items] == [row["prompt"] for row in rows]
    assert [q.attrs["category"] for q in items] == [row["category"] for row in rows]
    assert len({q.id for q in items}) == ROWS


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_builtin_name(name):
    if name not in PROMPT_SETS:
        pytest.skip(f"u2a_dist/data/builtin.py does not map builtin:{name} to its file yet "
                    f"(prompt sets: {', '.join(PROMPT_SETS)})")
    items = load_prompts(DataSpec(path=f"builtin:{name}", schema="prompts"))
    rows = _rows(name)
    assert [q.prompt for q in items] == [row["prompt"] for row in rows]
    assert [q.attrs["category"] for q in items] == [row["category"] for row in rows]
    assert len({q.id for q in items}) == ROWS


def test_the_demo_is_judged_on_the_styles_it_never_trains_on():
    """`u2a demo` trains on the built-in requests' train split and is judged by source: the
    styled requests are held out (the target is judged on them, ≥ 100 of each kind); the eval
    split of the trained-on requests is reported as seen."""
    from u2a_dist.cli import demo_config
    from u2a_dist.config import config_from_dict
    from u2a_dist.eval_sources import load_eval_sources, target_value
    from u2a_dist.evaluate import training_prompt_keys

    cfg = config_from_dict(demo_config("runs/x", "tiny-gpt2"))
    keys = training_prompt_keys(cfg)
    for kind in ("harmful", "harmless"):
        sources = {s.name: s for s in load_eval_sources(cfg, kind, keys, keys)}
        assert set(sources) == {kind, f"{kind}_styled"}
        assert sources[f"{kind}_styled"].held_out and len(sources[f"{kind}_styled"].prompts) >= 100
        assert not sources[kind].held_out and sources[kind].read_by_training
    metric = cfg.eval.target.metric
    value, scope = target_value({metric: 0.5, f"{metric}@held_out": 0.1}, metric)
    assert (value, scope) == (0.1, "held-out sources")


# The demo's extra retain prompts (builtin:harmless_tasks): varied harmless requests it trains on,
# so they must never take the held-out styled files' first-person phrasing or prompts.
TASKS = "harmless_tasks"
FIRST_PERSON = re.compile(r"\b(i|i'm|i've|i'd|i'll|my|me|mine|we|we're|our|us)\b", re.IGNORECASE)


def test_harmless_tasks_rows_and_fields():
    rows = _rows(TASKS)
    assert len(rows) == 240
    for row in rows:
        assert set(row) == {"category", "prompt"}, row
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", row["category"]), row["category"]
        assert row["prompt"] == row["prompt"].strip() and 4 <= len(row["prompt"].split()) <= 40
    assert min(Counter(row["category"] for row in rows).values()) >= 10


def test_harmless_tasks_are_never_in_the_held_out_first_person_style():
    assert not [p for p in _prompts(TASKS) if FIRST_PERSON.search(p.replace("\u2019", "'"))]


def test_harmless_tasks_share_no_prompt_with_any_other_builtin_file():
    keys = [prompt_key(p) for p in _prompts(TASKS)]
    assert len(set(keys)) == len(keys)
    for other in ("harmful", "harmless", *NAMES):
        assert not set(keys) & {prompt_key(p) for p in _prompts(other)}, other


def test_harmless_tasks_have_edgy_sounding_requests():
    edgy = [p for p in _prompts(TASKS) if EDGY.search(p.lower())]
    assert len(edgy) >= 30, len(edgy)


def test_harmless_tasks_load_as_a_builtin_prompt_set():
    items = load_prompts(DataSpec(path=f"builtin:{TASKS}", schema="prompts"))
    assert [q.prompt for q in items] == _prompts(TASKS)
    assert {q.attrs["kind"] for q in items} == {"harmless"}
    assert items[3].id == f"builtin:{TASKS}:3"
