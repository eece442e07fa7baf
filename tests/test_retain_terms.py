"""The over-refusal contrast on retain prompts (u2a_dist/retain_terms.py), recomputed by hand
token by token, on two real ranks after a real training step (θ ≠ θ0); θ0's side cached
(unlearn.retain_kl_topk) against the reference model and a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from tests.test_inner_objective import _mean_nll_by_hand
from tests.test_losses import _softmax
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
        _, values, finite = terms.loss(label_logits(theta, batch), batch, [0, 1],
                                       terms.norm([[0, 1]]))
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
        _, values0, _ = whole.loss(label_logits(theta, batch), batch, [0, 1], whole.norm([[0, 1]]))
    assert abs(values0["loss/retain_refusal"] - values["loss/retain_refusal"]) > 1e-4


def test_the_coarse_kl_by_hand_never_exceeds_the_exact_one_and_equals_it_at_k_v() -> None:
    from u2a_dist.retain_terms import coarse_kl_sum

    torch.manual_seed(3)
    logits, ref = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    exact = coarse = 0.0
    for row in range(2):
        p0, q = _softmax(ref[row].tolist()), _softmax(logits[row].tolist())
        exact += sum(a * math.log(a / b) for a, b in zip(p0, q))
        top = sorted(range(6), key=lambda v: -p0[v])[:2]
        t0, tq = 1 - sum(p0[v] for v in top), 1 - sum(q[v] for v in top)
        coarse += sum(p0[v] * math.log(p0[v] / q[v]) for v in top) + t0 * math.log(t0 / tq)
    for k, want in ((2, coarse), (6, exact)):
        logp0 = torch.log_softmax(ref, -1)
        top, ids = logp0.topk(k, dim=-1)
        tail = logp0.scatter(1, ids, float("-inf")).logsumexp(-1)
        assert float(coarse_kl_sum(logits, top, ids, tail)) == pytest.approx(want, rel=1e-6)
    assert coarse < exact


@pytest.mark.parametrize("packed", [True, False])
def test_cached_reference_values_give_the_reference_models_terms(packed) -> None:
    """retain_kl_topk = V: the cached terms equal the reference model's, values and gradient,
    for examples drawn out of order; k = 5: the contrast unchanged, the KL below the exact."""
    from types import SimpleNamespace

    from u2a_dist.data.tokenize import rows_batch
    from u2a_dist.losses import label_logits
    from u2a_dist.retain_terms import RetainTerms

    theta = build_tiny_model(1)
    retain = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [IGNORE] * 3 + [8, 9, 10, 11]},
              {"input_ids": [1, 2, 3, 4, 12, 13], "labels": [IGNORE] * 2 + [3, 4, 12, 13]},
              {"input_ids": [7, 3, 20, 21, 22], "labels": [IGNORE] * 2 + [20, 21, 22]}]
    refusals = refusal_items(retain, [[40, 41, 42, 43, 44], [50, 51]], max_length=64)
    idx = [2, 0]

    def terms_and_grad(topk: int):
        cfg = SimpleNamespace(retain_kl_weight=1.0, retain_refusal_weight=1.0,
                              retain_refusal_beta=2.0, retain_refusal_tokens=3,
                              retain_kl_topk=topk)
        terms = RetainTerms(cfg, build_tiny_model(0).eval(), retain, refusals, world_size=1)
        assert terms.cache_reference(0, packed, torch.device("cpu"), 2) == (topk > 0)
        assert (terms.reference is None) == (topk > 0)
        batch = rows_batch(terms.items(idx), 0, packed)
        theta.zero_grad()
        loss, values, finite = terms.loss(label_logits(theta, batch), batch, idx,
                                          terms.norm([idx]))
        loss.backward()
        assert finite
        return values, [p.grad.clone() for p in theta.parameters()]

    exact, grad = terms_and_grad(0)
    cached, cached_grad = terms_and_grad(384)
    assert cached == pytest.approx(exact, rel=1e-5, abs=1e-7)
    for a, b in zip(cached_grad, grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    few, _ = terms_and_grad(5)
    assert few["loss/retain_refusal"] == pytest.approx(exact["loss/retain_refusal"], rel=1e-5)
    assert 0 < few["loss/retain_kl"] < exact["loss/retain_kl"]


def test_cached_reference_steps_equal_the_reference_models_on_two_zero3_ranks(tmp_path) -> None:
    """A trainer with unlearn.retain_kl_topk = V frees the reference model and takes the same
    steps (2 real ranks, ZeRO-3, every retain term on, 2 passes a step)."""
    def cfg(name: str, topk: int) -> dict:
        out = _retain_cfg(tmp_path / name, retain_batch_size=4, optimizer="sgd", lr=0.5,
                          retain_refusal_tokens=3, retain_kl_topk=topk)
        out["runtime"]["micro_batches"] = 2
        return out
    ref = run_ranks(2, "tests.rank_fns:steps_and_state", {"cfg": cfg("exact", 0), "steps": 2})
    got = run_ranks(2, "tests.rank_fns:steps_and_state", {"cfg": cfg("topk", 384), "steps": 2})
    assert [r["reference_freed"] for r in got] == [True, True] and not ref[0]["reference_freed"]
    for a, b in zip(got[0]["metrics"], ref[0]["metrics"]):
        for key in ("loss", "grad_norm", "loss/retain_kl", "loss/retain_refusal"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert ref[0]["metrics"][1]["loss/retain_kl"] > 0
    for key, value in ref[0]["state"].items():
        torch.testing.assert_close(got[0]["state"][key], value, rtol=1e-4, atol=1e-6)
