"""The cost model (benchmarks/cost_model.py) and the scaling benchmark (benchmarks/scaling.py):
formulas against hand-computed values, calibration against constants it must recover, and a
small real scaling run in real rank processes (CPU, gloo on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from benchmarks import cost_model as cm

TINY = cm.Arch(params=157_440, compute_params=124_672, param_tensors=28, param_modules=15,
               layers=2, hidden=64, heads=4, vocab=384)


# ------------------------------------------------------------------ formulas, by hand


def test_zero_model_state_bytes_match_the_paper():
    # ZeRO (Rajbhandari et al. 2020), Figure 1: Φ = 7.5B, N = 64, K = 12.
    phi, n = 7.5e9, 64
    assert cm.zero_model_state_bytes(phi, n, 0) == pytest.approx(120e9)
    assert cm.zero_model_state_bytes(phi, n, 1) == pytest.approx(4 * phi + 12 * phi / 64)
    assert cm.zero_model_state_bytes(phi, n, 1) / 1e9 == pytest.approx(31.4, abs=0.05)
    assert cm.zero_model_state_bytes(phi, n, 2) / 1e9 == pytest.approx(16.6, abs=0.05)
    assert cm.zero_model_state_bytes(phi, n, 3) / 1e9 == pytest.approx(1.875)
    # a known small count: 1000 parameters on 4 devices under ZeRO-3 = 16·1000/4 bytes
    assert cm.zero_model_state_bytes(1000, 4, 3) == 4000
    assert cm.zero_model_state_bytes(1000, 4, "3off") == 0
    with pytest.raises(ValueError):
        cm.zero_model_state_bytes(1000, 4, 5)


def test_zero_communication_volume_is_2_and_3_phi():
    phi = 1e9
    assert cm.zero_comm_elements(phi, 8, 0) == pytest.approx(2 * phi * 7 / 8)
    assert cm.zero_comm_elements(phi, 8, 2) == cm.zero_comm_elements(phi, 8, 0)
    assert cm.zero_comm_elements(phi, 8, 3) == pytest.approx(1.5 * cm.zero_comm_elements(phi, 8, 0))
    assert cm.zero_comm_elements(phi, 1, 3) == 0


def test_comm_for_tiny_model_matches_the_counted_collectives():
    # Hand values = what benchmarks/scaling.py counted on the tiny GPT-2 (2 ranks, fp32):
    # u = Φ·4·(W−1)/W = 314 880 bytes.
    u = 157_440 * 4 / 2
    z3 = cm.Setup("3", 2, TINY)
    step = cm.train_step_work(512, 64)
    assert cm.comm_for(step, z3) == (3 * u, 30 + 1 + 5)     # 2 × 15 all-gathers, 1 RS, 5 small
    grad = cm.grad_work(512, 1, 64)
    assert cm.comm_for(grad, z3) == (3 * u, 31)
    assert cm.comm_for(cm.hvp_work(512, 1, 64), z3) == (6 * u, 64)  # 2 passes + ε, ‖v‖
    assert cm.comm_for(cm.forward_work(2048, 1, 64), z3) == (u, 16)
    z3off = cm.Setup("3off", 2, TINY)
    assert cm.comm_for(grad, z3off) == (3 * u, 17)  # a coalesced forward gather under offload
    z0 = cm.Setup("0", 2, TINY)
    assert cm.comm_for(step, z0) == (2 * u, 5)       # one gradient all-reduce + 4 small
    assert cm.comm_for(cm.forward_work(2048, 1, 64), z0) == (0, 1)
    z2 = cm.Setup("2", 2, TINY)
    assert cm.comm_for(grad, z2) == (4 * u, 29)      # + full-gradient reads per tensor
    assert cm.comm_for(step, z2) == (5 * u, 34)      # + parameter all-gather and prox
    # one rank sends nothing
    assert cm.comm_for(step, cm.Setup("3", 1, TINY))[0] == 0


def test_time_formula_by_hand():
    arch = cm.Arch(params=1e6, compute_params=8e5, param_tensors=10, param_modules=5,
                   layers=2, hidden=32, heads=2, vocab=100)
    setup = cm.Setup("3", 2, arch, threads=2)
    only = {k: 0.0 for k in ("latency_s", "zero3_latency_s", "module_overhead_s",
                             "zero3_module_overhead_s", "optimizer_s_per_param",
                             "hvp_vector_s_per_param", "step_overhead_s",
                             "backward_module_overhead_s", "zero3_backward_module_overhead_s",
                             "sec_per_activation", "random_s_per_param")}
    only["tensorwise_bandwidth_Bps"] = only["zero3_bandwidth_Bps"] = math.inf
    c = dataclasses.replace(cm.Constants(**only), flops_per_core=1e9, bandwidth_Bps=math.inf)
    work = cm.grad_work(tokens=1000, micro=1, seq_len=10)
    flops_per_token = 2 * 8e5 + 2 * 10 * 32 * 2                  # matmuls + causal attention
    expected = 3 * flops_per_token * 1000 / 2 / (1e9 * 2)          # fwd+bwd, per rank, 2 threads
    assert cm.predict_time(work, setup, c) == pytest.approx(expected)
    # communication alone: 3u bytes at 1 GB/s, and α per collective; under ZeRO-3 they are
    # all on the parameter path, priced by B3 (B prices none of them)
    c2 = dataclasses.replace(cm.Constants(**only), flops_per_core=math.inf, bandwidth_Bps=1e3,
                             zero3_bandwidth_Bps=1e9, latency_s=1e-3, zero3_latency_s=1e-3)
    wire, calls = cm.comm_for(work, setup)
    assert wire == 3 * 1e6 * 4 / 2 == cm.zero3_param_wire(work, setup)
    assert cm.predict_time(work, setup, c2) == pytest.approx(wire / 1e9 + 1e-3 * calls)
    z0_wire = cm.comm_for(work, cm.Setup("0", 2, arch))[0]  # the 2u all-reduce: B's
    assert cm.zero3_param_wire(work, cm.Setup("0", 2, arch)) == 0
    assert cm.predict_time(work, cm.Setup("0", 2, arch), dataclasses.replace(
        c2, latency_s=0.0, bandwidth_Bps=1e9, zero3_bandwidth_Bps=1e3)) == pytest.approx(
            z0_wire / 1e9)
    # α3 prices ZeRO-3's parameter path: 5 module all-gathers forward, 5 backward, 1
    # reduce-scatter bucket; α the rest (none in a plain gradient pass)
    c3z = dataclasses.replace(c2, bandwidth_Bps=math.inf, zero3_bandwidth_Bps=math.inf,
                              latency_s=0.0, zero3_latency_s=1e-3)
    assert cm.zero3_param_calls(work, setup) == calls == 11
    assert cm.predict_time(work, setup, c3z) == pytest.approx(11e-3)
    assert cm.zero3_param_calls(work, cm.Setup("2", 2, arch)) == 0
    # per-step terms: o_step + γ·Φ/W under ZeRO-3, γ·Φ at stage 0
    c3 = dataclasses.replace(cm.Constants(**only), flops_per_core=math.inf,
                             bandwidth_Bps=math.inf, optimizer_s_per_param=1e-8,
                             step_overhead_s=0.5)
    step = cm.train_step_work(100, 10)
    assert cm.predict_time(step, setup, c3) == pytest.approx(0.5 + 1e-8 * 5e5)
    assert cm.predict_time(step, cm.Setup("0", 2, arch), c3) == pytest.approx(0.5 + 1e-8 * 1e6)
    # per-module visits: one forward and one backward visit per fwd+bwd micro-batch, ZeRO-3's
    # hook overheads on top; a no-grad forward batch is one forward visit
    c4 = dataclasses.replace(c3, optimizer_s_per_param=0.0, step_overhead_s=0.0,
                             module_overhead_s=1.0, backward_module_overhead_s=10.0,
                             zero3_module_overhead_s=100.0,
                             zero3_backward_module_overhead_s=1000.0)
    assert cm.predict_time(work, setup, c4) == pytest.approx(5 * (1 + 10 + 100 + 1000))
    assert cm.predict_time(work, cm.Setup("0", 2, arch), c4) == pytest.approx(5 * 11)
    fwd = cm.forward_work(tokens=640, batches=2, seq_len=10)
    assert cm.predict_time(fwd, setup, c4) == pytest.approx(2 * 5 * (1 + 100))
    # memory-bound work: μ per activation value, 4V + L(17d + 2.5·h·T) per token, 3× for
    # fwd+bwd, per rank and thread
    c5 = dataclasses.replace(cm.Constants(**only), flops_per_core=math.inf,
                             bandwidth_Bps=math.inf, sec_per_activation=1e-9)
    values = 4 * 100 + 2 * (17 * 32 + 2.5 * 2 * 10)
    assert cm.predict_time(work, setup, c5) == pytest.approx(1e-9 * 3 * 1000 / 2 / 2 * values)
    # the host-drawn random vector: ρ per local element (Φ/W under ZeRO-3)
    c6 = dataclasses.replace(c5, sec_per_activation=0.0, random_s_per_param=1e-9)
    assert cm.predict_time(cm.Work(random_vectors=1), setup, c6) == pytest.approx(1e-9 * 5e5)
    # stage 2's gradient reads go tensor by tensor: 2u of the 4u a gradient pass sends
    z2 = cm.Setup("2", 2, arch)
    c7 = dataclasses.replace(cm.Constants(**only), flops_per_core=math.inf,
                             bandwidth_Bps=math.inf, tensorwise_bandwidth_Bps=1e9)
    u = 1e6 * 4 / 2
    assert cm.comm_for(work, z2)[0] == 4 * u and cm.tensorwise_wire(work, z2) == 2 * u
    assert cm.predict_time(work, z2, c7) == pytest.approx(2 * u / 1e9)


def test_round_time_is_the_sum_of_its_parts():
    setup, c = cm.Setup("3", 2, TINY), cm.Constants()
    outer = cm.grad_work(4096, 2, 64)
    hvp = cm.hvp_work(512, 1, 64)
    fwd = cm.forward_work(64 * 64, 2, 64)
    total = cm.predict_time(cm.round_work(outer, hvp, 9, fwd), setup, c)
    # the scores: 2 forward passes (θ ± εv) and the vector work of perturbing θ; the Lanczos
    # start
    parts = (cm.predict_time(outer, setup, c) + 9 * cm.predict_time(hvp, setup, c)
             + 2 * cm.predict_time(fwd, setup, c) + cm.predict_time(cm.Work(hvps=1), setup, c)
             + cm.predict_time(cm.Work(random_vectors=1), setup, c))
    assert total == pytest.approx(parts)
    # an HVP is two gradient passes plus its vector work and two small collectives
    two = 2 * cm.predict_time(cm.grad_work(512, 1, 64), setup, c)
    extra = c.hvp_vector_s_per_param * TINY.params / 2 + 2 * c.latency_s
    assert cm.predict_time(hvp, setup, c) == pytest.approx(two + extra)


def test_memory_formula_by_hand():
    setup = cm.Setup("3", 4, cm.Arch(params=1e8, compute_params=1e8, param_tensors=1,
                                     param_modules=1, layers=1, hidden=8, heads=1, vocab=10))
    c = dataclasses.replace(cm.Constants(), base_memory_bytes=1e9, activation_factor=0.0,
                            temp_vectors=0.0, zero3_full_bytes_per_param=0.0)
    # engine Φ·16/W (partition, fp32 master copy, Adam) + grads 4Φ/W + θ0 4Φ/W = 24Φ/W; an
    # HVP adds 4 vectors of 4Φ/W
    assert cm.predict_memory(setup, "train", c, 0, 0) == pytest.approx(1e9 + 24 * 1e8 / 4)
    assert cm.predict_memory(setup, "hvp", c, 0, 0) == pytest.approx(1e9 + 40 * 1e8 / 4)
    z0 = dataclasses.replace(setup, stage="0")
    assert cm.predict_memory(z0, "train", c, 0, 0) == pytest.approx(1e9 + 20 * 1e8)
    # τ temporaries: vectors of 4Φ/W; ZeRO-3 at W > 1 holds ω3·Φ unpartitioned (not at W = 1)
    c2 = dataclasses.replace(c, temp_vectors=2.0, zero3_full_bytes_per_param=8.0)
    assert cm.predict_memory(setup, "train", c2, 0, 0) == pytest.approx(
        1e9 + 32 * 1e8 / 4 + 8 * 1e8)
    one = dataclasses.replace(setup, world=1)
    assert cm.predict_memory(one, "train", c2, 0, 0) == pytest.approx(1e9 + 32 * 1e8)
    # on a GPU with offload the states live on the host: the device holds activations only
    off = dataclasses.replace(setup, stage="3off", device="gpu")
    assert cm.predict_memory(off, "hvp", c2, 0, 0) == pytest.approx(1e9)


# ------------------------------------------------------------------ calibration


def _synthetic(truth: cm.Constants, noise: float, seed: int = 0) -> list[cm.Observation]:
    """Observations generated by the model itself, times (1 + noise·N(0,1))."""
    rng = random.Random(seed)
    archs = [cm.Arch(params=p, compute_params=0.9 * p, param_tensors=t, param_modules=m,
                     layers=n_layers, hidden=h, heads=4, vocab=v)
             for p, t, m, n_layers, h, v in ((1.6e5, 28, 15, 2, 64, 384),
                                      (1.35e8, 272, 211, 30, 576, 49152),
                                      (2e7, 100, 40, 8, 256, 1000),
                                      (1e9, 400, 300, 24, 2048, 32000))]
    obs = []
    for arch in archs:
        for stage in ("0", "2", "3", "3off"):
            for world in (1, 2, 4):
                for threads in (1, 2):
                    setup = cm.Setup(stage, world, arch, threads)
                    label = f"{arch.params:.0e} z{stage} W{world} t{threads}"
                    # large and small token counts: every term dominates somewhere
                    works = {"step": cm.train_step_work(512 * world, 64),
                             "step_small": cm.train_step_work(16 * world, 16),
                             "grad": cm.grad_work(512, 2, 64),
                             "hvp": cm.hvp_work(1024, 1, 128),
                             "hvp_small": cm.hvp_work(16 * world, 1, 16),
                             "fwd": cm.forward_work(4096, 3, 64)}
                    for q, w in works.items():
                        t = cm.predict_time(w, setup, truth) * (1 + noise * rng.gauss(0, 1))
                        obs.append(cm.Observation(label, q, setup, t, work=w))
                    for phase, tokens in (("train", 256), ("hvp", 512), ("selector", 1024)):
                        m = cm.predict_memory(setup, phase, truth, tokens, 64)
                        obs.append(cm.Observation(label, f"rss_{phase}", setup,
                                                  m * (1 + noise * rng.gauss(0, 1)),
                                                  phase=phase, micro_tokens=tokens, seq_len=64))
    return obs


def test_calibration_recovers_known_constants_from_noisy_synthetic_measurements():
    prior = cm.Constants()
    truth = dataclasses.replace(
        prior, flops_per_core=7e9, latency_s=9e-4, zero3_latency_s=1.6e-3, bandwidth_Bps=3e8,
        module_overhead_s=2e-4,
        zero3_module_overhead_s=6e-4, optimizer_s_per_param=3e-8, hvp_vector_s_per_param=1e-8,
        step_overhead_s=1.5e-2, base_memory_bytes=6e8, activation_factor=2.5)
    obs = _synthetic(truth, noise=0.03)
    fitted = cm.calibrate(obs, prior)
    for key in ("flops_per_core", "latency_s", "zero3_latency_s", "bandwidth_Bps",
                "module_overhead_s",
                "zero3_module_overhead_s", "optimizer_s_per_param", "hvp_vector_s_per_param",
                "step_overhead_s", "base_memory_bytes", "activation_factor"):
        got, want = getattr(fitted, key), getattr(truth, key)
        assert got == pytest.approx(want, rel=0.15), (key, got, want)
    errors = cm.evaluate(obs, fitted)
    assert all(r["ok"] for r in errors), [r for r in errors if not r["ok"]][:3]
    assert max(abs(r["rel_error"]) for r in errors) < 0.15


def test_calibration_recovers_engine_bytes_per_parameter():
    # fp32 AdamW, as measured on the tiny model: stage 2 keeps whole params (4 B) and
    # partitions Adam + the fp32 master (12 B); stage 3 partitions everything.
    truth = {"0": (12.0, 0.0), "2": (4.0, 12.0), "3": (0.0, 12.0)}
    states = []
    for arch in (TINY, dataclasses.replace(TINY, params=1.35e8)):
        for stage, (r, p) in truth.items():
            for world in (1, 2):
                states.append((cm.Setup(stage, world, arch), arch.params * (r + p / world)))
    c = cm.calibrate_engine_bytes(states, cm.Constants(engine_bytes_per_param={
        "0": [1.0, 1.0], "2": [1.0, 1.0], "3": [1.0, 1.0], "3off": [0.0, 12.0]}))
    for stage, (r, p) in truth.items():
        assert c.engine_bytes_per_param[stage] == pytest.approx([r, p], abs=0.01), stage


def test_evaluate_names_every_miss():
    setup = cm.Setup("3", 2, TINY)
    work = cm.grad_work(512, 1, 64)
    c = cm.Constants()
    t = cm.predict_time(work, setup, c)
    obs = [cm.Observation("a", "grad_s", setup, t, work=work),
           cm.Observation("b", "grad_s", setup, 2 * t, work=work)]
    rows = cm.evaluate(obs, c, tolerance=0.25)
    assert [r["ok"] for r in rows] == [True, False]
    assert rows[1]["rel_error"] == pytest.approx(-0.5)


def test_projections_state_their_memory_and_fit():
    gpu, w = cm.GPU(), cm.Workload()
    r7 = cm.project(cm.PROJECTION_MODELS["7B"], 8, "3", gpu, w)
    # ZeRO-3 model states 16Φ/N
    assert r7["memory_bytes"]["model_states"] == pytest.approx(16 * 6.738e9 / 8)
    assert r7["memory_bytes"]["selector_vectors"] == pytest.approx(28 * 6.738e9 / 8)
    # the bf16 run's fp32 twin for the selector: weights + gradients, 8Φ/N at stage 3
    assert r7["memory_bytes"]["fp32_twin"] == pytest.approx(8 * 6.738e9 / 8)
    assert r7["comm_bytes_per_step"] == pytest.approx(3 * 6.738e9 * 2 * 7 / 8)
    assert r7["comm_bytes_per_hvp"] == pytest.approx(2 * 3 * 6.738e9 * 4 * 7 / 8)
    assert r7["fits"]
    r70 = cm.project(cm.PROJECTION_MODELS["70B"], 8, "3", gpu, w)
    assert not r70["fits"]  # 16Φ/8 alone is 138 GB
    more = cm.project(cm.PROJECTION_MODELS["70B"], 64, "3", gpu, w)
    assert more["fits"] and more["round_s"] < r70["round_s"]
    assert cm.project(cm.PROJECTION_MODELS["7B"], 8, "0", gpu, w)["fits"] is False


# ------------------------------------------------------------------ a real scaling run


def test_real_scaling_run_distributes_the_partitions(tmp_path):
    """Tiny model, ZeRO-3, 1 and 2 real rank processes, 2 steps: the per-rank partition and
    optimizer state halve at W = 2, the output has its fields, and the cost model runs on it.
    (About 40 s on 2 loaded cores.)"""
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
    assert all(r["ok"] for r in result["comm_checks"]), result["comm_checks"]
    assert {"7B", "70B"} <= {r["model"] for r in result["projections"]["rows"]}


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


def test_gpu_constants_are_fitted_apart_from_the_cpu_ones():
    """Observations of a GPU and of a CPU generated from two different sets of constants: the
    per-device calibration recovers each set (one shared set could not fit both)."""
    arch = cm.Arch(params=1.35e8, compute_params=1.35e8, param_tensors=272,
                   param_modules=211, layers=30, hidden=576, heads=9, vocab=49152)
    big = cm.Arch(params=1.7e9, compute_params=1.7e9, param_tensors=218, param_modules=169,
                  layers=24, hidden=2048, heads=32, vocab=49152)
    truth = {"cpu": cm.Constants(flops_per_core=3e10, module_overhead_s=1e-4),
             "gpu": dataclasses.replace(cm.GPU_PRIOR, flops_per_core=4e13,
                                        module_overhead_s=4e-5, zero3_module_overhead_s=6e-4,
                                        step_overhead_s=5e-3)}
    obs = []
    for device, c in truth.items():
        for a in (arch, big):
            for stage in ("0", "3"):
                setup = cm.Setup(stage, 1, a, device=device)
                for tokens in (512, 2048, 8192):
                    for q, work in (("step", cm.train_step_work(tokens, 64)),
                                    ("grad", cm.grad_work(tokens, tokens // 512, 64)),
                                    ("fwd", cm.forward_work(tokens, tokens // 1024 or 1, 64))):
                        label = f"{a.params:.0f} z{stage} {device}"
                        obs.append(cm.Observation(label, f"{q}{tokens}", setup,
                                                  cm.predict_time(work, setup, c), work=work))
    fitted = cm.calibrate_devices(obs)
    assert set(fitted) == {"cpu", "gpu"}
    for device in truth:
        assert fitted[device].flops_per_core == pytest.approx(truth[device].flops_per_core,
                                                              rel=0.05)
    worst = max(abs(r["rel_error"]) for r in cm.evaluate(obs, fitted))
    assert worst < 0.1, worst  # exact data; the weak pull toward the priors costs a few %
    one = cm.calibrate(obs)  # a single set for both devices misses by orders of magnitude
    assert not all(r["ok"] for r in cm.evaluate(obs, one))


def test_process_variance_times_fresh_processes_with_and_without_huge_pages(tmp_path):
    """The probe behind ``scaling.py --malloc-hugepages`` runs: each setting's processes are
    fresh ones, the tunable reaches exactly the huge-page ones, and the spread is reported."""
    from benchmarks import process_variance

    record = process_variance.main(["--models", "tiny", "--processes", "2",
                                    "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "process_variance.json").read_text())
    assert (tmp_path / "process_variance.png").stat().st_size > 0
    assert saved["rows"] == record["rows"] and "hardware" in saved and "command" in saved
    rows = {r["malloc"]: r for r in saved["rows"]}
    assert set(rows) == {"default", "hugepages"}
    for malloc, row in rows.items():
        assert len(row["processes"]) == 2
        tunables = {p["glibc_tunables"] for p in row["processes"]}
        if malloc == "hugepages":
            assert all(t and t.endswith("glibc.malloc.hugetlb=1") for t in tunables)
        else:
            assert all(t is None or "hugetlb" not in t for t in tunables)
        for key in ("forward_s", "fwd_bwd_s"):
            s = row[key]
            assert 0 < s["min"] <= s["median"] <= s["max"]
            assert s["max_over_min"] == pytest.approx(s["max"] / s["min"])
