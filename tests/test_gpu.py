"""GPU checks (marked ``gpu``; skipped without CUDA): the scaling benchmark's GPU path - the
DeepSpeed engine on CUDA with nccl - computes what the same loop computes on the CPU."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_gpu_path_matches_the_cpu_loop(tmp_path):
    """Tiny model, ZeRO-3, one rank: 2 optimiser steps, then ∇J (the DPO objective's value J),
    the Lanczos spectrum and one selector round, once on CUDA and once with the same loop on the
    CPU. Same seed, same data, fp32: the values agree to float rounding, the GPU run really
    held its parameters on the GPU, and the CUDA allocator's peak is recorded."""
    from benchmarks import scaling

    out = tmp_path / "results"
    scaling.main(["--models", "tiny", "--stages", "3", "--world", "1",
                  "--devices", "gpu,cpu-loop", "--steps", "2", "--repeats", "1",
                  "--data", "builtin", "--n", "8", "--k", "2", "--lanczos", "3",
                  "--round-k", "2", "--round-n", "16", "--fwd-n", "8", "--pa-pairs", "8",
                  "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "scaling.json").read_text())
    by = {c["device"]: c for c in saved["configs"]}
    assert by["gpu"]["ok"] and by["cpu-loop"]["ok"], [c.get("error") for c in by.values()]
    gpu, cpu = by["gpu"], by["cpu-loop"]
    engine = gpu["memory"]["per_rank"][0]["engine"]
    assert engine["param_device"].startswith("cuda"), engine
    assert gpu["memory"]["per_rank"][0]["peak_cuda_bytes"] > engine["param_bytes"]
    assert gpu["selector"]["outer_grad"]["J"] == pytest.approx(
        cpu["selector"]["outer_grad"]["J"], rel=1e-4)
    for key in ("lambda_min", "lambda_max"):
        assert gpu["selector"]["lanczos"][key] == pytest.approx(
            cpu["selector"]["lanczos"][key], rel=0.05, abs=1e-3)
    assert gpu["arch"] == cpu["arch"]
