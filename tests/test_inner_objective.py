"""The per-example inner term ℓ_i + c_m·m_i of design.md §2, recomputed by hand, token by token."""

from __future__ import annotations

import math

import torch

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from u2a_dist.data.tokenize import IGNORE
from u2a_dist.models import build_tiny_model


def _mean_nll_by_hand(model, item) -> float:
    """−(1/|y|) Σ_t log p(y_t | x, y_<t), each token's softmax computed with math."""
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total, count = 0.0, 0
    for t in range(1, len(item["labels"])):
        y = item["labels"][t]
        if y == IGNORE:
            continue
        row = logits[t - 1].tolist()
        m = max(row)
        log_z = m + math.log(sum(math.exp(x - m) for x in row))
        total += row[y] - log_z
        count += 1
    return -total / count


def test_ga_plus_templated_refusal_mismatch_matches_a_hand_computation(tmp_path):
    c_m, idx = 0.5, [0, 3, 5]
    cfg = tiny_config(tmp_path / "run", runtime={"world_size": 1},
                      unlearn={"mismatch_weight": c_m},
                      data={"forget": {"path": "builtin:harmful", "schema": "completions",
                                       "split": "train"},
                            "mismatch": {"path": "builtin:refusal_templates",
                                         "schema": "completions"},
                            "max_length": 512})  # no truncation
    out = run_ranks(1, "tests.rank_fns:inner_terms", {"cfg": cfg, "idx": idx})[0]
    model = build_tiny_model(0)
    model.load_state_dict(out["state"])
    model.eval()
    ell = [-_mean_nll_by_hand(model, item) for item in out["forget"]]  # GA: ℓ = −nll
    m = [_mean_nll_by_hand(model, item) for item in out["mismatch"]]   # descent on refusals
    # the mismatch answer shares the example's prompt and is a different (refusal) response
    for f, mm in zip(out["forget"], out["mismatch"]):
        n_prompt = f["labels"].count(IGNORE)
        assert f["input_ids"][:n_prompt] == mm["input_ids"][:n_prompt]
        assert f["input_ids"][n_prompt:] != mm["input_ids"][n_prompt:]
    torch.testing.assert_close(out["ell"].double(), torch.tensor(ell, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    expected = [a + c_m * b for a, b in zip(ell, m)]
    torch.testing.assert_close(out["total"].double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
