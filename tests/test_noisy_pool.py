"""Noisy pools (issue 22): ground-truth labels that only reports read, near-duplicates, and how a
selection's scores separate the labels (ROC AUC, support counts)."""

from __future__ import annotations

import difflib
import itertools

import pytest

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from u2a_dist.cli import label_line
from u2a_dist.config import ConfigError, config_from_dict
from u2a_dist.data.examples import load_completions
from u2a_dist.data_spec import DataSpec
from u2a_dist.selection_labels import label_stats, weight_shares

POOL = [DataSpec(path="builtin:harmful", schema="completions", split="train", limit=10,
                 label="harmful", near_duplicates=3),
        DataSpec(path="builtin:harmless", schema="completions", limit=6, label="benign")]


def test_near_duplicates_are_seeded_small_edits_that_keep_the_label():
    pool = load_completions(POOL)
    assert len(pool) == 10 + 3 + 6
    assert [x.id for x in pool] == [x.id for x in load_completions(POOL)]  # the same every time
    assert [x.prompt for x in pool] == [x.prompt for x in load_completions(POOL)]
    by_id = {x.id: x for x in pool}
    copies = [x for x in pool if "~dup" in x.id]
    assert [x.id.partition("~")[2] for x in copies] == ["dup0", "dup1", "dup2"]
    for copy in copies:
        source = by_id[copy.attrs["near_duplicate_of"]]
        assert copy.id.startswith(source.id + "~")
        for text in ("prompt", "response"):
            a, b = getattr(source, text), getattr(copy, text)
            assert a != b and difflib.SequenceMatcher(None, a, b).ratio() > 0.8, (a, b)
        assert copy.attrs["label"] == "harmful"
    assert [x.attrs["label"] for x in pool].count("benign") == 6
    # without the options the rows are the file's own, unlabelled
    plain = load_completions(DataSpec(path="builtin:harmful", schema="completions",
                                      split="train", limit=10))
    assert [(x.prompt, x.response) for x in plain] == [(x.prompt, x.response) for x in pool[:10]]
    assert all("label" not in x.attrs for x in plain)


def test_a_negative_near_duplicates_is_named():
    raw = tiny_config("unused", data={"forget": {"path": "builtin:harmful",
                                                 "schema": "completions", "near_duplicates": -1}})
    with pytest.raises(ConfigError, match=r"data\.forget\.near_duplicates must be >= 0"):
        config_from_dict(raw)


def _hand_auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties one half: every pair counted."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_label_stats_against_a_hand_count():
    scores = [3.0, 1.0, 2.0, 2.0, -1.0, 0.5]
    labels = ["harmful", "benign", "harmful", "benign", None, "harmful"]
    stats = label_stats(scores, labels, selected=[0, 2, 3])
    assert stats["selector/pool@harmful"] == 3 and stats["selector/pool@benign"] == 2
    assert stats["selector/support@harmful"] == 2 and stats["selector/support@benign"] == 1
    for label in ("harmful", "benign"):
        truth = [x == label for x in labels]  # an unlabelled row counts among the others
        assert stats[f"selector/auc@{label}"] == pytest.approx(_hand_auc(scores, truth))
    assert stats["selector/auc@harmful"] == pytest.approx(6.5 / 9)
    assert label_stats(scores, [None] * 6, [0]) == {}
    assert "selector/auc@x" not in label_stats([1.0, 2.0], ["x", "x"], [1])  # no other rows
    assert label_line(stats) == ("[u2a] by ground-truth label: benign: 1 of 2 selected, ROC AUC "
                                 "0.562; harmful: 2 of 3 selected, ROC AUC 0.722")
    assert label_line({"selector/alpha": 1.0}) is None
    stats.update({"selector/auc@benign/forget": 0.5, "selector/auc@benign/mismatch": 0.25})
    assert label_line(stats).startswith("[u2a] by ground-truth label: benign: 1 of 2 selected, "
                                        "ROC AUC 0.562 (forget alone 0.500, mismatch alone "
                                        "0.250); harmful")


def test_weight_shares_by_label_against_a_hand_count():
    w = [0.5, 0.25, 0.125, 0.125]
    assert weight_shares(w, ["harmful", "benign", None, "benign"]) == {
        "selector/weight@benign": 0.375, "selector/weight@harmful": 0.5}
    assert weight_shares([2.0, 6.0], ["a", "b"]) == {"selector/weight@a": 0.25,
                                                      "selector/weight@b": 0.75}
    assert weight_shares(w, [None] * 4) == {} and weight_shares([0.0, 0.0], ["a", "b"]) == {}


