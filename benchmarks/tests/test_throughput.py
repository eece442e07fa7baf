"""benchmarks/throughput.py (issue 23) on the tiny model: real rank processes (W = 1 and a
ZeRO-3 W = 2 over gloo), TRL DPO + SFT, the plain-transformers ceiling and the profile."""

from __future__ import annotations

import pytest
import yaml

from benchmarks import throughput
from tests.conftest import tiny_config
from u2a_dist.config import load_config
from u2a_dist.run_inputs import RunInputs

SCORE_N = 16  # a multiple of eval.batch_size x W: no rank pads its share with filler rows


@pytest.mark.slow
def test_throughput_counts_every_pass_and_compares_it_with_the_ceiling_and_trl(tmp_path):
    raw = tiny_config(tmp_path / "run", unlearn={
        "loss": "npo", "batch_size": 8, "retain_kl_weight": 1.0, "mismatch_weight": 0.5})
    raw["data"].update(retain={"path": "builtin:harmless", "schema": "prompts",
                               "split": "train"},
                       mismatch={"path": "builtin:refusal_templates", "schema": "completions"})
    raw["selector"] = {"hessian_batch": 8, "outer_sample": 16}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "results"
    rec = throughput.main(["--config", str(path), "--world", "1,2", "--steps", "2",
                           "--repeats", "1", "--score-n", str(SCORE_N), "--threads", "1",
                           "--profile", "--out", str(out)])
    runs = {(r["role"], r["world"]): r for r in rec["runs"]}
    assert set(runs) == {("u2a", 1), ("u2a", 2), ("trl", 1)}
    w1, w2, trl = runs["u2a", 1], runs["u2a", 2], runs["trl", 1]

    # The scoring passes' tokens, counted independently: two forward passes (θ ± εv) over the
    # first SCORE_N negatives and their mismatch targets, no graph.
    inputs = RunInputs(load_config(path, []))
    expected = 2 * sum(len(x["input_ids"]) for group in (inputs.forget.items,
                                                          inputs.forget.mismatch)
                       for x in group[:SCORE_N])
    assert w1["phases"]["scores"]["tokens_nograd"] == expected
    assert w1["phases"]["scores"]["tokens_grad"] == 0
    # ZeRO-3 shards the examples, it does not repeat them: the ranks' tokens add up to W = 1's
    for name in ("scores", "grad_J"):
        assert w2["phases"][name]["tokens"] == w1["phases"][name]["tokens"], name
    # the recipe step: a graph through forget, mismatch and retain rows; θ0's retain forward
    # without one (the retain KL's reference)
    step = w1["phases"]["recipe_step"]
    assert step["tokens_grad"] > step["tokens_nograd"] > 0
    assert 0 <= step["padding"] < 1
    for run in (w1, trl):
        for name, p in run["phases"].items():
            assert p["ceiling_s"] > 0 and p["vs_ceiling"] > 0, name
            assert p["tokens_per_s"] == pytest.approx(p["tokens"] / p["mean_s"])
        assert run["ceiling"]["fwd_bwd_tokens_per_s"] > 0
    assert "vs_ceiling" not in w2["phases"]["recipe_step"]  # the ceiling is single-process
    assert trl["phases"]["trl_dpo_sft_step"]["tokens_grad"] > 0
    assert len(w2["peak_rss_gb"]) == 2 and all(0 < g < 2.0 for g in w2["peak_rss_gb"])
    assert "aten::" in (out / "throughput_profile_w1.txt").read_text()
    table = (out / "throughput.md").read_text()
    assert "| u2a | 2 | 1 | recipe_step |" in table and "trl_dpo_sft_step" in table
