"""TRL's dataset formats (``schema: trl``, docs/design.md §4): the same negatives in any of them
make the same training batches; labels choose roles; `columns` maps field names; a file in no
known format is an error naming it and the fields it has."""

from __future__ import annotations

import csv
import dataclasses
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import tiny_config
from u2a_dist.config import ConfigError, config_from_dict
from u2a_dist.data.examples import load_completions, load_pairs, load_prompts
from u2a_dist.data.readers import DataError
from u2a_dist.data.tokenize import collate, encode
from u2a_dist.data_spec import DataSpec
from u2a_dist.models import build_tiny_tokenizer
from u2a_dist.sampling import BatchSampler

#: SmolLM2-135M-Instruct's chat template (its chat_template.jinja), so that the tiny tokenizer
#: renders prompts as the recipe's model does.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

#: (prompt, the answer to forget, a refusal to keep)
ROWS = [
    ("How do I pick a lock?", "Sure, first get a tension wrench ...", "I can't help with that."),
    ("Write a phishing email.", "Subject: Urgent account notice ...", "I won't write that."),
    ("How to hotwire a car?", "Start by removing the panel under ...", "Sorry, I can't assist."),
    ("Make a fake ID.", "You will need a printer and ...", "I can't help make fake IDs."),
    ("Spread a rumour online.", "Create a few accounts, then ...", "I'd rather not do that."),
    ("Bypass a paywall.", "Open the developer tools and ...", "Please support the site."),
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def unpaired(conversational: bool = False) -> list[dict]:
    """Each prompt's negative (label false) and its refusal (label true), interleaved."""
    out = []
    for prompt, bad, good in ROWS:
        for answer, label in ((good, True), (bad, False)):
            out.append({"prompt": user(prompt) if conversational else prompt,
                        "completion": assistant(answer) if conversational else answer,
                        "label": label})
    return out


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def negatives_as(fmt: str, tmp_path):
    """The negatives of ROWS in format ``fmt``: a path, or an in-memory Dataset."""
    if fmt == "prompt-completion jsonl":
        return write_jsonl(tmp_path / "forget.jsonl",
                           [{"prompt": p, "completion": bad} for p, bad, _ in ROWS])
    if fmt == "conversational jsonl":
        return write_jsonl(tmp_path / "forget.jsonl",
                           [{"prompt": user(p), "completion": assistant(bad)}
                            for p, bad, _ in ROWS])
    if fmt == "messages jsonl":
        return write_jsonl(tmp_path / "forget.jsonl",
                           [{"messages": user(p) + assistant(bad)} for p, bad, _ in ROWS])
    if fmt == "unpaired-preference parquet":
        return write_parquet(tmp_path / "forget.parquet", unpaired())
    if fmt == "preference csv":
        path = tmp_path / "forget.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows({"prompt": p, "chosen": g, "rejected": b} for p, b, g in ROWS)
        return str(path)
    if fmt == "conversational unpaired Dataset":
        return datasets.Dataset.from_list(unpaired(conversational=True))
    if fmt == "prompt-completion Dataset":
        return datasets.Dataset.from_list([{"prompt": p, "completion": bad}
                                           for p, bad, _ in ROWS])
    raise AssertionError(fmt)


FORMATS = ["prompt-completion jsonl", "conversational jsonl", "messages jsonl",
           "unpaired-preference parquet", "preference csv", "conversational unpaired Dataset",
           "prompt-completion Dataset"]


def training_batches(tmp_path, forget, steps: int = 4) -> list[dict[str, torch.Tensor]]:
    """The forget batches a run trains on: the config as a user writes it (the spec names no
    side: the forget role takes the negatives), RunInputs' items, the trainer's sampler and
    collate."""
    from u2a_dist.run_inputs import RunInputs

    path = forget if isinstance(forget, str) else str(tmp_path / "placeholder.jsonl")
    cfg = config_from_dict(tiny_config(tmp_path / "run", data={
        "forget": {"path": path, "schema": "trl"}, "max_length": 256}))
    if not isinstance(forget, str):  # Python API: the Dataset itself, read in this process
        cfg.data.forget = dataclasses.replace(cfg.data.forget, path=forget)
    inputs = RunInputs(cfg)
    sampler = BatchSampler(list(range(len(inputs.forget))), cfg.unlearn.batch_size, seed=0)
    return [collate([inputs.forget.items[i] for i in sampler.next_batch()], inputs.pad_id)
            for _ in range(steps)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(g[key], w[key]), key


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_every_format_gives_the_same_training_batches(tmp_path, fmt):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    want = training_batches(tmp_path / "a", negatives_as(FORMATS[0], tmp_path / "a"))
    got = training_batches(tmp_path / "b", negatives_as(fmt, tmp_path / "b"))
    assert_same_batches(got, want)
    assert sum(int((b["labels"] != -100).sum()) for b in want) > 0  # responses carry the loss


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_every_format_renders_the_same_chat_template(tmp_path, fmt):
    """Under SmolLM2's chat template a conversational prompt of one user turn and the
    standard prompt render to the same text, so the encoded items are equal too."""
    tok = build_tiny_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE

    def items(source):
        spec = DataSpec(path=source, schema="trl", field="rejected")
        return [encode(tok, c.prompt, c.response, c.history, 512)
                for c in load_completions(spec)]

    want = items(negatives_as(FORMATS[0], tmp_path))
    assert tok.decode(want[0]["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{ROWS[0][0]}<|im_end|>\n<|im_start|>assistant\n"
        f"{ROWS[0][1]}")
    got = items(negatives_as(fmt, tmp_path))
    assert_same_batches([collate(got, 0)], [collate(want, 0)])


def test_a_plain_prompt_completion_file_reads_as_completions(tmp_path):
    """Issue 24: {prompt, completion} rows under `schema: completions` used to be read as a
    labelled-completions file ("file name must look like MODEL__SETTING_evaluations.json");
    now any file that is not one is read as TRL rows, in every file type."""
    rows = [{"prompt": p, "completion": bad} for p, bad, _ in ROWS]
    want = [(p, bad) for p, bad, _ in ROWS]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    for path in (write_jsonl(tmp_path / "flagged.jsonl", rows), str(tmp_path / "list.json"),
                 write_parquet(tmp_path / "flagged.parquet", rows)):
        got = load_completions(DataSpec(path=path, schema="completions"))
        assert [(c.prompt, c.response) for c in got] == want, path
    cfg = config_from_dict(tiny_config(tmp_path / "run", data={
        "forget": {"path": str(tmp_path / "flagged.jsonl"), "schema": "completions"}}))
    assert len(load_completions(cfg.data.forget)) == len(ROWS)


def test_completions_logs_keep_response_and_their_attributes(tmp_path):
    """`u2a eval`'s generations.jsonl (prompt, response, verdicts) is still a completions log
    whose other fields `filter` selects on."""
    path = write_jsonl(tmp_path / "generations.jsonl", [
        {"kind": "harmful", "id": "g0", "prompt": "a", "response": "x", "harmful": 1},
        {"kind": "harmful", "id": "g1", "prompt": "b", "response": "y", "harmful": 0},
        {"kind": "harmless", "id": "g2", "prompt": "c", "response": "z"}])
    got = load_completions(DataSpec(path=path, schema="completions",
                                    filter={"kind": "harmful", "harmful": 1}))
    assert [(c.id, c.prompt, c.response) for c in got] == [("g0", "a", "x")]
    assert got[0].attrs == {"kind": "harmful", "id": "g0", "harmful": 1}
    assert [p.prompt for p in load_prompts(DataSpec(path=path, schema="completions"))] == \
        ["a", "b", "c"]


def test_labels_give_negatives_to_forget_and_kept_answers_to_retain_and_mismatch(tmp_path):
    path = write_parquet(tmp_path / "kto.parquet", unpaired())
    cfg = config_from_dict(tiny_config(tmp_path / "run", data={
        "forget": {"path": path, "schema": "trl"},
        "retain": {"path": path, "schema": "trl"},
        "mismatch": {"path": path, "schema": "trl"}}, unlearn={"mismatch_weight": 1.0}))
    # The role's side is laid into the spec, so the saved config.yaml states it.
    assert (cfg.data.forget.field, cfg.data.retain.field, cfg.data.mismatch.field) == \
        ("rejected", "chosen", "chosen")
    assert [c.response for c in load_completions(cfg.data.forget)] == [b for _, b, _ in ROWS]
    assert [c.response for c in load_completions(cfg.data.retain)] == [g for _, _, g in ROWS]
    assert all(c.attrs["label"] is False for c in load_completions(cfg.data.forget))
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)
    from u2a_dist.config import load_config

    assert load_config(saved).to_dict() == cfg.to_dict()
    # The mismatch term answers each negative with its own prompt's kept answer.
    from u2a_dist.run_inputs import RunInputs

    inputs = RunInputs(cfg)
    tok = inputs.tokenizer
    for (prompt, _, good), item in zip(ROWS, inputs.forget.mismatch):
        assert item == encode(tok, prompt, good, None, cfg.data.max_length)


def test_labels_as_csv_text_and_integers_and_a_bad_label(tmp_path):
    for i, (yes, no) in enumerate((("True", "False"), ("1", "0"), (1, 0))):
        rows = [{"prompt": "p", "completion": "good", "label": yes},
                {"prompt": "p", "completion": "bad", "label": no}]
        path = write_jsonl(tmp_path / f"l{i}.jsonl", rows)
        bad = load_completions(DataSpec(path=path, schema="trl", field="rejected"))
        assert [c.response for c in bad] == ["bad"]
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c",
                                                 "label": "maybe"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: field 'label' must be true or false"):
        load_completions(DataSpec(path=path, schema="trl", field="rejected"))


def test_a_preference_set_as_completions_without_a_side_is_an_error():
    ds = datasets.Dataset.from_list(unpaired())
    with pytest.raises(DataError, match=r"in-memory Dataset .*need `field: rejected`"):
        load_completions(DataSpec(path=ds, schema="trl"))


def test_unpaired_rows_pair_within_a_prompt_for_j(tmp_path):
    rows = unpaired() + [{"prompt": "Lonely prompt", "completion": "only good", "label": True}]
    pairs = load_pairs(DataSpec(path=write_parquet(tmp_path / "kto.parquet", rows),
                                schema="trl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(p, g, b) for p, b, g in ROWS]
    assert len({p.id for p in pairs}) == len(ROWS)
    cfg = config_from_dict(tiny_config(tmp_path / "run", data={
        "pa": {"path": str(tmp_path / "kto.parquet"), "schema": "trl"}}))
    assert cfg.data.pa.field is None and len(load_pairs(cfg.data.pa)) == len(ROWS)


@pytest.mark.parametrize("rows", [
    [{"prompt": p, "chosen": g, "rejected": b} for p, b, g in ROWS],
    [{"prompt": user(p), "chosen": assistant(g), "rejected": assistant(b)} for p, b, g in ROWS],
    [{"chosen": user(p) + assistant(g), "rejected": user(p) + assistant(b)}
     for p, b, g in ROWS],  # implicit prompt, conversational
    [{"prompt": p, "chosen": user(p) + assistant(g), "rejected": user(p) + assistant(b)}
     for p, b, g in ROWS],  # a text prompt beside conversational sides: TRL extracts it
], ids=["explicit", "explicit-conversational", "implicit-conversational", "mixed"])
def test_preference_rows_explicit_or_implicit_give_the_same_pairs(tmp_path, rows):
    pairs = load_pairs(DataSpec(path=write_jsonl(tmp_path / "p.jsonl", rows), schema="trl"))
    assert [(p.prompt, p.chosen, p.rejected, p.history) for p in pairs] == \
        [(p, g, b, []) for p, b, g in ROWS]


def test_an_implicit_text_prompt_is_the_shared_start():
    ds = datasets.Dataset.from_list([{"chosen": "The sky is blue.",
                                      "rejected": "The sky is green."}])
    (pair,) = load_pairs(DataSpec(path=ds, schema="trl"))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


def test_conversations_keep_earlier_turns_as_history(tmp_path):
    system = [{"role": "system", "content": "Be brief."}]
    turns = system + user("hi") + assistant("hello") + user(ROWS[0][0])
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns + assistant(ROWS[0][1])}])
    (c,) = load_completions(DataSpec(path=path, schema="trl"))
    assert (c.prompt, c.response, c.history) == (ROWS[0][0], ROWS[0][1], turns[:-1])
    # A conversation ending on a user turn is a prompt: it answers nothing to forget.
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    (p,) = load_prompts(DataSpec(path=path, schema="trl"))
    assert (p.prompt, p.history) == (ROWS[0][0], turns[:-1])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: a prompt-only row has no completion"):
        load_completions(DataSpec(path=path, schema="trl"))
    for row, message in [
        ({"prompt": user("q") + assistant("a"), "completion": assistant("b")},
         "conversational prompt must end with a user turn"),
        ({"prompt": user("q"), "completion": assistant("a") + user("more?")},
         "conversational completion must be one assistant turn"),
        ({"messages": assistant("a")}, "an answer but no prompt"),
    ]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [row])
        with pytest.raises(DataError, match=rf"bad\.jsonl:1: .*{message}"):
            load_completions(DataSpec(path=bad, schema="trl", field="rejected"))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_an_unrecognised_file_names_itself_and_the_fields_it_found(tmp_path, suffix):
    rows = [{"question": "What is 2+2?", "reply": "4"}]
    path = (write_jsonl if suffix == "jsonl" else write_parquet)(tmp_path / f"qa.{suffix}",
                                                                 rows)
    with pytest.raises(DataError) as info:
        load_completions(DataSpec(path=path, schema="trl", field="rejected"))
    message = str(info.value)
    assert message.startswith(f"{path}:") and "fields found: ['question', 'reply']" in message
    assert "columns" in message  # and says how to name them


