"""The over-refusal contrast on retain prompts (u2a_dist/retain_terms.py), recomputed by hand
token by token, on two real ranks after a real training step (θ ≠ θ0)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from tests.test_inner_objective import _mean_nll_by_hand
from u2a_dist.config import ConfigError, config_from_dict
from u2a_dist.data.tokenize import IGNORE, with_response
from u2a_dist.models import build_tiny_model
from u2a_dist.retain_terms import refusal_items


def _retain_cfg(tmp_path, **unlearn) -> dict:
    return tiny_config(
        tmp_path / "run",
        unlearn={"retain_kl_weight": 1.0, "retain_refusal_weight": 0.5,
                 "retain_refusal_beta": 3.0, "lr": 5e-3, **unlearn},
        data={"forget": {"path": "builtin:harmful", "schema": "completions", "split": "train"},
              "mismatch": {"path": "builtin:refusal_templates", "schema": "completions"},
              "retain": {"path": "builtin:harmless", "schema": "prompts", "split": "train",
                         "limit": 8},
              "max_length": 512},  # no truncation: the hand computation sees whole items
        eval={"every": 0, "target": None, "batch_size": 8, "max_new_tokens": 6})


def test_contrast_on_two_ranks_matches_a_hand_computation(tmp_path) -> None:
    beta, idx = 3.0, [0, 1, 2, 5]
    # a retain batch (6) larger than the forget batch (4): the step draws 6 retain prompts
    outs = run_ranks(2, "tests.rank_fns:retain_contrast",
                     {"cfg": _retain_cfg(tmp_path, retain_batch_size=6), "idx": idx})
    out = outs[0]
    assert outs[1]["values"] == out["values"] and out["finite"]
    before, after = out["retain_drawn"]
    assert (before["epoch"], before["cursor"], after["epoch"], after["cursor"]) == (0, 0, 0, 6)
    theta, theta0 = build_tiny_model(0), build_tiny_model(0)
    theta.load_state_dict(out["state"])
    theta.eval(), theta0.eval()
    by_hand = []
    for y, r in zip(out["retain"], out["refusals"]):
        n_prompt = y["labels"].count(IGNORE)
        # the refusal row: the retain prompt itself, then a different (refusal) response
        assert r["input_ids"][:n_prompt] == y["input_ids"][:n_prompt]
        assert r["input_ids"][n_prompt:] != y["input_ids"][n_prompt:]
        d_y = _mean_nll_by_hand(theta0, y) - _mean_nll_by_hand(theta, y)
        d_r = _mean_nll_by_hand(theta0, r) - _mean_nll_by_hand(theta, r)
        by_hand.append((2 / beta) * math.log1p(math.exp(beta * (d_r - d_y))))
    expected = sum(by_hand) / len(by_hand)
    assert abs(expected - (2 / beta) * math.log(2)) > 1e-4  # θ moved: not the θ0 constant
    assert out["values"]["loss/retain_refusal"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert "loss/retain_refusal" in out["step"] and "loss/retain_kl" in out["step"]


def test_refusal_rows_keep_the_prompt_and_truncate_like_encode() -> None:
    retain = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, IGNORE, 8, 9]},
              {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}]
    rows = refusal_items(retain, [[40, 41], [50, 51, 52, 53]], max_length=6)
    assert rows[0] == {"input_ids": [5, 6, 7, 40, 41], "labels": [IGNORE] * 3 + [40, 41]}
    # the second refusal: 1 + 4 tokens fit in 6; each row takes refusals[j mod 2]
    assert rows[1] == with_response([1], [50, 51, 52, 53], 6)
    # too long: the response keeps half the budget, the prompt is cut from the left
    assert with_response([1, 2, 3, 4], [9] * 6, 6) == {
        "input_ids": [2, 3, 4, 9, 9, 9], "labels": [IGNORE] * 3 + [9] * 3}


def test_the_contrast_needs_retain_prompts_and_refusals(tmp_path) -> None:
    cfg = _retain_cfg(tmp_path)
    del cfg["data"]["mismatch"]
    with pytest.raises(ConfigError, match="> 0 needs data.refusals or data.mismatch"):
        config_from_dict(cfg)
    cfg = _retain_cfg(tmp_path, retain_kl_weight=0.0)
    del cfg["data"]["retain"]
    with pytest.raises(ConfigError, match="retain_refusal_weight > 0 needs data.retain"):
        config_from_dict(cfg)


def test_the_retain_batch_is_split_evenly_over_the_ranks(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unlearn.retain_batch_size=3 must be divisible by "
                                          "runtime.world_size=2"):
        config_from_dict(_retain_cfg(tmp_path, retain_batch_size=3))
    assert config_from_dict(_retain_cfg(tmp_path)).unlearn.retain_batch_size == 0  # = forget's


def test_data_refusals_replace_the_prompt_less_mismatch_answers(tmp_path) -> None:
    """data.refusals: the contrast's refusals are those responses (their prompts ignored), e.g.
    the model's own refusals from a red-team log, in place of the mismatch templates."""
    from u2a_dist.data.examples import load_completions
    from u2a_dist.run_inputs import RunInputs

    cfg = _retain_cfg(tmp_path)
    del cfg["data"]["mismatch"]  # the contrast needs refusals from one or the other
    cfg["data"]["refusals"] = {"path": "builtin:refusals", "schema": "completions", "limit": 3}
    config = config_from_dict(cfg)
    inputs = RunInputs(config)
    responses = [c.response for c in load_completions(config.data.refusals)]
    assert len(responses) == 3 and all(c.prompt for c in load_completions(config.data.refusals))
    eos = inputs.tokenizer.eos_token_id
    assert [inputs.tokenizer.decode(r[:-1]) for r in inputs.refusals] == responses
    assert all(r[-1] == eos for r in inputs.refusals)
    items = [{"input_ids": [5, 6, 7], "labels": [IGNORE, IGNORE, 7]}] * 4
    rows = inputs.retain_refusals(items)
    assert [row["input_ids"][2:] for row in rows] == [inputs.refusals[j % 3] for j in range(4)]


