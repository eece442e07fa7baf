"""Gradient accumulation (runtime.micro_batches): a step made of several forward/backward
passes per rank is the same step, on real ranks, at ZeRO-3 (there with
runtime.gradient_checkpointing on too: the layers recomputed in the backward) and at stage 0."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_retain_terms import _retain_cfg
from u2a_dist.data.tokenize import micro_chunks


def test_micro_chunks_cover_both_shares_in_the_same_number_of_passes() -> None:
    chunks = micro_chunks([10, 11], [20, 21, 22], 3)
    assert chunks == [([], [20]), ([10], [21]), ([11], [22])]
    assert micro_chunks([1, 2], [3, 4], 8) == [([1], [3]), ([2], [4])]  # never an empty pass
    assert micro_chunks([1, 2], [], 1) == [([1, 2], [])]


def _cfg(tmp_path, name: str, micro: int, stage: int, recompute: bool = False) -> dict:
    # SGD (as tests/test_engine.py: Adam turns float noise on zero-gradient weights into ±lr
    # steps); every term of the inner loss on: GA, mismatch, retain KL, onset contrast. A retain
    # batch of 6 and a forget batch of 4 on 2 ranks: 3 passes of (0|1 forget, 1 retain) each.
    cfg = _retain_cfg(tmp_path / name, retain_batch_size=6, optimizer="sgd", lr=0.5,
                      mismatch_weight=0.5, retain_refusal_tokens=3)
    cfg["runtime"].update({"micro_batches": micro, "zero_stage": stage,
                           "gradient_checkpointing": recompute})
    return cfg


@pytest.mark.parametrize("stage", [3, 0])
def test_a_step_in_three_passes_is_the_step_in_one(tmp_path, stage) -> None:
    ref = run_ranks(2, "tests.rank_fns:steps_and_state",
                    {"cfg": _cfg(tmp_path, "one", 1, stage), "steps": 2})[0]
    acc = run_ranks(2, "tests.rank_fns:steps_and_state",
                    {"cfg": _cfg(tmp_path, "three", 3, stage, recompute=stage == 3), "steps": 2})
    assert [r["checkpointing"] for r in acc] == [stage == 3] * 2 and not ref["checkpointing"]
    assert ref["block_calls"] == 2 and acc[0]["block_calls"] == 6 * (2 if stage == 3 else 1)
    clock = ("time_s", "timing/step_s")
    assert [{k: v for k, v in m.items() if k not in clock} for m in acc[0]["metrics"]] == \
        [{k: v for k, v in m.items() if k not in clock} for m in acc[1]["metrics"]]
    for got, want in zip(acc[0]["metrics"], ref["metrics"]):
        for key in ("loss", "grad_norm", "forget/nll", "loss/retain_kl", "loss/retain_refusal"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert ref["metrics"][1]["loss/retain_kl"] > 0  # θ moved: the retain terms are not constant
    moved = 0.0
    for key, value in ref["state"].items():
        torch.testing.assert_close(acc[0]["state"][key], value, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((value - acc[0]["state"][key]).abs().max()))
    assert moved < 1e-5