@pytest.mark.slow
def test_random_k_trains_a_seeded_random_support_with_uniform_weights(tmp_path):
    """selector.score=random (random-k, issue 22's peer): the top_k of seeded uniform draws, the
    same on both ranks, kept with uniform weights through the reweighting rounds."""
    import torch

    cfg = tiny_config(tmp_path / "run", data={"forget": {"path": "builtin:harmful",
                                                         "schema": "completions", "limit": 20}},
                      unlearn={"steps": 6}, runtime={"seed": 3},
                      selector={"enabled": True, "score": "random", "top_k": 6, "rounds": 2,
                                "steps_per_round": 2})
    ranks = run_ranks(2, "tests.rank_fns:u2a_report", {"cfg": cfg})
    draws = torch.rand(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = sorted(draws.argsort(descending=True)[:6].tolist())  # independent of select_top_k
    for r in ranks:
        assert list(r["support"]) == expected
        assert r["round"] == 3 and len(r["losses"]) == 6  # round 0 and two reweighting rounds
        w = r["weights"]
        assert torch.equal(w[expected], torch.full((6,), 1 / 6, dtype=w.dtype))
        assert float(w.sum()) == pytest.approx(1.0) and int((w > 0).sum()) == 6


def test_a_candidate_sample_scores_only_its_negatives_and_keeps_its_top_k(tmp_path):
    """selector.candidates: round 0 scores a seeded sample of m negatives (the same on both
    ranks, another with another seed), each scored as in a run that scores them all (with the
    identity iHVP v = ∇J does not depend on which negatives are scored), and the support is the
    sample's top_k; the label counts are the sample's."""
    import torch

    pool = {"path": "builtin:harmful", "schema": "completions", "limit": 20, "label": "harmful"}
    sel = {"enabled": True, "top_k": 3, "ihvp": "identity", "hessian_batch": 8,
           "outer_sample": 8}

    def cfg(name, **more):
        return tiny_config(tmp_path / name, data={"forget": pool}, selector={**sel, **more})

    from u2a_dist.sampling import candidate_indices

    ranks = run_ranks(2, "tests.rank_fns:round0_scores_each",
                      {"cfgs": [cfg("all"), cfg("m8", candidates=8)]})
    (everything, sample), (_, sample1) = ranks
    assert everything["index"] == list(range(20))
    idx = sample["index"]
    assert len(idx) == len(set(idx)) == 8 and idx == sorted(idx) and set(idx) <= set(range(20))
    assert sample1["index"] == idx == candidate_indices(20, 8, 0) != candidate_indices(20, 8, 1)
    torch.testing.assert_close(sample["scores"], everything["scores"][idx], rtol=1e-3, atol=1e-6)
    top3 = sorted(idx[p] for p in sample["scores"].argsort(descending=True)[:3].tolist())
    assert sorted(sample["support"]) == top3 and sorted(sample1["support"]) == top3
    assert sample["stats"]["selector/pool@harmful"] == 8
    assert sample["stats"]["selector/unscored@harmful"] == 12  # and said so, not dropped
    assert "selector/unscored@harmful" not in everything["stats"]
    assert label_line(sample["stats"]).startswith(
        "[u2a] by ground-truth label: harmful: 3 of 8 selected (12 more not scored")
    w = sample["weights"]
    assert int((w > 0).sum()) == 3 and torch.equal(w[top3], torch.full((3,), 1 / 3,
                                                                       dtype=w.dtype))


@pytest.mark.slow
def test_round0_ranks_harmful_above_benign_and_the_top_group_lowers_j_more(tmp_path):
    """Issue 22's check on the tiny model: negatives of both kinds from prompts J's pairs do not
    hold (the built-in eval split; J on the train split's refusal and over-refusal pairs, which
    reward refusing harmful requests and answering harmless ones). Round-0 scores rank the
    harmful compliances above the benign answers, and T steps on the top-k group alone lower J
    more than T steps on the bottom-k group, each from θ0. (On SmolLM2 the issue measured round-0
    AUC 0.69 on real pools: the tiny model's texts separate more easily.)"""
    import torch

    pool = [{"path": "builtin:harmful", "schema": "completions", "split": "eval",
             "label": "harmful"},
            {"path": "builtin:harmless", "schema": "completions", "split": "eval",
             "label": "benign"}]
    cfg = tiny_config(tmp_path / "run", data={"forget": pool},
                      selector={"enabled": True, "top_k": 8, "ihvp": "identity",
                                "hessian_batch": 16}, runtime={"world_size": 1})
    # round 0 and the product's score check (selector.check_steps, u2a_dist.score_check)
    checked = {**cfg, "selector": {**cfg["selector"], "check_steps": 3, "check_k": 8}}
    r0 = run_ranks(1, "tests.rank_fns:score_check", {"cfg": checked})[0]
    scores, stats = r0["scores"], r0["stats"]
    # the labels reach the report only: the same pool unlabelled gets the very same scores
    plain = tiny_config(tmp_path / "plain", data={"forget": [
        {k: v for k, v in s.items() if k != "label"} for s in pool]}, selector=cfg["selector"],
        runtime=cfg["runtime"])
    unlabelled = run_ranks(1, "tests.rank_fns:round0_scores", {"cfg": plain})[0]
    assert scores.tolist() == unlabelled["scores"].tolist()
    assert not any("@" in k for k in unlabelled["stats"])
    labels = [x.attrs["label"] for x in load_completions([DataSpec(**s) for s in pool])]
    assert stats["selector/pool@harmful"] == labels.count("harmful")
    assert stats["selector/pool@benign"] == labels.count("benign")
    assert stats["selector/support@harmful"] == sum(labels[i] == "harmful"
                                                    for i in r0["support"])
    assert stats["selector/auc@harmful"] == pytest.approx(
        _hand_auc(scores.tolist(), [x == "harmful" for x in labels]))
    assert stats["selector/auc@harmful"] >= 0.95, stats  # the bar
    order = scores.argsort(descending=True).tolist()
    top, bottom = sorted(order[:8]), sorted(order[-8:])
    assert all(labels[i] == "harmful" for i in top) and all(labels[i] == "benign"
                                                           for i in bottom)
    delta = {}
    for name, group in (("top", top), ("bottom", bottom)):
        j = run_ranks(1, "tests.rank_fns:group_delta_j",
                      {"cfg": {**cfg, "out": str(tmp_path / name)}, "group": group,
                       "steps": 3})[0]
        delta[name] = j["after"] - j["before"]
    # measured: top −0.20, bottom −0.01 (GA on any text moves J a little)
    assert delta["top"] < min(0.0, delta["bottom"]), delta
    assert torch.isfinite(scores).all()
    # the score check measured the same groups, each from θ0 with a fresh optimizer, as these
    # fresh runs did, and left the trainer at θ0 on the round-0 support with nothing on disk
    check = r0["check"]["groups"]
    assert check["top"]["index"] == top and check["bottom"]["index"] == bottom
    assert len(set(check["random"]["index"])) == 8
    for name in ("top", "bottom"):
        assert check[name]["delta_j"] == pytest.approx(delta[name], rel=1e-4, abs=1e-6), name
    assert r0["step"] == 0 and r0["support_after"] == r0["support"] and not r0["left"]
    for key, value in r0["theta0"].items():
        assert torch.equal(r0["state"][key], value), key


@pytest.mark.slow
def test_the_terms_parts_of_a_score_are_what_each_term_alone_scores(tmp_path):
    """s_i = c_f⟨v, ∇ℓ_i⟩ + c_m⟨v, ∇m_i⟩ split from one scoring's passes (u2a_loop.term_scores)
    equals the scores of the same pool with the other term switched off (with the identity iHVP
    v = ∇J/γ does not depend on the inner objective), and each part's AUC is reported."""
    import torch

    pool = [{"path": "builtin:harmful", "schema": "completions", "split": "eval",
             "label": "harmful"},
            {"path": "builtin:harmless", "schema": "completions", "split": "eval",
             "label": "benign"}]

    def cfg(name: str, **weights) -> dict:
        return tiny_config(tmp_path / name, data={
            "forget": pool, "mismatch": {"path": "builtin:refusal_templates",
                                         "schema": "completions"}},
            unlearn={"forget_weight": 1.0, "mismatch_weight": 2.0, **weights},
            selector={"enabled": True, "top_k": 8, "ihvp": "identity"},
            runtime={"world_size": 1})

    on_forget, on_mismatch = cfg("on_forget"), cfg("on_mismatch")
    on_forget["selector"]["score_on"] = "forget"
    on_mismatch["selector"]["score_on"] = "mismatch"
    both, forget_only, mismatch_only, ranked, ranked_m = run_ranks(
        1, "tests.rank_fns:round0_scores_each",
        {"cfgs": [cfg("both"), cfg("forget", mismatch_weight=0.0),
                  cfg("mismatch", forget_weight=0.0), on_forget, on_mismatch]})[0]
    terms = both["terms"]
    harmful = [x.attrs["label"] == "harmful"
               for x in load_completions([DataSpec(**s) for s in pool])]
    assert set(terms) == {"forget", "mismatch"}
    # every negative's target a template: no label gets grounded targets, so no warning
    assert both["stats"]["selector/grounded@harmful"] == 0.0
    assert both["stats"]["selector/grounded@benign"] == 0.0
    torch.testing.assert_close(terms["forget"] + terms["mismatch"], both["scores"])
    for name, alone in (("forget", forget_only), ("mismatch", mismatch_only)):
        assert alone["terms"] == {}  # one term on: nothing to split
        err = (terms[name] - alone["scores"]).norm() / alone["scores"].norm()
        assert float(err) < 1e-3, (name, float(err))
        assert both["stats"][f"selector/auc@harmful/{name}"] == pytest.approx(
            _hand_auc(terms[name].tolist(), harmful))
    # selector.score_on=forget|mismatch: that part alone, scored from its own passes only (the
    # other term's skipped), the support its top-k, its AUC reported as that part's
    for name, alone in (("forget", ranked), ("mismatch", ranked_m)):
        assert set(alone["terms"]) == {name}
        err = (terms[name] - alone["scores"]).norm() / terms[name].norm()
        assert float(err) < 1e-3, (name, float(err))
        top = sorted(range(len(harmful)), key=lambda i: (-float(alone["scores"][i]), i))[:8]
        assert sorted(alone["support"]) == sorted(top)
        assert "selector/auc@harmful" not in alone["stats"]  # not the total's AUC
        assert alone["stats"][f"selector/auc@harmful/{name}"] == pytest.approx(
            _hand_auc(alone["scores"].tolist(), harmful))
    top = sorted(range(len(harmful)), key=lambda i: (-float(terms["forget"][i]), i))[:8]
    assert sorted(ranked["support"]) == sorted(top)
    assert sorted(both["support"]) != sorted(top)  # the total ranks otherwise here


def test_ranking_scores_are_the_forget_part_only_when_asked_and_when_there_is_one():
    """u2a_loop.ranking_scores, what top-k and the reweighting step use (selector.score_on)."""
    from types import SimpleNamespace

    import torch

    from u2a_dist.selector import Hypergradient
    from u2a_dist.u2a_loop import ranking_scores

    hg = Hypergradient([0, 1, 2], torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64),
                       torch.zeros(3), loss_scores=torch.tensor([-1.0, 2.0, 0.5],
                                                                dtype=torch.float64))

    def trainer(score_on: str, mismatch: bool = True) -> SimpleNamespace:
        return SimpleNamespace(cfg=SimpleNamespace(selector=SimpleNamespace(score_on=score_on)),
                               objective=SimpleNamespace(uses_mismatch=mismatch,
                                                         forget_weight=2.0))

    assert torch.equal(ranking_scores(trainer("total"), hg), hg.scores)
    assert ranking_scores(trainer("forget"), hg).tolist() == [-2.0, 4.0, 1.0]  # c_f⟨v, ∇ℓ_i⟩
    # no mismatch term: the score is the forget part already
    assert torch.equal(ranking_scores(trainer("forget", mismatch=False), hg), hg.scores)
    # score_on=mismatch: the rest of the score
    assert ranking_scores(trainer("mismatch"), hg).tolist() == [5.0, -5.0, 1.0]
    # normalize=cosine: the ranked part over the norm of its gradient, 0 where that is 0
    hg.grad_norms = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    assert ranking_scores(trainer("total"), hg).tolist() == [1.5, 0.0, 0.5]
    assert ranking_scores(trainer("mismatch"), hg).tolist() == [2.5, 0.0, 0.25]