@pytest.mark.parametrize("packed", [True, False])
def test_onset_contrast_compares_the_first_k_tokens_by_hand(packed) -> None:
    """unlearn.retain_refusal_tokens = k: the contrast on the answers' and refusals' first k
    response tokens (a packed and a padded batch), recomputed token by token; the KL still
    sees whole answers."""
    from types import SimpleNamespace

    from u2a_dist.data.tokenize import rows_batch
    from u2a_dist.losses import label_logits
    from u2a_dist.retain_terms import RetainTerms, onset

    k, beta = 3, 2.0
    theta0, theta = build_tiny_model(0).eval(), build_tiny_model(1).eval()
    retain = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [IGNORE] * 3 + [8, 9, 10, 11]},
              {"input_ids": [1, 2, 3, 4, 12, 13], "labels": [IGNORE] * 2 + [3, 4, 12, 13]}]
    refusals = refusal_items(retain, [[40, 41, 42, 43, 44], [50, 51]], max_length=64)
    cfg = SimpleNamespace(retain_kl_weight=0.0, retain_refusal_weight=1.0,
                          retain_refusal_beta=beta, retain_refusal_tokens=k)
    terms = RetainTerms(cfg, theta0, retain, refusals, world_size=1)
    rows = terms.items([0, 1])
    assert rows[:2] == retain and rows[2:4] == [onset(r, k) for r in refusals]
    assert rows[4:] == [onset(y, k) for y in retain]
    assert rows[2]["labels"][-k:] == [40, 41, 42] and rows[3]["labels"][-2:] == [50, 51]
    assert rows[4]["input_ids"] == [5, 6, 7, 8, 9, 10]
    batch = rows_batch(rows, 0, packed)
    with torch.no_grad():
        _, values, finite = terms.loss(label_logits(theta, batch), batch, 2, terms.norm([[0, 1]]))
    by_hand = []
    for y, r in zip(rows[4:], rows[2:4]):
        d_y = _mean_nll_by_hand(theta0, y) - _mean_nll_by_hand(theta, y)
        d_r = _mean_nll_by_hand(theta0, r) - _mean_nll_by_hand(theta, r)
        by_hand.append((2 / beta) * math.log1p(math.exp(beta * (d_r - d_y))))
    assert finite
    assert values["loss/retain_refusal"] == pytest.approx(sum(by_hand) / 2, rel=1e-5, abs=1e-6)
    whole = RetainTerms(SimpleNamespace(**{**vars(cfg), "retain_refusal_tokens": 0}), theta0,
                        retain, refusals, world_size=1)
    batch = rows_batch(whole.items([0, 1]), 0, packed)
    with torch.no_grad():
        _, values0, _ = whole.loss(label_logits(theta, batch), batch, 2, whole.norm([[0, 1]]))
    assert abs(values0["loss/retain_refusal"] - values["loss/retain_refusal"]) > 1e-4
