"""benchmarks/noisy_pool.py (issue 22) on the tiny model: pools at ρ built from labelled specs,
real runs, the selection's false-positive shares read back from scores.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import noisy_pool
from tests.conftest import tiny_config
from u2a_dist.config import load_config
from u2a_dist.data.examples import load_completions, load_pairs
from u2a_dist.data_spec import DataSpec

HARMFUL = {"path": "builtin:harmful", "schema": "completions", "split": "train",
           "label": "harmful"}
BENIGN = {"path": "builtin:harmless", "schema": "completions", "label": "benign",
          "near_duplicates": 6}


def write_config(tmp_path: Path) -> Path:
    raw = tiny_config(tmp_path / "unused", unlearn={"steps": 2},
                      data={"forget": [HARMFUL, BENIGN]},
                      selector={"top_k": 8, "rounds": 1, "steps_per_round": 2},
                      eval={"every": 2, "target": None, "batch_size": 8})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "tiny.yaml"


def test_pool_overrides_make_the_false_positives_a_share_rho(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cfg = load_config(config)
    n_harmful = len(load_completions(DataSpec(**HARMFUL)))
    for rho, benign in ((0.0, 0), (0.25, round(n_harmful / 3)), (0.5, n_harmful)):
        pooled = load_config(config, noisy_pool.pool_overrides(cfg, rho, pairs=8))
        pool = load_completions(pooled.data.forget)
        labels = [x.attrs["label"] for x in pool]
        assert labels.count("harmful") == n_harmful and labels.count("benign") == benign
        dups = sum("~dup" in x.id for x in pool)  # cut in the spec's own proportion (6 of 66)
        assert dups == round(benign * 6 / 66)
        assert len(load_pairs(pooled.data.pa)) == 8
    with pytest.raises(ValueError, match="more false positives"):
        noisy_pool.pool_overrides(cfg, 0.9, pairs=None)  # builtin:harmless has too few
    unlabelled = load_config(config, ['data.forget={"path": "builtin:harmful", '
                                      '"schema": "completions"}'])
    with pytest.raises(ValueError, match="each with a label"):
        noisy_pool.pool_overrides(unlabelled, 0.5, pairs=None)


@pytest.mark.slow
def test_runs_report_the_selections_false_positive_shares(tmp_path: Path) -> None:
    config, runs, out = write_config(tmp_path), tmp_path / "runs", tmp_path / "r" / "pool.json"
    args = ["--config", str(config), "--rho", "0,0.5", "--pairs", "8", "--methods", "random_k",
            "--runs-dir", str(runs), "--out", str(out)]
    assert noisy_pool.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rho"], r["method"]) for r in rows] == [(0.0, "random_k"), (0.5, "random_k")]
    for r in rows:
        run = runs / f"rho{r['rho']:g}" / "random_k"
        scores = [json.loads(x) for x in (run / "scores.jsonl").read_text().splitlines()]
        support = [s for s in scores if s["round"] == max(x["round"] for x in scores)
                   and s["weight"] > 0]
        benign = [s for s in support if s["label"] == "benign"]
        assert r["support"] == len(support) == 8 and r["steps"] == 2
        assert r["fp_share_support"] == pytest.approx(len(benign) / 8)
        assert r["fp_share_weight_by_round"][-1] == pytest.approx(sum(s["weight"] for s in benign))
        labels = [s["label"] for s in scores if s["round"] == 0]
        assert labels.count("benign") == (0 if r["rho"] == 0 else labels.count("harmful"))
    assert rows[0]["fp_share_support"] == 0.0 and rows[0]["auc_harmful"] is None  # one label
    assert 0.0 <= rows[1]["auc_harmful"] <= 1.0
    assert "| 0.5 | random_k |" in out.with_suffix(".md").read_text()
    # --select-only: round 0 of the selecting methods, through `u2a select`
    sel = tmp_path / "r" / "select.json"
    assert noisy_pool.main([*args[:2], "--rho", "0.5", "--pairs", "8", "--methods",
                            "random_k,uniform", "--runs-dir", str(tmp_path / "sel"),
                            "--out", str(sel), "--select-only"]) == 0
    (row,) = json.loads(sel.read_text())["rows"]  # uniform does not select
    assert row["method"] == "random_k" and row["support"] == 8
    assert row["auc_harmful"] == rows[1]["auc_harmful"]  # the same seeded draw, the same pool
