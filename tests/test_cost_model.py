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
                             "hvp_vector_s_per_param", "step_overhead_s")}
    c = dataclasses.replace(cm.Constants(**only), flops_per_core=1e9, bandwidth_Bps=math.inf)
    work = cm.grad_work(tokens=1000, micro=1, seq_len=10)
    flops_per_token = 2 * 8e5 + 2 * 10 * 32 * 2                  # matmuls + causal attention
    expected = 3 * flops_per_token * 1000 / 2 / (1e9 * 2)          # fwd+bwd, per rank, 2 threads
    assert cm.predict_time(work, setup, c) == pytest.approx(expected)
    # communication alone: 3u bytes at 1 GB/s, and α per collective
    c2 = dataclasses.replace(cm.Constants(**only), flops_per_core=math.inf, bandwidth_Bps=1e9,
                             latency_s=1e-3, zero3_latency_s=1e-3)
    wire, calls = cm.comm_for(work, setup)
    assert wire == 3 * 1e6 * 4 / 2
    assert cm.predict_time(work, setup, c2) == pytest.approx(wire / 1e9 + 1e-3 * calls)
    # α3 prices ZeRO-3's parameter path: 5 module all-gathers forward, 5 backward, 1
    # reduce-scatter bucket; α the rest (none in a plain gradient pass)
    c3z = dataclasses.replace(c2, bandwidth_Bps=math.inf, latency_s=0.0, zero3_latency_s=1e-3)
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


def test_round_time_is_the_sum_of_its_parts():
    setup, c = cm.Setup("3", 2, TINY), cm.Constants()
    outer = cm.grad_work(4096, 2, 64)
    hvp = cm.hvp_work(512, 1, 64)
    fwd = cm.forward_work(64 * 64, 2, 64)
    total = cm.predict_time(cm.round_work(outer, hvp, 9, fwd), setup, c)
    parts = (cm.predict_time(outer, setup, c) + 9 * cm.predict_time(hvp, setup, c)
             + 3 * cm.predict_time(fwd, setup, c))
    assert total == pytest.approx(parts)
    # an HVP is two gradient passes plus its vector work and two small collectives
    two = 2 * cm.predict_time(cm.grad_work(512, 1, 64), setup, c)
    extra = c.hvp_vector_s_per_param * TINY.params / 2 + 2 * c.latency_s
    assert cm.predict_time(hvp, setup, c) == pytest.approx(two + extra)


def test_memory_formula_by_hand():
    setup = cm.Setup("3", 4, cm.Arch(params=1e8, compute_params=1e8, param_tensors=1,
                                     param_modules=1, layers=1, hidden=8, heads=1, vocab=10))
    c = dataclasses.replace(cm.Constants(), base_memory_bytes=1e9, activation_factor=0.0)
    # engine Φ·12/W + grads 4Φ/W + θ0 4Φ/W = 20Φ/W; an HVP adds 4 vectors of 4Φ/W
    assert cm.predict_memory(setup, "train", c, 0, 0) == pytest.approx(1e9 + 20 * 1e8 / 4)
    assert cm.predict_memory(setup, "hvp", c, 0, 0) == pytest.approx(1e9 + 36 * 1e8 / 4)
    z0 = dataclasses.replace(setup, stage="0")
    assert cm.predict_memory(z0, "train", c, 0, 0) == pytest.approx(1e9 + 20 * 1e8)


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
        for section in (c["forward"], sel["outer_grad"]):
            assert section["counted"] == {"forward_calls": section["micro_batches"],
                                          "tokens": section["padded_tokens"]}, section
    assert cpu[1]["selector"]["outer_grad"]["micro_batches"] == 2
    one, two = cpu[1]["memory"]["per_rank"], cpu[2]["memory"]["per_rank"]
    full = cpu[1]["arch"]["params"]
    assert one[0]["engine"]["param_numel"] == full
    for m in two:  # each rank holds half of every parameter (ceil per tensor: tiny padding)
        assert full / 2 <= m["engine"]["param_numel"] <= full / 2 + cpu[2]["arch"]["param_tensors"]
        assert m["engine"]["optimizer_state_bytes"] == pytest.approx(
            one[0]["engine"]["optimizer_state_bytes"] / 2, rel=0.01)
    # the collectives counted at W = 2 are the ZeRO-3 formula's 3Φ(W−1)/W per step
    assert cpu[2]["step"]["comm"]["wire_bytes"] == pytest.approx(
        3 * full * 4 / 2, rel=0.01)
    assert cpu[1]["step"]["comm"]["wire_bytes"] == 0

    result = cm.run(out / "scaling.json", out)
    assert (out / "cost_model.json").is_file() and (out / "cost_model.md").is_file()
    assert result["n_configs"] == 2 and result["errors"]
    assert all(r["ok"] for r in result["comm_checks"]), result["comm_checks"]
    assert {"7B", "70B"} <= {r["model"] for r in result["projections"]["rows"]}
