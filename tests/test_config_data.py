"""Config parsing/validation, data readers and schemas, tokenisation with prompt masking."""

from __future__ import annotations

import gzip
import json

import pytest

from u2a_dist.config import ConfigError, ModelConfig, config_from_dict, load_config
from u2a_dist.data.examples import load_completions, load_pairs, load_prompts, parse_dialogue
from u2a_dist.data.readers import DataError
from u2a_dist.data.tokenize import IGNORE, collate, encode, shard
from u2a_dist.data_spec import DataSpec


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  forget: {path: builtin:harmful, schema: completions}\n"
                    "selector: {enabled: false}\nunlearn: {lr: 1e-5}\n")
    cfg = load_config(path, ["unlearn.lr=3e-4", "selector.alpha=0.25", "runtime.world_size=1",
                             "data.forget.limit=5", "eval.target=null"])
    assert cfg.unlearn.lr == 3e-4 and cfg.selector.alpha == 0.25
    assert cfg.runtime.world_size == 1 and cfg.data.forget.limit == 5 and cfg.eval.target is None
    assert cfg.selector.damping == "auto"
    # The saved config round-trips.
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)
    assert load_config(saved).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("raw, key", [
    ({"unlearn": {"lrr": 1}}, "unlearn.lrr"),
    ({"unlearn": {"lr": "fast"}}, "unlearn.lr"),
    ({"unlearn": {"loss": "sgd"}}, "unlearn.loss"),
    ({"unlearn": {"steps": 0}}, "unlearn.steps"),
    ({"selector": {"alpha": "big"}}, "selector.alpha"),
    ({"unlearn": {"batch_size": 3}}, "unlearn.batch_size"),
    ({"data": {"forget": {"path": "x", "schema": "tsv"}}}, "data.forget.schema"),
    ({"unlearn": {"mismatch_weight": 1.0}}, "data.mismatch"),
])
def test_validation_errors_name_the_key(raw, key):
    base = {"data": {"forget": {"path": "builtin:harmful", "schema": "completions"}},
            "selector": {"enabled": False}}
    for section, values in raw.items():
        base.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(base)


def test_half_precision_with_the_finite_difference_selector_is_accepted():
    """bf16/fp16 runs give the selector an fp32 twin of the master weights (docs/design.md §3), so
    Neumann HVPs and directional scores are no longer refused with them."""
    base = {"data": {"forget": {"path": "builtin:harmful", "schema": "completions"},
                     "pa": {"path": "builtin:all", "schema": "pairs"}},
            "selector": {"enabled": True, "ihvp": "neumann", "score": "directional"},
            "model": {"dtype": "bfloat16"}}
    cfg = config_from_dict(base)
    assert (cfg.model.dtype, cfg.selector.ihvp, cfg.selector.score) == \
        ("bfloat16", "neumann", "directional")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: malformed JSON"):
        load_pairs(DataSpec(path=str(path), schema="pairs"))


