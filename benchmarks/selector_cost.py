"""What scoring N negatives costs: directional scores (2 forward passes) vs per-example gradients.

    python benchmarks/selector_cost.py [--models tiny-gpt2,smollm2-135m-instruct]
        [--n 64,256,1024] [--out DIR]

Per model, in one process (the product's ``Trainer``, world size 1, fp32) on the real negatives
(``../shared/data/refusal/completions``): ``v = (H + δI)⁻¹ ∇J`` once (J = DPO loss on refusal
pairs; Lanczos, then Neumann), then the time to score the first N negatives along v,
``directional`` (s_i = [f_i(θ+εv) − f_i(θ−εv)]/2ε) against ``per_example_grad`` (⟨v, ∇f_i⟩, a
backward pass each, the paper code's way; up to ``PER_EXAMPLE_MAX``), and their agreement;
``residual_vs_k``: ‖(H+δI)v − ∇J‖/‖∇J‖ after K Neumann terms, read off the series. Writes
``selector_cost.json`` to ``--out`` (``benchmarks/results/``), stamped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, spearman, stamp  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
#: Per-example gradients take 2.44 s a negative on SmolLM2 (2 CPU cores): N = 64 at most there.
PER_EXAMPLE_MAX = {"smollm2-135m-instruct": 64}


def _config(model: str, n_max: int) -> dict[str, Any]:
    pairs = str(SHARED / "refusal" / "refusal_pairs.jsonl")
    return {
        "model": {"name_or_path": model},
        "data": {"forget": {"path": str(SHARED / "refusal" / "completions"),
                            "schema": "completions", "limit": n_max},
                 "pa": {"path": pairs, "schema": "refusal-pairs", "split": "train", "limit": 32},
                 "max_length": 64},
        "unlearn": {"loss": "ga", "batch_size": 16, "prox_lambda": 0.1},
        "selector": {"enabled": True, "hessian_batch": 16, "neumann_terms": 16,
                     "lanczos_steps": 10, "neumann_tol": 1e-30},  # every term runs (0: refused)
        "runtime": {"world_size": 1, "checkpoint_every": 0},
        "eval": {"every": 0, "target": None, "batch_size": 16},
    }  # no run directory: Trainer(cfg, None)


def _timed(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - t0, 3)


def bench_model(model: str, ns: list[int]) -> dict[str, Any]:
    from u2a_dist.config import config_from_dict
    from u2a_dist.selector import directional_scores, per_example_scores, solve_ihvp
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    raw = _config(model, max(ns))
    cfg = config_from_dict(raw)
    trainer, setup_s = _timed(Trainer, cfg, None)
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    (grad_j, j_value), grad_s = _timed(problem.outer_grad)
    (v, stats), ihvp_s = _timed(solve_ihvp, problem, cfg.selector, grad_j)
    out: dict[str, Any] = {"model": model, "config": raw, "negatives": len(trainer.forget),
                           "params": sum(p.ds_numel for p in trainer.engine.params),
                           "setup_s": setup_s, "grad_J_s": grad_s, "ihvp_s": ihvp_s,
                           "ihvp_stats": stats, "scoring": [],
                           "residual_vs_k": stats["selector/ihvp_term_norms"]}  # index: K
    print(f"[{model}] {out['params']:,} params, J={j_value:.4f}, iHVP {ihvp_s:.1f} s, "
          f"residual {stats['selector/ihvp_residual']:.3g}", flush=True)
    for n in [n for n in ns if n <= out["negatives"]]:
        (d, _), d_s = _timed(directional_scores, problem, v, list(range(n)), cfg.selector.fd_eps)
        row: dict[str, Any] = {"n": n, "directional_s": d_s}
        if n <= PER_EXAMPLE_MAX.get(model, 1024):
            (p, _), p_s = _timed(per_example_scores, problem, v, list(range(n)))
            row.update(per_example_s=p_s, ratio=round(p_s / d_s, 2),
                       spearman=round(spearman(d, p), 5), rel_l2=float((d - p).norm() / p.norm()))
        out["scoring"].append(row)
        print(f"[{model}] " + ", ".join(f"{k}={x}" for k, x in row.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-gpt2,smollm2-135m-instruct")
    ap.add_argument("--n", default="64,256,1024", help="negatives scored, comma-separated")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed's, per call
    from u2a_dist.engine import init_distributed
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    store = LoopbackStore(1)  # the rendezvous, on 127.0.0.1 only
    os.environ.update(rank_env(0, 1, store.port))
    init_distributed()
    ns = [int(x) for x in args.n.split(",")]
    results, wall = _timed(lambda: [bench_model(m, ns) for m in args.models.split(",")])
    record = {"benchmark": "selector_cost", "wall_seconds": wall,
              "settings": {"n": ns, "per_example_max": PER_EXAMPLE_MAX}, **stamp(),
              "results": results}
    out = Path(args.out) / "selector_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"-> {out}")
    return record


if __name__ == "__main__":
    main()