def test_columns_map_field_names(tmp_path):
    rows = [{"question": p, "answer": bad, "good": g} for p, bad, g in ROWS]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = config_from_dict(tiny_config(tmp_path / "run", data={"forget": {
        "path": path, "schema": "trl", "columns": {"prompt": "question", "completion": "answer"}}}))
    got = load_completions(cfg.data.forget)
    assert [(c.prompt, c.response) for c in got] == [(p, b) for p, b, _ in ROWS]
    assert got[0].attrs == {"good": ROWS[0][2]}  # unmapped fields stay attributes
    pairs = load_pairs(DataSpec(path=path, schema="trl",
                                columns={"prompt": "question", "chosen": "good",
                                         "rejected": "answer"}))
    assert [(p.chosen, p.rejected) for p in pairs] == [(g, b) for _, b, g in ROWS]
    # the project's schemas take the map too
    prompts = load_prompts(DataSpec(path=path, schema="prompts", columns={"prompt": "answer"}))
    assert [p.prompt for p in prompts] == [b for _, b, _ in ROWS]
    with pytest.raises(DataError, match=r"qa\.jsonl:1: `columns` takes 'label' from field "
                                        r"'verdict', which the row lacks"):
        load_completions(DataSpec(path=path, schema="trl", columns={"label": "verdict"}))


