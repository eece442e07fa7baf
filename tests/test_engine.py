"""ZeRO-3 on real ranks: partitioning, rank-count invariance, resume, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_config
from tests.distributed import run_ranks

TOL = 1e-5  # fp32; only the order of the cross-rank gradient sum differs


def test_two_ranks_partition_and_match_one_rank(tmp_path):
    # SGD, not Adam: GPT-2's attention key bias has an exactly-zero true gradient (softmax is
    # shift invariant), and Adam turns the float noise there into ±lr steps that differ with the
    # summation order; with SGD every weight is comparable.
    steps = 6
    sgd = {"optimizer": "sgd", "lr": 0.5}
    one = run_ranks(1, "tests.rank_fns:train_report",
                    {"cfg": tiny_config(tmp_path / "w1", runtime={"world_size": 1},
                                        unlearn=sgd), "steps": steps})
    two = run_ranks(2, "tests.rank_fns:train_report",
                    {"cfg": tiny_config(tmp_path / "w2", unlearn=sgd), "steps": steps})
    # Each rank holds about half of every partitioned weight matrix.
    for (shape, full, local0), (_, _, local1) in zip(two[0]["partitions"], two[1]["partitions"]):
        assert local0 == local1 == -(-full // 2), (shape, full, local0, local1)
    assert sum(p[1] for p in two[0]["partitions"]) > 50_000
    # The one-process run holds everything.
    assert all(local == full for _, full, local in one[0]["partitions"])
    # Same loss trajectory and same final weights on 1 and 2 ranks.
    assert len(one[0]["losses"]) == len(two[0]["losses"]) == steps
    assert two[0]["losses"] == two[1]["losses"]
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]),
                               rtol=TOL, atol=TOL)
    assert one[0]["losses"][-1] < one[0]["losses"][0]  # GA lowers ℓ = −nll
    for key, value in one[0]["state"].items():
        torch.testing.assert_close(two[0]["state"][key], value, rtol=1e-4, atol=1e-5)


#: A decaying lr (unlearn.lr_scheduler_type) with a warm-up, so that resuming must restore it.
SCHEDULE = {"lr": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 2}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """6 uninterrupted steps on 2 ranks, exported: the reference of two tests."""
    root = tmp_path_factory.mktemp("full")
    out = run_ranks(2, "tests.rank_fns:train_report",
                    {"cfg": tiny_config(root / "run", unlearn=SCHEDULE), "steps": 6,
                     "export": str(root / "model")})
    return out, root / "model"


def test_resume_continues_the_same_trajectory_and_lr_schedule(tmp_path, full):
    """Each step logs the lr AdamW ran it at: transformers' linear warm-up-then-decay written
    out by hand; a run stopped after 3 of 6 steps resumes the schedule (DeepSpeed checkpoints
    the scheduler) and the trajectory."""
    full, _ = full
    # warm-up k/2 for k < 2, then (6 - k)/(6 - 2): get_linear_schedule_with_warmup
    assert full[0]["lrs"] == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4], abs=1e-12)
    cfg = tiny_config(tmp_path / "split", unlearn=SCHEDULE)
    first = run_ranks(2, "tests.rank_fns:train_report", {"cfg": cfg, "steps": 3, "save": True})
    assert first[0]["resumed_from"] is None
    second = run_ranks(2, "tests.rank_fns:train_report",
                       {"cfg": cfg, "steps": 3, "prepare": False})
    assert second[0]["resumed_from"] == 3
    assert first[0]["lrs"] + second[0]["lrs"] == pytest.approx(full[0]["lrs"], abs=1e-12)
    resumed = first[0]["losses"] + second[0]["losses"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[0]["losses"]),
                               rtol=1e-6, atol=1e-6)
    for key, value in full[0]["state"].items():
        torch.testing.assert_close(second[0]["state"][key], value, rtol=1e-6, atol=1e-6)


def test_export_loads_with_from_pretrained_and_matches(full):
    res, out = full
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 99, 120, 33, 2, 250]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, res[0]["logits"], rtol=1e-5, atol=1e-5)
    # The export carries the trained weights, not the initial ones.
    from u2a_dist.models import build_tiny_model

    init = build_tiny_model(0).eval()
    with torch.no_grad():
        assert not torch.allclose(init(input_ids=ids).logits, logits, atol=1e-4)


def test_grad_norm_is_logged_at_stage_0_as_deepspeed_logs_it_at_stage_3(tmp_path):
    """DeepSpeed keeps no global gradient norm at stage 0 (the metric was NaN there, which reads
    like a divergence): the engine computes it, and it equals what DeepSpeed's ZeRO-3 reports
    for the same steps (SGD: the same trajectory on both stages), before clipping."""
    sgd = {"optimizer": "sgd", "lr": 0.5, "grad_clip": 1.0}
    norms = {}
    for stage in (0, 3):
        ranks = run_ranks(2, "tests.rank_fns:step_metrics", {
            "cfg": tiny_config(tmp_path / f"z{stage}", unlearn=sgd,
                               runtime={"zero_stage": stage}), "steps": 3})
        assert [m["grad_norm"] for m in ranks[0]] == [m["grad_norm"] for m in ranks[1]]
        norms[stage] = [m["grad_norm"] for m in ranks[0]]
    assert all(n > 1.0 for n in norms[0]), norms  # above the clip: the norm before clipping
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[3]), rtol=1e-4,
                               atol=1e-6)