def test_pa_refusals_replace_the_rejected_side_of_the_over_refusal_pairs_only(tmp_path):
    """data.pa_refusals: J's over-refusal pairs (helpful ≻ refusal on a harmless prompt) reject
    the given refusals in turn, the refusal pairs and the held-out pairs are as they were, and
    the option is validated by name (issue 22: J that penalises what the mismatch term teaches)."""
    from u2a_dist.data.builtin import builtin_pairs
    from u2a_dist.data.examples import with_rejected_refusals
    from u2a_dist.data.readers import DataError
    from u2a_dist.run_inputs import RunInputs

    templates = [c.response for c in load_completions(
        DataSpec(path="builtin:refusal_templates", schema="completions"))]
    pairs = builtin_pairs("all")
    swapped = with_rejected_refusals(pairs, templates, "t")
    over = [i for i, p in enumerate(pairs) if p.id.startswith("builtin:over_refusal:")]
    assert over and len(over) < len(pairs)
    for k, i in enumerate(over):  # by hand: the k-th over-refusal pair, template k mod 12
        assert swapped[i].rejected == templates[k % len(templates)] != pairs[i].rejected
        assert (swapped[i].prompt, swapped[i].chosen) == (pairs[i].prompt, pairs[i].chosen)
    for i in set(range(len(pairs))) - set(over):
        assert swapped[i] == pairs[i]
    with pytest.raises(DataError, match="no over-refusal pairs"):
        with_rejected_refusals(builtin_pairs("refusal"), templates, "t")
    with pytest.raises(DataError, match="holds no refusals"):
        with_rejected_refusals(pairs, [], "t")

    raw = tiny_config(tmp_path / "run", data={
        "pa_refusals": {"path": "builtin:refusal_templates", "schema": "completions"},
        "pa_eval": {"path": "builtin:all", "schema": "pairs", "split": "eval"}})
    inputs, plain = RunInputs(config_from_dict(raw)), RunInputs(config_from_dict(
        {**raw, "data": {k: v for k, v in raw["data"].items() if k != "pa_refusals"}}))
    tok = inputs.tokenizer
    rejected = [tok.decode(x["input_ids"]) for x in inputs.pa.rejected]
    assert sum(any(t in r for t in templates) for r in rejected) > 0
    assert inputs.pa.chosen == plain.pa.chosen and inputs.pa.rejected != plain.pa.rejected
    assert inputs.pa_eval.rejected == plain.pa_eval.rejected  # the real preference, held out
    with pytest.raises(ConfigError, match="data.pa_refusals needs data.pa"):
        config_from_dict({**raw, "data": {**raw["data"], "pa": None},
                          "selector": {"enabled": False}})
    with pytest.raises(ConfigError, match="score_on=mismatch needs both terms"):
        config_from_dict(tiny_config(tmp_path / "x", selector={"score_on": "mismatch"}))


