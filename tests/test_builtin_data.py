"""The built-in demo data set (u2a_dist/data/builtin.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from u2a_dist.data.builtin import (
    COMPLETION_SETS,
    PAIR_SETS,
    PROMPT_SETS,
    builtin_completions,
    builtin_pairs,
    builtin_prompts,
)
from u2a_dist.data.examples import Completion, Pair, Prompt
from u2a_dist.data.readers import DataError

REFUSAL_PHRASES = ("i can't", "i cannot", "i'm sorry", "i won't", "i am sorry", "i will not",
                   "i'm not able")

HARMFUL_CATEGORIES = {"weapons", "hacking", "fraud", "drugs", "harassment", "self_harm",
                      "privacy", "misinformation", "theft", "violence"}


def looks_like_refusal(text: str) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(phrase in low for phrase in REFUSAL_PHRASES)


def _all_items() -> list[Completion | Pair | Prompt]:
    items: list[Completion | Pair | Prompt] = []
    for name in COMPLETION_SETS:
        items += builtin_completions(name)
    for name in PAIR_SETS:
        if name != "all":
            items += builtin_pairs(name)
    for name in PROMPT_SETS:
        items += builtin_prompts(name)
    return items


def test_counts():
    assert len(builtin_completions("harmful")) == 60
    assert len(builtin_completions("refusals")) == 60
    assert len(builtin_completions("harmless")) == 60
    assert len(builtin_completions("refusal_templates")) == 12
    assert len(builtin_pairs("refusal")) == 60
    assert len(builtin_pairs("over_refusal")) == 60
    assert len(builtin_pairs("all")) == 120
    assert len(builtin_prompts("harmful")) == 60
    assert len(builtin_prompts("harmless")) == 60


def test_types_and_attrs():
    for c in builtin_completions("harmful") + builtin_completions("refusals"):
        assert isinstance(c, Completion)
        assert c.attrs["kind"] == "harmful"
        assert c.attrs["category"] in HARMFUL_CATEGORIES
        assert c.history == []
    for c in builtin_completions("harmless"):
        assert c.attrs["kind"] == "harmless"
        assert c.attrs["category"] not in HARMFUL_CATEGORIES
    for p in builtin_pairs("all"):
        assert isinstance(p, Pair)
        assert p.attrs["kind"] in ("harmful", "harmless")
    for q in builtin_prompts("harmful") + builtin_prompts("harmless"):
        assert isinstance(q, Prompt)
    # every harmful category is well represented
    counts = Counter(c.attrs["category"] for c in builtin_completions("harmful"))
    assert set(counts) == HARMFUL_CATEGORIES
    assert min(counts.values()) >= 4


def test_ids_unique_and_stable():
    for name in COMPLETION_SETS:
        ids = [c.id for c in builtin_completions(name)]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(f"builtin:{name}:") for i in ids)
    assert builtin_completions("harmful")[17].id == "builtin:harmful:17"
    assert [c.id for c in builtin_completions("harmful")] == \
        [c.id for c in builtin_completions("harmful")]
    pair_ids = [p.id for p in builtin_pairs("all")]
    assert len(set(pair_ids)) == len(pair_ids)
    for name in PROMPT_SETS:
        ids = [q.id for q in builtin_prompts(name)]
        assert len(set(ids)) == len(ids)
    # no two sets share an id, except prompts, which reuse their completion set's ids
    seen = Counter(x.id for x in _all_items() if not isinstance(x, Prompt))
    assert max(seen.values()) == 1
    assert [q.id for q in builtin_prompts("harmful")] == \
        [c.id for c in builtin_completions("harmful")]


def test_text_non_empty():
    for x in _all_items():
        if isinstance(x, Completion):
            texts = [x.response] if x.attrs["kind"] == "template" else [x.prompt, x.response]
        elif isinstance(x, Pair):
            texts = [x.prompt, x.chosen, x.rejected]
        else:
            texts = [x.prompt]
        for t in texts:
            assert t and t.strip() == t, (x.id, t)
    for c in builtin_completions("refusal_templates"):
        assert c.prompt == ""
        assert c.attrs == {"category": "refusal", "kind": "template"}


def test_prompts_unique():
    harmful = [q.prompt for q in builtin_prompts("harmful")]
    harmless = [q.prompt for q in builtin_prompts("harmless")]
    assert len(set(harmful)) == len(harmful)
    assert len(set(harmless)) == len(harmless)
    assert not set(harmful) & set(harmless)
    templates = [c.response for c in builtin_completions("refusal_templates")]
    assert len(set(templates)) == len(templates)


def test_compliance_is_not_refusal_and_refusals_are():
    for c in builtin_completions("harmful"):
        assert not looks_like_refusal(c.response), c.id
        assert c.response.startswith(("Sure", "Of course", "Certainly")), c.id
        assert "first" in c.response.lower(), c.id
    for c in builtin_completions("refusals"):
        assert looks_like_refusal(c.response), c.id
    for c in builtin_completions("refusal_templates"):
        assert looks_like_refusal(c.response), c.response
    for p in builtin_pairs("over_refusal"):
        assert not looks_like_refusal(p.chosen), p.id
        assert looks_like_refusal(p.rejected), p.id


def test_refusals_are_varied():
    refusals = [c.response for c in builtin_completions("refusals")]
    assert len(set(refusals)) == len(refusals)
    openings = Counter(r.split(",")[0].split(".")[0].split()[1] for r in refusals)
    assert len(openings) >= 4  # "can't", "won't", "cannot", "will", "sorry", "not", ...


def test_refusal_pairs_match_harmful_completions():
    harmful = builtin_completions("harmful")
    refusals = builtin_completions("refusals")
    pairs = builtin_pairs("refusal")
    prompts = builtin_prompts("harmful")
    assert [p.prompt for p in pairs] == [c.prompt for c in harmful]
    assert [p.prompt for p in pairs] == [c.prompt for c in refusals]
    assert [p.prompt for p in pairs] == [q.prompt for q in prompts]
    for pair, comply, refuse in zip(pairs, harmful, refusals, strict=True):
        assert pair.rejected == comply.response
        assert pair.chosen == refuse.response
        assert pair.attrs == comply.attrs


def test_over_refusal_pairs_match_harmless_completions():
    harmless = builtin_completions("harmless")
    pairs = builtin_pairs("over_refusal")
    assert [p.prompt for p in pairs] == [c.prompt for c in harmless]
    assert [p.prompt for p in pairs] == [q.prompt for q in builtin_prompts("harmless")]
    assert [p.chosen for p in pairs] == [c.response for c in harmless]


def test_all_pairs_refusal_first():
    assert builtin_pairs("all") == builtin_pairs("refusal") + builtin_pairs("over_refusal")


def test_edgy_harmless_requests_present():
    prompts = " ".join(q.prompt.lower() for q in builtin_prompts("harmless"))
    for word in ("kill", "shoot", "attack", "hack", "exploit"):
        assert word in prompts, word


def test_field_is_ignored():
    assert builtin_completions("harmful", "chosen") == builtin_completions("harmful")
    assert builtin_completions("harmless", None) == builtin_completions("harmless")


def test_results_are_fresh_copies():
    first = builtin_completions("harmful")
    first[0].attrs["category"] = "changed"
    assert builtin_completions("harmful")[0].attrs["category"] == "weapons"


@pytest.mark.parametrize("call, known", [
    (builtin_completions, COMPLETION_SETS),
    (builtin_pairs, PAIR_SETS),
    (builtin_prompts, PROMPT_SETS),
])
def test_unknown_name(call, known):
    with pytest.raises(DataError) as err:
        call("nope")
    message = str(err.value)
    assert "nope" in message
    for name in known:
        assert name in message


def test_loaders_read_builtin_sets():
    from u2a_dist.data.examples import load_completions, load_pairs, load_prompts
    from u2a_dist.data_spec import DataSpec

    assert len(load_completions(DataSpec(path="builtin:harmful", schema="completions"))) == 60
    assert len(load_completions(DataSpec(path="builtin:refusal_templates"))) == 12
    assert len(load_pairs(DataSpec(path="builtin:all"))) == 120
    assert len(load_prompts(DataSpec(path="builtin:harmless", schema="prompts"))) == 60
    kept = load_completions(DataSpec(path="builtin:harmful", filter={"category": "fraud"}))
    assert len(kept) == 6
    with pytest.raises(DataError, match="known"):
        load_pairs(DataSpec(path="builtin:missing"))


def test_packaged_files_load():
    """Every row of every packaged file has exactly its columns, as text (what ``_table``
    reads), and every table ``builtin.py`` names is a file that ships."""
    from u2a_dist.data.builtin import _COLUMNS, DATA_DIR, _table
    from u2a_dist.data.readers import read_rows

    assert sorted(p.stem for p in DATA_DIR.glob("*.jsonl")) == sorted(_COLUMNS)
    for name, columns in _COLUMNS.items():
        rows = read_rows(DATA_DIR / f"{name}.jsonl")
        assert len(rows) == len(_table(name)) > 0
        for loc, row in rows:
            assert sorted(row) == sorted(columns), loc
            assert all(isinstance(v, str) and v.strip() == v for v in row.values()), loc


def _data_imports() -> dict[str, tuple[set[str], set[str]]]:
    """For each module of ``u2a_dist.data``: the data modules it imports at module level, and
    those it imports inside functions."""
    import ast
    from pathlib import Path

    import u2a_dist.data

    root = Path(u2a_dist.data.__file__).parent
    names = {p.stem for p in root.glob("*.py")} - {"__init__"}
    out = {}
    for name in names:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        top: set[str] = set()
        inner: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            parts = [t.split(".") for t in targets]
            found = {p[2] for p in parts if p[:2] == ["u2a_dist", "data"] and p[2:3] and
                     p[2] in names}
            (top if node in tree.body else inner).update(found)
        out[name] = (top, inner)
    return out


def test_data_package_imports_form_no_circle():
    graph = _data_imports()
    assert graph["records"][0] == {"readers"}
    assert all(not inner for _, inner in graph.values()), graph
    done: set[str] = set()
    while len(done) < len(graph):  # peel off modules whose imports are all done
        ready = {m for m, (top, _) in graph.items() if m not in done and top <= done}
        assert ready, f"import circle among {sorted(set(graph) - done)}"
        done |= ready
