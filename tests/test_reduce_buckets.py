"""ZeRO-3's gradient reduce buckets (issue 23): the shipped CPU config reduces a rank's
gradients in buckets of at most a few tens of millions of elements instead of DeepSpeed's
default 5·10⁸ (all of SmolLM2's 134.5 M at once: a whole-model flat copy per pass, 0.54 GB
more resident memory a rank, BENCHMARKS.md). Buckets regroup the same elementwise sums, so a
step with many buckets is the same step, to the bit, as one with a single bucket."""

from __future__ import annotations

import json

import torch

from tests.distributed import run_ranks
from tests.test_retain_terms import _retain_cfg
from u2a_dist.config import config_from_dict
from u2a_dist.engine import build_ds_config, resolve_ds_config_path

DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def _cfg(tmp_path, name: str, bucket: int) -> dict:
    ds = json.loads(resolve_ds_config_path("ds_configs/zero3_cpu.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = bucket
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds))
    # every term of the inner loss (GA, mismatch, retain KL, onset contrast), AdamW
    cfg = _retain_cfg(tmp_path / name, retain_batch_size=6, mismatch_weight=0.5,
                      retain_refusal_tokens=3)
    cfg["runtime"].update({"zero_stage": 3, "ds_config": str(path)})
    return cfg


def test_the_shipped_cpu_config_bounds_the_reduce_bucket(tmp_path) -> None:
    ds = build_ds_config(config_from_dict(_retain_cfg(tmp_path)), 2)
    bucket = ds["zero_optimization"]["reduce_bucket_size"]
    assert 1_000_000 <= bucket <= 50_000_000  # ≤ 0.2 GB of fp32 gradient held for a reduce


def test_a_step_reduced_in_many_buckets_is_the_step_reduced_in_one(tmp_path) -> None:
    one = run_ranks(2, "tests.rank_fns:steps_and_state",
                    {"cfg": _cfg(tmp_path, "one", DEEPSPEED_DEFAULT_BUCKET), "steps": 2})
    many = run_ranks(2, "tests.rank_fns:steps_and_state",
                     {"cfg": _cfg(tmp_path, "many", 3_000), "steps": 2})
    assert [r["reduce_bucket"] for r in one + many] == [DEEPSPEED_DEFAULT_BUCKET] * 2 + [3_000] * 2
    n_params = sum(v.numel() for v in one[0]["state"].values())
    assert n_params > 20 * 3_000  # the tiny model really spans many 3,000-element buckets
    clock = ("time_s", "timing/step_s")
    for a, b in zip(one[0]["metrics"], many[0]["metrics"]):
        assert {k: v for k, v in a.items() if k not in clock} == \
            {k: v for k, v in b.items() if k not in clock}
    assert one[0]["metrics"][1]["loss"] != one[0]["metrics"][0]["loss"]  # θ moved
    for key, value in one[0]["state"].items():
        assert torch.equal(many[0]["state"][key], value), key