def test_kept_and_left_out_by_label_from_round0_scores():
    """What `u2a select`/`run`/`demo` print of a labelled pool (selection_labels.
    kept_and_left_out): per label the counts kept (weight > 0) and left out, the highest-ranked
    kept and lowest-ranked left-out rows, ranked by score (over grad_norm where logged), round 0
    only, prompts cut to the width."""
    from u2a_dist.selection_labels import kept_and_left_out

    def row(i, label, score, weight, rnd=0, **extra):
        return {"round": rnd, "index": i, "id": f"r{i}", "score": score, "weight": weight,
                "label": label, **extra}

    rows = [row(0, "harmful", 5.0, 0.5), row(1, "harmful", 1.0, 0.0), row(2, "benign", 4.0, 0.5),
            row(3, "benign", -2.0, 0.0), row(4, "benign", -9.0, 0.0), row(5, None, 9.0, 0.0),
            row(0, "harmful", 0.0, 1.0, rnd=1)]
    prompts = ["a  b\nc", "x" * 200, "p2", "p3", "p4", "p5"]
    out = kept_and_left_out(rows, prompts, n=2, width=10)
    assert set(out) == {"benign", "harmful"}
    assert (out["harmful"]["kept"], out["harmful"]["left_out"]) == (1, 1)
    assert (out["benign"]["kept"], out["benign"]["left_out"]) == (1, 2)
    assert out["harmful"]["kept_examples"] == [{"id": "r0", "score": 5.0, "prompt": "a b c"}]
    assert out["harmful"]["left_out_examples"][0]["prompt"] == "x" * 9 + "…"
    assert [e["id"] for e in out["benign"]["left_out_examples"]] == ["r4", "r3"]  # lowest first
    # ranked by the cosine where the run logged gradient norms
    cos = kept_and_left_out([row(0, "b", 4.0, 0.0, grad_norm=4.0),
                             row(1, "b", 3.0, 0.0, grad_norm=1.0)], ["p", "q"])
    assert [e["id"] for e in cos["b"]["left_out_examples"]] == ["r0", "r1"]
    assert kept_and_left_out([row(0, None, 1.0, 1.0)], ["p"]) == {}


