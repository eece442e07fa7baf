"""The scaling benchmark (benchmarks/scaling.py): a small real run in real rank processes (CPU,
gloo on 127.0.0.1) that the cost model calibrates on, and the merges of launches and of runs."""

from __future__ import annotations

import json

import pytest


def test_real_scaling_run_distributes_the_partitions(tmp_path):
    """Tiny model, ZeRO-3, 1 and 2 real rank processes, 2 steps: the per-rank partition and
    optimizer state halve at W = 2, the output has its fields, and the cost model runs on it.
    (About 40 s on 2 loaded cores.)"""
    from benchmarks import cost_model as cm
    from benchmarks import scaling

    out = tmp_path / "results"
    scaling.main(["--models", "tiny", "--stages", "3", "--world", "1,2", "--devices", "cpu,gpu",
                  "--steps", "2", "--repeats", "1", "--data", "builtin", "--n", "8,16",
                  "--k", "1,2", "--lanczos", "2", "--round-k", "2", "--round-n", "16",
                  "--fwd-n", "8", "--pa-pairs", "16", "--threads", "1", "--out", str(out)])
    for name in ("scaling.json", "scaling.md", "scaling.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "scaling.json").read_text())
    for key in ("hardware", "versions", "command", "date_utc", "configs", "settings"):
        assert key in saved, key
    cpu = {c["world"]: c for c in saved["configs"] if c["device"] == "cpu"}
    assert cpu[1]["ok"] and cpu[2]["ok"], [c.get("error") for c in cpu.values()]
    gpu = [c for c in saved["configs"] if c["device"] == "gpu"]
    assert all(c["ok"] or c.get("skipped") for c in gpu)  # skipped cleanly without CUDA
    for c in cpu.values():
        for section in ("step", "grad", "hvp", "forward", "memory", "selector", "arch"):
            assert section in c, section
        assert c["step"]["median_s"] > 0 and c["step"]["tokens_per_s"] > 0
        assert c["hvp"]["ratio_to_grad"] > 0
        assert len(c["memory"]["per_rank"]) == c["world"]
        for m in c["memory"]["per_rank"]:
            assert m["peak_rss_bytes"] > 0 and m["engine"]["param_bytes"] > 0
        sel = c["selector"]
        assert [r["n"] for r in sel["scores_vs_n"]] == [8, 16]
        assert [r["hvps"] for r in sel["neumann_vs_k"]] == [0, 1]
        # The token accounting the cost model reads is what the model really ran (forward
        # pre-hook counts). 16 pairs: ∇J takes unlearn.batch_size (8) pairs per pass, not
        # eval.batch_size (16) - the accounting once assumed 16 and halved the passes at W = 1.
        for section in (c["forward"], sel["outer_grad"], *sel["scores_vs_n"]):
            assert section["counted"] == {"forward_calls": section["micro_batches"],
                                          "tokens": section["padded_tokens"]}, section
        # directional scores: two passes over N (θ ± εv), none at θ itself
        assert all(r["forward_passes"] == 2 for r in sel["scores_vs_n"])
    assert cpu[1]["selector"]["outer_grad"]["micro_batches"] == 2
    for c in cpu.values():  # the tiny model's ranks ran with malloc on huge pages (default)
        assert c["malloc_hugepages"] is True
        assert c["glibc_tunables"] == [scaling.HUGEPAGE_TUNABLE] * c["world"]
    one, two = cpu[1]["memory"]["per_rank"], cpu[2]["memory"]["per_rank"]
    full = cpu[1]["arch"]["params"]
    assert one[0]["engine"]["param_numel"] == full
    for m in two:  # each rank holds half of every parameter (ceil per tensor: tiny padding)
        assert full / 2 <= m["engine"]["param_numel"] <= full / 2 + cpu[2]["arch"]["param_tensors"]
        assert m["engine"]["optimizer_state_bytes"] == pytest.approx(
            one[0]["engine"]["optimizer_state_bytes"] / 2, rel=0.01)
    for m in one + two:  # ZeRO-3's fp32 master: a separate copy of the partition, counted
        e = m["engine"]
        assert e["zero3_master_counted"] and e["master_bytes"] == 4 * e["param_numel"]
    # the collectives counted at W = 2 are the ZeRO-3 formula's 3Φ(W−1)/W per step
    assert cpu[2]["step"]["comm"]["wire_bytes"] == pytest.approx(
        3 * full * 4 / 2, rel=0.01)
    assert cpu[1]["step"]["comm"]["wire_bytes"] == 0

    result = cm.run(out / "scaling.json", out)
    assert (out / "cost_model.json").is_file() and (out / "cost_model.md").is_file()
    assert result["n_configs"] == 2 and result["errors"]
    assert all(r["ok"] for r in result["formula_checks"]), result["formula_checks"]


def test_launches_are_merged_by_the_median_of_their_medians():
    """A configuration launched 3 times: each timing is the median of the 3 launches' medians,
    the ratios and rates are recomputed from them, the CPU share is the median per rank."""
    from benchmarks import scaling

    def launch(t: float, sel: float, shares: list) -> dict:
        def sec(v: float) -> dict:
            return {"median_s": v, "min_s": v / 2, "cpu_per_wall_per_rank": shares,
                    "tokens": 100}

        return {"ok": True, "wall_s": 10.0, "loadavg": {"before": [0.1]}, "step": sec(t),
                "grad": sec(2 * t), "hvp": sec(4 * t), "forward": sec(3 * t),
                "selector": {**{k: {"seconds": sel, "min_s": sel / 2}
                                for k in ("outer_grad", "lanczos", "round")},
                             "neumann_vs_k": [{"k": 1, "seconds": sel, "min_s": sel}],
                             "scores_vs_n": [{"n": 16, "seconds": 2 * sel, "min_s": sel}]}}

    recs = [launch(1.0, 5.0, [1.0, 0.8]), launch(3.0, 1.0, [0.9, None]),
            launch(2.0, 9.0, [0.7, 0.6])]
    out = scaling.merge_launches(recs)
    assert out["step"]["median_s"] == 2.0 and out["step"]["min_s"] == 0.5
    assert out["step"]["launch_medians_s"] == [1.0, 3.0, 2.0]
    assert out["grad"]["median_s"] == 4.0 and out["hvp"]["ratio_to_grad"] == 2.0
    assert out["step"]["tokens_per_s"] == 50.0 and out["forward"]["seconds"] == 6.0
    assert out["step"]["cpu_per_wall_per_rank"] == [0.9, 0.7]  # rank 1: median(0.8, 0.6)
    assert out["selector"]["lanczos"]["seconds"] == 5.0
    assert out["selector"]["lanczos"]["launch_medians_s"] == [5.0, 1.0, 9.0]
    assert out["selector"]["scores_vs_n"][0]["seconds"] == 10.0
    assert out["launches"] == 3 and out["wall_s"] == 30.0
    assert recs[0]["step"]["median_s"] == 1.0  # the launches' own records are untouched
    assert scaling.merge_launches(recs[:1]) == recs[0]
    assert scaling._with_tunable(None, "a=1") == "a=1"
    assert scaling._with_tunable("b=2", "a=1") == "b=2:a=1"  # the caller's own tunables stay


def test_merge_keeps_each_configurations_stamp_and_takes_a_remeasured_one_from_the_later_file():
    """CPU results from one machine and GPU results from another become one scaling record; each
    configuration points at the run that measured it, and a merged record merges again."""
    from benchmarks import scaling

    def record(command: str, gpu: str | None, configs: list[dict]) -> dict:
        return {"benchmark": "scaling", "command": command, "date_utc": "2026-11-28T00:00:00Z",
                "hardware": {"gpu": gpu}, "versions": {}, "settings": {}, "wall_seconds": 10.0,
                "configs": configs}

    def config(model: str, world: int, device: str, seconds: float, **extra) -> dict:
        return {"model": model, "stage": "3", "world": world, "device": device, "ok": True,
                "seconds": seconds, **extra}

    cpu = record("cpu run", None, [config("tiny", 1, "cpu", 1.0), config("tiny", 2, "cpu", 2.0),
                                   {**config("tiny", 1, "gpu", 0.0), "ok": False,
                                    "skipped": "no CUDA device"}])
    again = record("cpu rerun", None, [config("tiny", 2, "cpu", 3.0)])
    gpu = record("gpu run", "NVIDIA H200", [config("big", 1, "gpu", 4.0)])
    merged = scaling.merge_records([cpu, again], ["cpu.json", "again.json"])
    merged = scaling.merge_records([merged, gpu], ["merged.json", "gpu.json"])
    by = {(c["model"], c["world"], c["device"]): c for c in merged["configs"]}
    assert set(by) == {("tiny", 1, "cpu"), ("tiny", 2, "cpu"), ("big", 1, "gpu")}  # no skip
    assert by[("tiny", 2, "cpu")]["seconds"] == 3.0  # the later measurement
    sources = merged["sources"]
    assert [s["command"] for s in sources] == ["cpu run", "cpu rerun", "gpu run"]
    assert sources[by[("tiny", 1, "cpu")]["source"]]["command"] == "cpu run"
    assert sources[by[("tiny", 2, "cpu")]["source"]]["command"] == "cpu rerun"
    assert sources[by[("big", 1, "gpu")]["source"]]["hardware"]["gpu"] == "NVIDIA H200"
    assert merged["wall_seconds"] == 30.0
    with pytest.raises(SystemExit, match="notes.json"):
        scaling.merge_records([{"benchmark": "time_to_target"}], ["notes.json"])