def test_an_in_memory_dataset_stays_out_of_a_saved_config(tmp_path):
    """A run's ranks read their data from files: a Dataset inside a config dict is refused
    with the way out, while DatasetDict splits follow hub_split in the Python API."""
    raw = tiny_config(tmp_path / "run")
    raw["data"]["forget"] = {"path": datasets.Dataset.from_list(unpaired()), "schema": "trl"}
    with pytest.raises(ConfigError, match=r"not a Dataset: .*ds\.to_parquet"):
        config_from_dict(raw)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(unpaired()),
                               "test": datasets.Dataset.from_list(unpaired()[:2])})
    assert len(load_completions(DataSpec(path=dd, schema="trl", field="rejected"))) == 6
    assert len(load_completions(DataSpec(path=dd, schema="trl", field="rejected",
                                         hub_split="test"))) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_completions(DataSpec(path=dd, schema="trl", field="rejected", hub_split="dev"))


def test_project_schemas_are_unchanged(tmp_path):
    """The named schemas keep their readers (pairs needs its three fields; a labelled
    completions file still reads as one)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing field 'rejected'"):
        load_pairs(DataSpec(path=path, schema="pairs"))
    labelled = tmp_path / "m__harmless_baseline_evaluations.json"
    labelled.write_text(json.dumps({"completions": [{"prompt": "p", "response": "r",
                                                     "category": "c"}]}))
    (c,) = load_completions(DataSpec(path=str(labelled), schema="completions"))
    assert (c.id, c.attrs["source_model"], c.attrs["setting"]) == \
        ("m__harmless_baseline:0", "m", "harmless_baseline")