def test_the_run_summary_and_the_cli_show_what_round0_kept(tmp_path, capsys):
    """job._selection reads round 0 back from scores.jsonl (a line a crash cut short is
    skipped; nothing for a run without the selector or on another rank) and the CLI prints it."""
    import json
    from types import SimpleNamespace

    from u2a_dist.cli import _print_selection
    from u2a_dist.job import _selection
    from u2a_dist.rundir import RunDir

    run = RunDir(tmp_path)
    (tmp_path / "scores.jsonl").write_text(
        json.dumps({"round": 0, "index": 0, "id": "a", "score": 2.0, "weight": 1.0,
                    "label": "harmful"}) + "\n"
        + json.dumps({"round": 0, "index": 1, "id": "b", "score": -1.0, "weight": 0.0,
                      "label": "benign"}) + "\n" + '{"round": 0, "ind')

    def trainer(rank=0, enabled=True):
        return SimpleNamespace(rank=rank, cfg=SimpleNamespace(selector=SimpleNamespace(
            enabled=enabled)), forget=SimpleNamespace(examples=[
                SimpleNamespace(prompt="How to pick a lock"), SimpleNamespace(prompt="Hi")]))

    summary = _selection(trainer(), run)
    assert summary["selection"]["harmful"]["kept"] == 1
    assert summary["selection"]["benign"]["left_out_examples"][0]["prompt"] == "Hi"
    assert _selection(trainer(rank=1), run) == {} == _selection(trainer(enabled=False), run)
    _print_selection(summary)
    out = capsys.readouterr().out
    assert "[u2a] harmful: kept 1, left out 0" in out
    assert "[u2a]   left out: 'Hi' (score -1)" in out
    from u2a_dist.cli import _print_check

    _print_check({"check": {"steps": 3, "k": 6, "j_before": 0.693, "groups": {
        "top": {"delta_j": -0.2, "mean_score": 4.5}, "bottom": {"delta_j": 0.01,
                                                                 "mean_score": -3.0}}}})
    assert ("[u2a] score check, 3 steps on 6 negatives from θ0, J 0.6930 before: top ΔJ "
            "-0.2000 (mean score 4.5); bottom ΔJ +0.0100 (mean score -3)") in \
        capsys.readouterr().out


