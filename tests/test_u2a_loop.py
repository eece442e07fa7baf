"""The U2A loop end to end on 2 real ZeRO-3 ranks: selection, reweighting, resume, `u2a select`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from u2a_dist.cli import main

N, K, ETA = 20, 6, 50.0


def _u2a_config(out, **unlearn) -> dict:
    # a labelled pool (ground truth for the reports only): each round says where the mass went
    return tiny_config(
        out,
        data={"forget": [{"path": "builtin:harmful", "schema": "completions", "split": "train",
                          "limit": N - 6, "label": "harmful"},
                         {"path": "builtin:harmless", "schema": "completions", "split": "eval",
                          "limit": 6, "label": "benign"}]},
        unlearn={"steps": 6, "batch_size": 4, **unlearn},
        selector={"enabled": True, "top_k": K, "rounds": 2, "steps_per_round": 2, "eta": ETA,
                  "hessian_batch": 16, "neumann_terms": 8, "power_iters": 8},
        eval={"every": 2, "target": None, "batch_size": 8})


def _write(cfg: dict, path) -> str:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _scores(run) -> dict[int, list[dict]]:
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    out: dict[int, list[dict]] = {}
    for row in rows:
        out.setdefault(row["round"], []).append(row)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted `u2a run` of the U2A loop (3 rounds, 6 steps), read by two tests."""
    root = tmp_path_factory.mktemp("full")
    run = root / "run"
    assert main(["run", "--config", _write(_u2a_config(run), root / "c.yaml"),
                 "--launcher", "local"]) == 0
    return run


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_u2a_run_selects_top_k_then_reweights_by_exponentiated_gradient(full_run):
    run = full_run
    rounds = _scores(run)
    assert sorted(rounds) == [0, 1, 2]
    # Round 0 scores every negative with w uniform and keeps the k best, w uniform on them.
    r0 = rounds[0]
    assert sorted(r["index"] for r in r0) == list(range(N))
    best = sorted(r0, key=lambda r: (-r["score"], r["index"]))[:K]
    support = sorted(r["index"] for r in best)
    assert sorted(r["index"] for r in r0 if r["weight"] > 0) == support
    assert all(math.isclose(r["weight"], 1 / K) for r in r0 if r["weight"] > 0)
    assert all(math.isfinite(r["loss"]) and r["id"] for r in r0)
    # Later rounds rescore the support only and move w by w_i exp(eta s_i) / Z (s = -g):
    # toward the examples whose unlearning lowers J more.
    prev = {r["index"]: r["weight"] for r in r0}
    for rd in (1, 2):
        rows = rounds[rd]
        assert sorted(r["index"] for r in rows) == support
        logits = torch.tensor([math.log(prev[r["index"]]) + ETA * r["score"] for r in rows],
                              dtype=torch.float64)
        expected = torch.softmax(logits, 0)
        got = torch.tensor([r["weight"] for r in rows], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        top = max(rows, key=lambda r: r["score"])
        low = min(rows, key=lambda r: r["score"])
        assert top["weight"] / prev[top["index"]] > low["weight"] / prev[low["index"]]
        prev = {r["index"]: r["weight"] for r in rows}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    selector = [m for m in metrics if "timing/select_s" in m]
    assert [m["round"] for m in selector] == [0, 1, 2]
    for m in selector:  # each round's weight mass by label, from its own scores.jsonl rows
        rows = rounds[m["round"]]
        for label in ("harmful", "benign"):
            mass = sum(r["weight"] for r in rows if r["label"] == label)
            assert m.get(f"selector/weight@{label}", 0.0) == pytest.approx(mass, abs=1e-12)
        if m["round"] > 0 and len({r["label"] for r in rows}) == 2:  # AUC over the support
            assert 0.0 <= m["selector/auc@harmful"] <= 1.0
    assert all(m["selector/ihvp_residual"] < 1.0 and m["selector/damping"] >= 0 for m in selector)
    assert max(m["step"] for m in metrics) == 6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_u2a_select_scores_every_negative_without_training(tmp_path, capsys):
    run = tmp_path / "sel"
    assert main(["select", "--config", _write(_u2a_config(run), tmp_path / "c.yaml"),
                 "--launcher", "local"]) == 0
    rounds = _scores(run / "select")  # select's own place inside the run directory
    assert list(rounds) == [0] and len(rounds[0]) == N
    assert sum(r["weight"] > 0 for r in rounds[0]) == K
    assert not (run / "model").exists() and not (run / "checkpoints").exists()
    assert f"scored {N} negatives" in capsys.readouterr().out


@pytest.mark.slow
def test_u2a_resumed_at_a_round_boundary_equals_an_uninterrupted_run(tmp_path, full_run):
    # The first part stops at step 4, a round boundary, with its checkpoint written before the
    # reweighting that is due there; the resumed part must do that reweighting first.
    cfg = _u2a_config(tmp_path / "split", steps=4)
    cfg["runtime"]["checkpoint_every"] = 2
    first = run_ranks(2, "tests.rank_fns:u2a_report", {"cfg": cfg})
    cfg["unlearn"]["steps"] = 6
    second = run_ranks(2, "tests.rank_fns:u2a_report", {"cfg": cfg, "prepare": False})
    assert first[0]["resumed_from"] is None and second[0]["resumed_from"] == 4
    # The uninterrupted run as `u2a run` left it: its last round's weights, losses, model.
    assert second[0]["round"] == json.loads((full_run / "summary.json").read_text())["rounds"]
    last = _scores(full_run)[2]
    assert sorted(second[0]["support"]) == sorted(r["index"] for r in last)
    full_w = torch.zeros_like(second[0]["weights"], dtype=torch.float64)
    for r in last:
        full_w[r["index"]] = r["weight"]
    torch.testing.assert_close(second[0]["weights"].double(), full_w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(first[0]["losses"] + second[0]["losses"]),
                               torch.tensor(_losses(full_run)), rtol=1e-5, atol=1e-5)
    exported = load_file(full_run / "model" / "model.safetensors")
    assert len(exported) > 10 and set(exported) <= set(second[0]["state"])
    for key, value in exported.items():
        torch.testing.assert_close(second[0]["state"][key], value, rtol=1e-5, atol=1e-6)
    rounds = _scores(tmp_path / "split")
    assert sorted(rounds) == [0, 1, 2] and all(len(rounds[r]) == (N if r == 0 else K)
                                               for r in rounds)


@pytest.mark.parametrize("selector", [False, True])
def test_time_budget_stops_every_rank_at_the_same_step(tmp_path, selector):
    """unlearn.time_budget_s: checked before each step and round on rank 0's clock."""
    cfg = _u2a_config(tmp_path / "run", time_budget_s=1e-6)
    cfg["selector"]["enabled"] = selector
    r0, r1 = run_ranks(2, "tests.rank_fns:budget_report", {"cfg": cfg})
    for r in (r0, r1):
        assert r["result"]["stopped"] == "time_budget"
        # training: one step spends the budget; U2A: round 0's selection already has
        assert r["step"] == (0 if selector else 1)
        assert r["train_time"] > 0
    if selector:
        return  # the unbounded control below is the same run either way: done once
    unbounded = _u2a_config(tmp_path / "free", time_budget_s=0)
    unbounded["selector"]["enabled"] = False
    (free,) = run_ranks(1, "tests.rank_fns:budget_report",
                        {"cfg": {**unbounded, "runtime": {**unbounded["runtime"],
                                                         "world_size": 1}}})
    assert free["result"]["stopped"] == "budget" and free["step"] == 6


@pytest.mark.slow
def test_bf16_run_selects_on_the_masters_of_every_round(tmp_path):
    """A bf16 ZeRO-3 run (docs/design.md §3): every selection round runs on one fp32 twin, reloaded
    with the optimizer's master weights of that moment, and its finite differences still
    reach the forward passes (directional scores are not all 0 in any round)."""
    run = tmp_path / "run"
    cfg = _u2a_config(run)
    cfg["model"]["dtype"] = "bfloat16"
    ranks = run_ranks(2, "tests.rank_fns:half_precision_rounds", {"cfg": cfg})
    for r in ranks:
        loads = r["loads"]
        assert [x["step"] for x in loads] == [0, 2, 4]
        assert all(x["equal"] and not x["run"] and x["dtypes"] == ["torch.float32"]
                   for x in loads)
        assert len({x["twin"] for x in loads}) == 1  # built once, reloaded each round
        assert r["round"] == 3 and len(r["losses"]) == 6
        assert all(math.isfinite(x) for x in r["losses"])
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    rounds = _scores(run)
    assert sorted(rounds) == [0, 1, 2]
    for rows in rounds.values():
        assert any(row["score"] != 0.0 for row in rows)
        assert all(math.isfinite(row["score"]) for row in rows)
    w = ranks[0]["weights"][ranks[0]["support"]]
    assert float(w.max() - w.min()) > 1e-6  # reweighting moved w off uniform
