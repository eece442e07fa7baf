"""benchmarks/cost_model.py: formulas against the ZeRO paper and hand-counted values, the fit
against constants it must recover, and a run on the committed scaling.json."""

from __future__ import annotations

import json
import random
from itertools import product

import pytest

from benchmarks import cost_model as cm

TINY = cm.Arch(params=157_440, compute_params=124_672, param_tensors=28, param_modules=15,
               layers=2, hidden=64, heads=4, vocab=384)
ZERO = {k: 0.0 for k in cm.TIME_TERMS + cm.MEMORY_TERMS}


def test_zero_formulas_match_the_paper():
    # ZeRO (Rajbhandari et al. 2020), Figure 1: Φ = 7.5B, N = 64, K = 12.
    phi, n = 7.5e9, 64
    assert cm.zero_model_state_bytes(phi, n, 0) == pytest.approx(120e9)
    assert cm.zero_model_state_bytes(phi, n, 1) / 1e9 == pytest.approx(31.4, abs=0.05)
    assert cm.zero_model_state_bytes(phi, n, 2) / 1e9 == pytest.approx(16.6, abs=0.05)
    assert cm.zero_model_state_bytes(phi, n, 3) / 1e9 == pytest.approx(1.875)
    assert cm.zero_model_state_bytes(1000, 4, "3off") == 0
    assert cm.zero_comm_elements(1e9, 8, 0) == pytest.approx(2e9 * 7 / 8)
    assert cm.zero_comm_elements(1e9, 8, 3) == pytest.approx(3e9 * 7 / 8)
    with pytest.raises(ValueError):
        cm.zero_model_state_bytes(1000, 4, 5)


def test_comm_for_tiny_model_matches_the_counted_collectives():
    # What benchmarks/scaling.py counted on the tiny GPT-2 (2 ranks, fp32): u = 4Φ(W−1)/W.
    u = 157_440 * 4 / 2
    step, grad, fwd = cm.train_step_work(512), cm.grad_work(512, 1), cm.forward_work(2048, 1)
    z0, z2, z3 = (cm.Setup(s, 2, TINY) for s in ("0", "2", "3"))
    assert cm.comm_for(step, z3) == (3 * u, 30 + 1 + 4 + 1)  # 2 × 15 gathers, RS, 4 small, 1
    assert cm.comm_for(cm.hvp_work(512, 1), z3) == (6 * u, 64)  # 2 passes + ε, ‖v‖
    assert cm.comm_for(fwd, z3) == (u, 16)
    assert cm.comm_for(grad, cm.Setup("3off", 2, TINY)) == (3 * u, 17)  # coalesced fwd gather
    assert cm.comm_for(step, z0) == (2 * u, 5) and cm.comm_for(fwd, z0) == (0, 1)
    assert cm.comm_for(grad, z2) == (4 * u, 29)  # + full-gradient reads per tensor
    assert cm.comm_for(step, z2) == (5 * u, 34)  # + parameter all-gather and prox
    assert cm.comm_for(step, cm.Setup("3", 1, TINY))[0] == 0


def test_time_formula_by_hand():
    arch = cm.Arch(1e6, 8e5, 10, 5, 2, 32, 2, 100)  # Φ, Φc, tensors, modules, L, d, h, V
    z3, z0 = cm.Setup("3", 2, arch, seq_len=10, threads=2), cm.Setup("0", 2, arch, seq_len=10)
    grad, u = cm.grad_work(tokens=1000, micro=1), 1e6 * 4 / 2

    def t(work: cm.Work, setup: cm.Setup, **c: float) -> float:
        return cm.Observation(setup, work=work).predict({**ZERO, **c})

    # fwd+bwd = 3 forwards of matmuls + causal attention, per rank and thread
    flops = 3 * (2 * 8e5 + 2 * 10 * 32 * 2) * 1000 / 2 / 2
    assert t(grad, z3, s_flop=1e-9) == pytest.approx(1e-9 * flops)
    values = 4 * 100 + 2 * (17 * 32 + 2.5 * 2 * 10)  # 4V + L(17d + 2.5·h·T) per token
    assert t(grad, z3, s_act=1e-9) == pytest.approx(1e-9 * 3 * 1000 / 4 * values)
    # ZeRO-3: 3u on its own path, 5 + 5 module gathers and 1 reduce-scatter; stage 0: 2u
    assert t(grad, z3, s_byte3=1e-9, s_call=1e-3, s_byte=1) == pytest.approx(3 * u / 1e9 + 11e-3)
    assert t(grad, z0, s_byte=1e-9, s_byte3=1) == pytest.approx(2 * u * 1e-9)
    modules = dict(s_fwd=1, s_bwd=10, s_fwd3=100, s_bwd3=1000)
    assert t(grad, z3, **modules) == 5 * 1111 and t(grad, z0, **modules) == 5 * 11
    assert t(cm.forward_work(640, 2), z3, **modules) == 2 * 5 * 101
    # AdamW updates Φ/W under ZeRO-3, Φ at stage 0; FD-HVPs and the random start vector touch
    # a ShardedVector (Φ/W under ZeRO-3)
    step = cm.train_step_work(100)
    assert t(step, z3, s_vec=1e-8) == pytest.approx(5e-3) and t(step, z0, s_vec=1) == 1e6
    assert t(cm.Work(hvps=1, random_vectors=2), z3, s_vec=1, s_rand=10) == 5e5 + 20 * 5e5


