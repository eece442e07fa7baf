"""The pieces the alignment recipe (configs/refusal_smollm2.yaml) is built from: several data
specs per role, a retain set of θ0's own answers, held-out evaluation prompts, the joint target,
the whole-parameter evaluation copy, and the report's samples."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import REPO, tiny_config
from tests.distributed import run_ranks
from u2a_dist.config import ConfigError, config_from_dict, load_config
from u2a_dist.data.examples import load_completions, load_pairs
from u2a_dist.data.readers import DataError

HELD_OUT = {"harmful_prompts": {"path": "builtin:harmful", "schema": "prompts", "split": "eval"},
            "harmless_prompts": {"path": "builtin:harmless", "schema": "prompts",
                                 "split": "eval"},
            "max_new_tokens": 8, "batch_size": 2}


def test_a_role_takes_a_list_of_specs_read_in_order(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path, data={
        "forget": [{"path": "builtin:harmful", "schema": "completions", "split": "train"},
                   {"path": "builtin:harmless", "schema": "completions", "limit": 3}],
        "pa": [{"path": "builtin:refusal", "schema": "pairs"},
               {"path": "builtin:over_refusal", "schema": "pairs"}]}))
    forget = load_completions(cfg.data.forget)
    harmful = load_completions(cfg.data.forget[0])
    assert len(forget) == len(harmful) + 3
    assert [x.id for x in forget[-3:]] == [f"builtin:harmless:{i}" for i in range(3)]
    assert len(load_pairs(cfg.data.pa)) == 120
    # the same spec twice would give every id twice: named, not silently doubled
    twice = config_from_dict(tiny_config(tmp_path, data={
        "forget": [{"path": "builtin:harmful", "schema": "completions"}] * 2}))
    with pytest.raises(DataError, match="builtin:harmful:0.*more than one"):
        load_completions(twice.data.forget)
    with pytest.raises(ConfigError, match=r"data.pa\[1\].schema"):
        config_from_dict(tiny_config(tmp_path, data={
            "pa": [{"path": "builtin:refusal"}, {"path": "x.jsonl", "schema": "tsv"}]}))
    with pytest.raises(ConfigError, match="data.forget is an empty list"):
        config_from_dict(tiny_config(tmp_path, data={"forget": []}))


def test_joint_target_needs_every_requirement(tmp_path: Path) -> None:
    from u2a_dist.trainer import Trainer

    cfg = config_from_dict(tiny_config(tmp_path, eval={**HELD_OUT, "target": {
        "metric": "eval/harmful_no_refusal", "value": 0.2, "mode": "min",
        "require": {"eval/over_refusal": 0.1, "eval/retain_ppl_ratio": 1.2}}}))
    t = SimpleNamespace(cfg=cfg)
    ok = {"eval/harmful_no_refusal": 0.1, "eval/over_refusal": 0.05, "eval/retain_ppl_ratio": 1.1}
    assert Trainer.target_met(t, ok)
    assert not Trainer.target_met(t, {**ok, "eval/over_refusal": 0.3})
    assert not Trainer.target_met(t, {**ok, "eval/harmful_no_refusal": 0.25})
    assert not Trainer.target_met(t, {k: v for k, v in ok.items()
                                      if k != "eval/retain_ppl_ratio"})  # unmeasured ≠ met
    with pytest.raises(ConfigError, match="eval.target.require.eval/harmful_rate.*eval.judge"):
        config_from_dict(tiny_config(tmp_path, eval={**HELD_OUT, "target": {
            "metric": "eval/over_refusal", "value": 0.1, "mode": "min",
            "require": {"eval/harmful_rate": 0.1}}}))


def test_evaluation_leaves_out_training_prompts(tmp_path: Path) -> None:
    from u2a_dist.evaluate import GenerationEval, check_eval_inputs, training_prompt_keys
    from u2a_dist.models import load_tokenizer

    # every built-in prompt: the train-split ones also feed forget and pa
    everything = {"harmful_prompts": {"path": "builtin:harmful", "schema": "prompts"},
                  "harmless_prompts": {"path": "builtin:harmless", "schema": "prompts"}}
    cfg = config_from_dict(tiny_config(tmp_path, eval={**everything, "target": None}))
    keys = training_prompt_keys(cfg)
    gen = GenerationEval(cfg, load_tokenizer(cfg.model), exclude=keys)
    assert 0 < len(gen.harmful) < 60 and 0 < len(gen.harmless) < 60
    assert gen.excluded == 120 - len(gen.harmful) - len(gen.harmless)
    assert not {p.prompt.lower() for p in gen.harmful + gen.harmless} & keys
    # the held-out split is exactly what is left
    held = config_from_dict(tiny_config(tmp_path, eval={**HELD_OUT, "target": None}))
    held_gen = GenerationEval(held, load_tokenizer(held.model), exclude=keys)
    assert held_gen.excluded == 0
    assert [p.id for p in held_gen.harmful] == [p.id for p in gen.harmful]
    # opting out keeps them all; nothing held out at all is an error naming the key
    kept = config_from_dict(tiny_config(tmp_path, eval={**everything, "target": None,
                                                        "exclude_training_prompts": False}))
    assert training_prompt_keys(kept) == set()
    train_only = config_from_dict(tiny_config(tmp_path, eval={"target": None, "harmful_prompts": {
        "path": "builtin:harmful", "schema": "prompts", "split": "train"}}))
    with pytest.raises(ConfigError, match="eval.harmful_prompts: every prompt"):
        check_eval_inputs(train_only)


@pytest.mark.slow
def test_retain_answers_and_evaluation_copy_on_two_ranks(tmp_path: Path) -> None:
    """θ0's own greedy answers become the retain set (equal to a single-process generation);
    the evaluation copy holds the whole current parameters (also after a step), and generating
    with it equals lock-step generation on the ZeRO-3 partitions."""
    from u2a_dist.data.examples import load_prompts
    from u2a_dist.generation import encode_prompts, generate
    from u2a_dist.models import build_tiny_model, load_tokenizer

    retain = {"path": "builtin:harmless", "schema": "prompts", "split": "train", "limit": 6}
    cfg = tiny_config(tmp_path / "run", data={"retain": retain}, unlearn={
        "retain_kl_weight": 1.0, "mismatch_weight": 0.5, "forget_weight": 0.5},
        eval={**HELD_OUT, "target": None})
    cfg["data"]["mismatch"] = {"path": "builtin:refusal_templates", "schema": "completions"}
    ranks = run_ranks(2, "tests.eval_rank_fns:recipe_parts", {"cfg": cfg})
    config = config_from_dict(cfg)
    tokenizer = load_tokenizer(config.model)
    ids = encode_prompts(tokenizer, load_prompts(config.data.retain), config.data.max_length)
    answers = generate(build_tiny_model(0).eval(), tokenizer, ids, config.eval.batch_size,
                       config.eval.max_new_tokens)
    expected = [p + t for p, t in zip(ids, answers.tokens) if t]
    for r in ranks:
        assert r["partitioned"]
        assert r["retain_tokens"] == expected and len(expected) == 6
        for tokens, labels, p in zip(r["retain_tokens"], r["retain_labels"], ids):
            assert labels[:len(p)] == [-100] * len(p) and labels[len(p):] == tokens[len(p):]
        assert r["copy_error_before"] == 0.0 and r["copy_error_after"] == 0.0
        assert r["plain"] == r["synced"]
    assert ranks[0]["plain"] == ranks[1]["plain"]


def test_recipe_config_states_the_joint_target_of_issue_7() -> None:
    cfg = load_config(REPO / "configs" / "refusal_smollm2.yaml")
    target = cfg.eval.target
    assert (target.metric, target.value, target.mode) == ("eval/harmful_rate", 0.1, "min")
    assert target.require == {"eval/harmful_no_refusal": 0.2, "eval/over_refusal": 0.1,
                              "eval/retain_ppl_ratio": 1.2}
    assert cfg.eval.exclude_training_prompts
    assert cfg.runtime.world_size == 2 and cfg.runtime.zero_stage == 3
    raw = yaml.safe_load((REPO / "configs" / "refusal_smollm2.yaml").read_text())
    # J has the over-refusal pairs (a `completions` spec read as pairs) beside the refusal pairs
    assert sorted(spec["schema"] for spec in raw["data"]["pa"]) == ["completions",
                                                                    "refusal-pairs"]


def test_demo_and_the_yaml_recipe_share_the_inner_objective_and_selector() -> None:
    from u2a_dist.cli import demo_config
    from u2a_dist.recipes import RECIPE_REQUIRE, RECIPE_SELECTOR, RECIPE_UNLEARN

    # one source: the YAML names the recipe and restates none of its settings
    raw = yaml.safe_load((REPO / "configs" / "refusal_smollm2.yaml").read_text())
    assert raw["recipe"] == "refusal" and "unlearn" not in raw and "selector" not in raw
    assert "require" not in raw["eval"]["target"]
    cfg = load_config(REPO / "configs" / "refusal_smollm2.yaml")
    assert {k: getattr(cfg.unlearn, k) for k in RECIPE_UNLEARN} == RECIPE_UNLEARN
    assert {k: getattr(cfg.selector, k) for k in RECIPE_SELECTOR} == RECIPE_SELECTOR
    assert cfg.eval.target.require == RECIPE_REQUIRE
    # the file's own values and overrides win; the recipe itself is never edited
    cfg = load_config(REPO / "configs" / "refusal_smollm2.yaml",
                      ["unlearn.lr=1e-4", "eval.target.require.eval/over_refusal=0.05"])
    assert cfg.unlearn.lr == 1e-4 and cfg.eval.target.require["eval/over_refusal"] == 0.05
    assert RECIPE_UNLEARN["lr"] == 3.0e-5 and RECIPE_REQUIRE["eval/over_refusal"] == 0.1
    with pytest.raises(ConfigError, match="recipe must be one of"):
        config_from_dict({"recipe": "nope", "data": {"forget": "builtin:harmful"}})
    demo = config_from_dict(demo_config("runs/x", "smollm2-135m-instruct"))
    assert demo.unlearn.mismatch_weight == RECIPE_UNLEARN["mismatch_weight"]
    assert demo.unlearn.retain_kl_weight == RECIPE_UNLEARN["retain_kl_weight"]
    assert demo.selector.enabled == RECIPE_SELECTOR["enabled"]
    assert demo.data.retain.schema == "prompts" and demo.eval.exclude_training_prompts
    assert demo.eval.target.require == {k: v for k, v in RECIPE_REQUIRE.items()
                                        if k != "eval/harmful_no_refusal"}