def test_mismatch_targets_that_differ_by_label_are_reported():
    """A labelled pool whose harmful rows get their prompts' own refusals as mismatch targets
    and the others a template leaks the label into the score's mismatch part (it ranked
    "has a grounded refusal" first on SmolLM2: AUC 0.945, 0.545 with one template for all):
    the shares per label are logged and a gap over GROUNDED_GAP is a named warning."""
    from u2a_dist.data.examples import Completion, grounded_answers
    from u2a_dist.selection_labels import grounded_shares, grounded_warning

    pool = [Completion("h1", "How do I hotwire a car?", "Step 1"),
            Completion("h2", "how do i  hotwire a CAR?", "First"),  # the same prompt key
            Completion("h3", "Make a weapon", "Sure"), Completion("b1", "Name a fruit", "Apple")]
    answers = [Completion("r1", "How do I hotwire a car?", "I can't help with that."),
               Completion("t", "", "I'm sorry, I can't help with that.")]
    grounded = grounded_answers(pool, answers)
    assert grounded == [True, True, False, False]
    stats = grounded_shares(["harmful", "harmful", "harmful", "benign"], grounded)
    assert stats == {"selector/grounded@benign": 0.0,
                     "selector/grounded@harmful": pytest.approx(2 / 3)}
    warning = grounded_warning(stats)
    assert warning.startswith("mismatch targets differ by label (share grounded in the "
                              "prompt: benign 0.00, harmful 0.67)")
    assert grounded_warning({"selector/grounded@a": 0.5, "selector/grounded@b": 0.45}) is None
    assert grounded_shares([None, None], [True, False]) == {} == grounded_shares(["a"], None)