def test_memory_formula_by_hand():
    arch = cm.Arch(1e8, 1e8, 1, 1, 1, 8, 1, 10)  # Φ, Φc, tensors, modules, L, d, h, V

    def mem(stage: str, world: int, phase: str, tokens: float = 0, **c: float) -> float:
        setup = cm.Setup(stage, world, arch, seq_len=16)
        return cm.Observation(setup, phase=phase, micro_tokens=tokens).predict({**ZERO, **c})

    # ZeRO-3: engine 16Φ/W (partition, fp32 master, AdamW) + gradients 4Φ/W + θ0 4Φ/W; an HVP
    # adds 4 vectors of 4Φ/W. Stage 0 keeps all whole: engine 12Φ, gradients 4Φ, θ0 4Φ
    assert mem("3", 4, "train", m0=1e9) == pytest.approx(1e9 + 24e8 / 4)
    assert mem("3", 4, "hvp") == pytest.approx(40e8 / 4) and mem("0", 4, "train") == 20e8
    # temporaries: vectors of 4Φ/W; at W > 1 ZeRO-3 also holds ω3·Φ whole; activations: fp32,
    # 4V + L(17d + 2.5·h·T) values per token
    c = dict(temp_vectors=2.0, zero3_full_bytes=8.0, act_factor=0.5)
    act = 4 * 100 * (40 + 17 * 8 + 2.5 * 16)
    assert mem("3", 4, "train", 100, **c) == pytest.approx(32e8 / 4 + 8e8 + 0.5 * act)
    assert mem("3", 1, "train", **c) == pytest.approx(32e8)


def _synthetic(truth: dict[str, float], noise: float, device: str = "cpu", seed: int = 0
               ) -> list[cm.Observation]:
    """Observations the model itself generates, times (1 + noise·N(0, 1))."""
    rng, obs = random.Random(seed), []
    archs = [cm.Arch(p, 0.9 * p, t, m, layers, h, 4, v) for p, t, m, layers, h, v in (
        (1.6e5, 28, 15, 2, 64, 384), (2e7, 100, 40, 8, 256, 1000),
        (1.35e8, 272, 211, 30, 576, 49152))]
    # large and small batches (T: 16, 128 tokens): every term dominates somewhere
    for a, stage, world, seq in product(archs, ("0", "2", "3", "3off"), (1, 2, 4), (16, 128)):
        s, label = cm.Setup(stage, world, a, seq, device=device), f"{a} {stage} {world} {seq}"
        works = (cm.train_step_work(seq * world), cm.grad_work(8 * seq, 2), cm.hvp_work(seq, 1),
                 cm.forward_work(32, 3), cm.Work(random_vectors=1))
        obs += [cm.Observation(s, work=w, config=label) for w in works]
        obs += [cm.Observation(s, phase=ph, micro_tokens=8 * seq, config=label)
                for ph in cm.PHASE_VECTORS]
    for o in obs:
        o.measured = o.predict(truth) * (1 + noise * rng.gauss(0, 1))
    return obs


def test_calibration_recovers_known_constants_and_evaluate_names_the_misses():
    # every constant 3× its prior, but FLOPs 3× cheaper: the memory-bound work then matters,
    # as on the measured CPU, and its constant is determined
    truth = {**{k: 3 * v for k, v in cm.PRIORS["cpu"].items()}, "s_flop": 1.5e-11}
    obs = _synthetic(truth, noise=0.03)
    fitted = cm.calibrate(obs, cm.PRIORS["cpu"])
    for key in truth:
        assert fitted[key] == pytest.approx(truth[key], rel=0.15), key
    assert max(abs(r["rel_error"]) for r in cm.evaluate(obs, {"cpu": fitted})) < 0.15
    obs[7].measured *= 2  # one measurement off: evaluate names it, and only it
    rows = cm.evaluate(obs, {"cpu": fitted})
    assert [i for i, r in enumerate(rows) if not r["ok"]] == [7]
    assert rows[7]["rel_error"] == pytest.approx(-0.5, abs=0.05)  # (predicted − measured)/measured


def test_gpu_constants_are_fitted_apart_from_the_cpu_ones():
    """Two devices' observations from two sets of constants: each gets its own set back."""
    truth = {"cpu": {**cm.PRIORS["cpu"], "s_flop": 3e-11},
             "gpu": {**cm.PRIORS["gpu"], "s_flop": 2.5e-14, "s_fwd3": 6e-4}}
    obs = _synthetic(truth["cpu"], 0.0) + _synthetic(truth["gpu"], 0.0, "gpu")
    fitted = cm.calibrate_devices(obs)
    assert all(fitted[d]["s_flop"] == pytest.approx(truth[d]["s_flop"], rel=0.05) for d in truth)
    assert max(abs(r["rel_error"]) for r in cm.evaluate(obs, fitted)) < 0.05
    one = cm.calibrate(obs, cm.PRIORS["cpu"])
    assert not all(r["ok"] for r in cm.evaluate(obs, {"cpu": one, "gpu": one}))


def test_run_on_the_committed_scaling_json(tmp_path):
    result = cm.run(cm.RESULTS / "scaling.json", tmp_path)
    saved = json.loads((tmp_path / "cost_model.json").read_text())
    assert saved["constants"] == result["constants"] and (tmp_path / "cost_model.md").is_file()
    # the formulas reproduce every counted collective and engine state, unfitted
    assert all(r["ok"] for r in result["formula_checks"]) and len(result["formula_checks"]) > 70
    cpu = [r for r in result["errors"] if r["config"].endswith("cpu")]
    assert len(cpu) > 150 and all(r["ok"] for r in cpu)  # as BENCHMARKS.md reports
    assert set(result["constants"]) == {"cpu", "gpu"} and result["leave_one_out"]