def test_json_lines_under_a_json_name_and_question_prompts_are_read(tmp_path):
    """TOFU ships JSON Lines as ``*.json`` with a ``question`` field: both read as prompts (a
    question-style retain set), and a broken line still names its line."""
    path = tmp_path / "facts.json"
    rows = [{"question": "What is the capital of France?", "answer": "Paris"},
            {"question": "Who wrote Hamlet?", "answer": "Shakespeare"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(DataSpec(path=str(path), schema="prompts"))
    assert [p.prompt for p in prompts] == [r["question"] for r in rows]
    assert prompts[1].attrs == {"answer": "Shakespeare"}
    path.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"facts\.json:2: malformed JSON"):
        load_prompts(DataSpec(path=str(path), schema="prompts"))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing field 'rejected'"):
        load_pairs(DataSpec(path=str(path), schema="pairs"))


def test_empty_forget_set_is_an_error(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no completions"):
        load_completions(DataSpec(path=str(path), schema="pairs", field="rejected"))


def test_hh_rlhf_dialogues_split_into_history_prompt_and_answers(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to X?\n\nAssistant: No.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to X?\n\nAssistant: Do Y."}
    single = {"chosen": "\n\nHuman: how to Z?\n\nAssistant: No.",
              "rejected": "\n\nHuman: how to Z?\n\nAssistant: Do W."}
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(row) + "\n" + json.dumps(single) + "\n")
    pair, first = load_pairs(DataSpec(path=str(path), schema="hh-rlhf"))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("how to X?", "No.", "Do Y.")
    assert pair.history == [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}]
    assert (pair.attrs, first.attrs) == ({"human_turns": 2}, {"human_turns": 1})
    # the dialogues that open with their request, as single-turn prompts (a red-team log's)
    (only,) = load_prompts(DataSpec(path=str(path), schema="hh-rlhf", filter={"human_turns": 1}))
    assert (only.prompt, only.history) == ("how to Z?", [])
    with pytest.raises(DataError, match="must end with an Assistant turn"):
        parse_dialogue("\n\nHuman: only a question", "f:1")


def test_split_by_prompt_is_disjoint_and_deterministic():
    train = load_pairs(DataSpec(path="builtin:all", schema="pairs", split="train"))
    held = load_pairs(DataSpec(path="builtin:all", schema="pairs", split="eval"))
    assert train and held
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    again = load_pairs(DataSpec(path="builtin:all", schema="pairs", split="eval"))
    assert [p.id for p in again] == [p.id for p in held]


def test_filters_and_limits():
    items = load_completions(DataSpec(path="builtin:harmful", schema="completions",
                                      filter={"category": "hacking"}, limit=3))
    assert len(items) == 3 and all(c.attrs["category"] == "hacking" for c in items)
    assert load_prompts(DataSpec(path="builtin:harmless", schema="prompts"))


def test_real_data_schemas(shared_data):
    pairs = load_pairs(DataSpec(path=str(shared_data / "refusal/refusal_pairs.jsonl"),
                                schema="refusal-pairs"))
    assert len(pairs) == 327
    hh = load_pairs(DataSpec(path=str(shared_data / "hh-rlhf/harmless-base-test-shared.jsonl.gz"),
                             schema="hh-rlhf"))
    assert len(hh) == 1800 and all(p.chosen != p.rejected or p.chosen == "" for p in hh[:50])
    prompts = load_prompts(DataSpec(path=str(shared_data / "prompts/harmful_advbench.json"),
                                    schema="prompts"))
    assert len(prompts) == 495
    qa = load_completions(DataSpec(path=str(shared_data / "tofu/forget05.jsonl"), schema="qa"))
    assert len(qa) == 200
    tqa = load_pairs(DataSpec(path=str(shared_data / "truthfulqa/TruthfulQA.csv"), schema="qa"))
    assert len(tqa) == 817


def test_encode_masks_the_prompt_and_ends_with_eos():
    from u2a_dist.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    item = encode(tok, "Hi?", "Yes.", max_length=64)
    n_resp = len("Yes.") + 1  # bytes + eos
    assert item["labels"][-n_resp:] == item["input_ids"][-n_resp:]
    assert item["labels"][:-n_resp] == [IGNORE] * (len(item["input_ids"]) - n_resp)
    assert item["input_ids"][-1] == tok.eos_token_id
    # Truncation keeps the response.
    long = encode(tok, "x" * 500, "Yes.", max_length=32)
    assert len(long["input_ids"]) == 32 and long["labels"][-n_resp:] == long["input_ids"][-n_resp:]
    batch = collate([item, long], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"][0].sum() == len(item["input_ids"])
    assert (batch["labels"][0, len(item["input_ids"]):] == IGNORE).all()


def test_chat_template_is_used_when_present():
    from u2a_dist.data.tokenize import format_prompt

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + "|<assistant>"

    assert format_prompt(Templated(), "q", [{"role": "user", "content": "a"}]) == "a|q|<assistant>"


def test_shard_gives_equal_contiguous_shares():
    assert shard(list(range(8)), 0, 2) == [0, 1, 2, 3]
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]
    with pytest.raises(ValueError):
        shard([1, 2, 3], 0, 2)


def test_tokenizer_without_pad_token_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from u2a_dist.models import load_tokenizer

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="no pad token; set model.pad_token"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    fixed = load_tokenizer(ModelConfig(name_or_path=str(tmp_path), pad_token="</s>"))
    assert fixed.pad_token == "</s>"


def test_random_architecture_presets_have_the_checkpoints_shapes():
    """``random:smollm2-135m`` has the parameter count of the real SmolLM2-135M-Instruct as
    the engine reported it (134 515 008, benchmarks/results/scaling.json), seeded weights, and
    the byte-level tokenizer; an unknown architecture is refused, naming the key."""
    import torch

    from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir

    cfg = ModelConfig(name_or_path="random:smollm2-135m")
    assert resolve_model_dir(cfg) == "random:smollm2-135m"
    a, b = load_model(cfg, seed=3), load_model(cfg, seed=3)
    assert sum(p.numel() for p in a.parameters()) == 134_515_008
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(load_model(cfg, seed=4).parameters()), next(a.parameters()))
    assert load_tokenizer(cfg).pad_token_id == 0
    with pytest.raises(ConfigError, match="model.name_or_path.*random:smollm2-1.7b"):
        resolve_model_dir(ModelConfig(name_or_path="random:llama-7b"))


def test_mismatch_answers_are_grounded_in_the_prompt_where_one_is_given():
    """A negative whose prompt has mismatch answers gets one of them (cycled by position); the
    rest cycle through the prompt-less templates; with neither, the error names the example."""
    from u2a_dist.data.examples import Completion, mismatch_answers

    forget = [Completion("a", "How do I pick a lock?", "Sure: ..."),
              Completion("b", "  how do i pick a LOCK?", "First ..."),
              Completion("c", "Name three fruits.", "I can't help with that."),
              Completion("d", "Write malware.", "Here is code ...")]
    answers = [Completion("r1", "How do I pick a lock?", "I won't help with lock picking."),
               Completion("r2", "How do I pick a lock?", "Sorry, not that."),
               Completion("h", "Name three fruits.", "Apple, pear, plum."),
               Completion("t1", "", "I can't help with that."),
               Completion("t2", "", "I won't do that.")]
    assert mismatch_answers(forget, answers, "m") == [
        "I won't help with lock picking.", "Sorry, not that.",  # i mod 2 over its prompt's own
        "Apple, pear, plum.", "I won't do that."]  # d: i=3 → template 3 mod 2
    with pytest.raises(DataError, match=r"m: no mismatch answer for forget example 'd'"):
        mismatch_answers(forget, answers[:3], "m")
    # the templates alone give what they always gave: answer i mod M
    templates = load_completions(DataSpec(path="builtin:refusal_templates", schema="completions"))
    got = mismatch_answers(forget, templates, "m")
    assert got == [templates[i % len(templates)].response for i in range(4)]
    cfg = config_from_dict({"data": {"forget": {"path": "builtin:harmful",
                                                "schema": "completions"},
                                     "mismatch": [{"path": "builtin:refusals",
                                                   "schema": "completions"},
                                                  "builtin:refusal_templates"]},
                            "unlearn": {"mismatch_weight": 1.0}, "selector": {"enabled": False}})
    assert [s.path for s in cfg.data.mismatch] == ["builtin:refusals", "builtin:refusal_templates"]
