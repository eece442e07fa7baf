"""GPU checks (marked ``gpu``; skipped without CUDA): the product's Trainer with
``runtime.device: cuda`` trains what it trains on the CPU, and the scaling benchmark, which runs
that Trainer, measures the same values on CUDA (nccl) as on the CPU."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_gpu_path_matches_the_cpu_path(tmp_path):
    """Tiny model, ZeRO-3, one rank: the scaling benchmark's phases (2 optimiser steps, ∇J with
    the DPO objective's value J, the Lanczos spectrum, one selector round), all on the product's
    Trainer and selector problem, once with ``runtime.device=cuda`` and once on the CPU. Same
    seed, same data, fp32: the values agree to float rounding, the GPU run really held its
    parameters on the GPU, and the CUDA allocator's peak is recorded."""
    from benchmarks import scaling

    out = tmp_path / "results"
    scaling.main(["--models", "tiny", "--stages", "3", "--world", "1",
                  "--devices", "gpu,cpu", "--steps", "2", "--repeats", "1",
                  "--data", "builtin", "--n", "8", "--k", "2", "--lanczos", "3",
                  "--round-k", "2", "--round-n", "16", "--fwd-n", "8", "--pa-pairs", "8",
                  "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "scaling.json").read_text())
    by = {c["device"]: c for c in saved["configs"]}
    assert by["gpu"]["ok"] and by["cpu"]["ok"], [c.get("error") for c in by.values()]
    gpu, cpu = by["gpu"], by["cpu"]
    engine = gpu["memory"]["per_rank"][0]["engine"]
    assert engine["param_device"].startswith("cuda"), engine
    assert gpu["memory"]["per_rank"][0]["peak_cuda_bytes"] > engine["param_bytes"]
    assert gpu["selector"]["outer_grad"]["J"] == pytest.approx(
        cpu["selector"]["outer_grad"]["J"], rel=1e-4)
    for key in ("lambda_min", "lambda_max"):
        assert gpu["selector"]["lanczos"][key] == pytest.approx(
            cpu["selector"]["lanczos"][key], rel=0.05, abs=1e-3)
    assert gpu["arch"] == cpu["arch"]


def _recipe_run(tmp_path, device: str, stage: int, dtype: str = "float32"
                ) -> tuple[list[dict], list[dict]]:
    """The whole product path on one rank (`u2a run`, local launcher): the recipe's inner loss
    (NPO + mismatch + retain KL on θ0's own answers + prox), a U2A selection round with the
    Neumann iHVP and directional scores, PA and generation metrics every 2 steps."""
    import yaml

    from tests.conftest import tiny_config
    from u2a_dist.cli import main

    run = tmp_path / f"{device}-z{stage}-{dtype}"
    cfg = tiny_config(
        run, model={"name_or_path": "tiny-gpt2", "dtype": dtype},
        data={"forget": {"path": "builtin:harmful", "schema": "completions", "split": "train",
                         "limit": 12},
              "retain": {"path": "builtin:harmless", "schema": "prompts", "split": "train",
                         "limit": 4},
              "mismatch": {"path": "builtin:refusal_templates", "schema": "completions"}},
        unlearn={"loss": "npo", "steps": 4, "batch_size": 4, "retain_kl_weight": 1.0,
                 "mismatch_weight": 0.5},
        selector={"enabled": True, "top_k": 8, "rounds": 1, "steps_per_round": 2,
                  "hessian_batch": 8, "neumann_terms": 3, "power_iters": 3,
                  "outer_sample": 8},
        runtime={"world_size": 1, "zero_stage": stage, "device": device,
                 "checkpoint_every": 0},
        eval={"every": 2, "target": None, "batch_size": 4, "max_new_tokens": 6,
              "harmful_prompts": {"path": "builtin:harmful", "schema": "prompts",
                                  "split": "eval", "limit": 4},
              "harmless_prompts": {"path": "builtin:harmless", "schema": "prompts",
                                   "split": "eval", "limit": 4}})
    path = tmp_path / f"{device}-z{stage}-{dtype}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path), "--launcher", "local"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [json.loads(x) for x in (run / "scores.jsonl").read_text().splitlines()]
    return metrics, scores


@pytest.mark.parametrize("stage", [0, 3])
def test_trainer_on_cuda_matches_the_trainer_on_the_cpu(tmp_path, stage):
    """`runtime.device: cuda` trains the same run as `cpu`: per-step losses, the selector's
    spectrum and scores, and the evaluation metrics agree to float rounding (fp32; the GPU's
    reductions differ in order only)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu_m, gpu_s = _recipe_run(tmp_path, "cuda", stage)
    cpu_m, cpu_s = _recipe_run(tmp_path, "cpu", stage)
    assert [m.get("step") for m in gpu_m] == [m.get("step") for m in cpu_m]
    keys = ("loss", "loss/unlearn", "loss/retain_kl", "loss/prox", "selector/J",
            "selector/lambda_max", "pa/margin", "eval/retain_ppl")
    compared = 0
    for g, c in zip(gpu_m, cpu_m):
        for key in keys:
            if key in c:
                assert g[key] == pytest.approx(c[key], rel=2e-3, abs=1e-4), (g["step"], key)
                compared += 1
    assert compared >= 12
    assert [s["index"] for s in gpu_s] == [s["index"] for s in cpu_s]
    tol = 0.02 * max(abs(s["score"]) for s in cpu_s)
    for g, c in zip(gpu_s, cpu_s):
        assert g["score"] == pytest.approx(c["score"], abs=tol)
    # the same support and weights, unless the k-th and (k+1)-th scores tie within rounding.
    # The weights follow the scores smoothly: round 1 selects after two steps whose reductions
    # ran in another order, and on an H200 (2026-12-04) its weights differed by up to 2.6e-6
    # (2.1e-5 relative) from the CPU's, so abs=1e-6 failed; rel=1e-4 keeps 5x that margin.
    first = sorted((s["score"] for s in cpu_s if s["round"] == 0), reverse=True)
    if first[7] - first[8] > 2 * tol:
        assert [g["weight"] for g in gpu_s] == pytest.approx([c["weight"] for c in cpu_s],
                                                             rel=1e-4, abs=1e-6)


def test_bf16_selector_on_cuda_matches_the_cpu(tmp_path):
    """A bf16 run's selector (design.md §3: an fp32 twin loaded with the master weights) on CUDA
    against the same run on the CPU. Round 0 selects at θ0 rounded to bf16 on both devices, in
    fp32 on both, so its scores agree as the fp32 runs' do; finite differences on the bf16
    weights would be rounding noise. Training is bf16 and may differ in rounding after that."""
    import math

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu_m, gpu_s = _recipe_run(tmp_path, "cuda", 3, "bfloat16")
    cpu_m, cpu_s = _recipe_run(tmp_path, "cpu", 3, "bfloat16")
    g0 = [s for s in gpu_s if s["round"] == 0]
    c0 = [s for s in cpu_s if s["round"] == 0]
    assert [s["index"] for s in g0] == [s["index"] for s in c0] and len(c0) == 12
    tol = 0.02 * max(abs(s["score"]) for s in c0)
    assert tol > 0
    for g, c in zip(g0, c0):
        assert g["score"] == pytest.approx(c["score"], abs=tol)
    for m in gpu_m + cpu_m:
        assert all(math.isfinite(v) for k, v in m.items() if k.startswith("loss"))
