"""benchmarks/half_precision.py on the tiny model: a bf16 run's selector (the fp32 twin) against
an fp32 run's, in 2 real ZeRO-3 rank processes each."""

from __future__ import annotations

import json


def test_half_precision_benchmark_compares_bf16_selection_with_fp32(tmp_path):
    from benchmarks import half_precision

    record = half_precision.main(["--model", "tiny-gpt2", "--n", "16", "--top-k", "4",
                                  "--pa-pairs", "8", "--max-length", "64",
                                  "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "half_precision.json").read_text())
    assert saved["comparison"] == record["comparison"]
    assert (tmp_path / "half_precision.md").read_text().startswith("# bf16 selector")
    assert (tmp_path / "half_precision.png").stat().st_size > 0
    assert saved["hardware"] and saved["versions"]["deepspeed"] and saved["command"]
    fp32, bf16 = saved["runs"]["float32"], saved["runs"]["bfloat16"]
    assert [r["rank"] for r in fp32] == [r["rank"] for r in bf16] == [0, 1]
    for r in fp32:
        assert not r["twin"] and r["run_dtype"] == r["selector_dtype"] == "torch.float32"
    for r in bf16:
        assert r["twin"] and r["run_dtype"] == "torch.bfloat16"
        assert r["selector_dtype"] == "torch.float32"
        # ZeRO-3 over 2 ranks: each rank's twin holds half of every parameter (+ padding)
        assert r["params"] / 2 <= r["local_params"] <= r["params"] / 2 + 64
    # every rank holds the same scores; the bf16 run selects what the fp32 run selects, up
    # to θ0's rounding to bf16
    assert bf16[0]["scores"] == bf16[1]["scores"] and len(bf16[0]["scores"]) == 16
    c = saved["comparison"]
    assert c["spearman"] >= 0.98 and c["top_k_overlap"] >= 3 and c["rel_l2"] < 0.05
    for m, r in zip(c["memory"], bf16):
        # the twin holds its fp32 partitions and gradient partitions, no master copy
        assert m["predicted_twin_bytes"] == 8 * r["local_params"] == m["twin_held_bytes"]
