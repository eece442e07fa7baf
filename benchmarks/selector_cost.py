"""What scoring N negatives costs: directional scores (2 forward passes) vs per-example gradients.

    python benchmarks/selector_cost.py [--models tiny-gpt2,smollm2-135m-instruct]
        [--n 64,256,1024] [--per-example-max 1024] [--k 1,2,4,8,16] [--out DIR]

For each model, in one process (ZeRO-3 engine, world size 1, fp32, CPU or the GPU if any):
builds the trainer on the real negatives (the labelled completions of
``../shared/data/refusal/completions``, 2455 answers, truncated to ``--max-length`` tokens),
computes ``v = (H + δI)⁻¹ ∇J`` once (J = DPO loss on refusal pairs), then times

- ``directional``: s_i = [f_i(θ+εv) − f_i(θ−εv)] / 2ε for the first N negatives (ℓ_i at θ,
  which ``scores.jsonl`` needs, is the midpoint of the two passes; the committed results,
  measured on 2026-11-27, include a third pass that read it), and
- ``per_example_grad``: s_i = ⟨v, ∇f_i⟩ with one backward pass per negative (the paper code's way),

for every N, and reports the ratio and the agreement (Spearman, relative L2) of the two. Then
the Neumann residual ``‖(H+δI)v − ∇J‖/‖∇J‖`` against the number of terms K (α and δ fixed from
one Lanczos run). Results: ``selector_cost.json`` and ``selector_cost.png`` under
``benchmarks/results/``, stamped with hardware, versions and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import spearman, stamp  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _config(model: str, n_max: int, args: argparse.Namespace) -> dict[str, Any]:
    refusal = str(SHARED / "refusal" / "refusal_pairs.jsonl")
    return {
        "model": {"name_or_path": model},
        "data": {"forget": {"path": str(SHARED / "refusal" / "completions"),
                            "schema": "completions", "limit": n_max},
                 "pa": {"path": refusal, "schema": "refusal-pairs", "split": "train",
                        "limit": args.pa_pairs},
                 "max_length": args.max_length},
        "unlearn": {"loss": "ga", "batch_size": args.batch_size, "prox_lambda": 0.1},
        "selector": {"enabled": True, "hessian_batch": args.hessian_batch,
                     "neumann_terms": max(_ints(args.k)), "lanczos_steps": args.power_iters,
                     "neumann_tol": 1e-30},  # every term runs (0 is refused)
        "runtime": {"world_size": 1, "checkpoint_every": 0},
        "eval": {"every": 0, "target": None, "batch_size": args.batch_size},
        "out": str(RESULTS / "selector_cost_run"),
    }


def _per_example_max(spec: str, model: str) -> int:
    if "=" not in spec:
        return int(spec)
    limits = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
    return int(limits.get(model, 1024))


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:

    from u2a_dist.config import config_from_dict
    from u2a_dist.linalg import finite_difference_hvp, neumann_ihvp
    from u2a_dist.selector import directional_scores, per_example_scores, solve_ihvp
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    ns = _ints(args.n)
    cfg = config_from_dict(_config(model, max(ns), args))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, None)
    setup_s = time.perf_counter() - t0
    n_avail = len(trainer.forget)
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    out: dict[str, Any] = {"model": model, "setup_s": round(setup_s, 2), "negatives": n_avail,
                           "params": sum(p.ds_numel for p in trainer.engine.params),
                           "mean_tokens": sum(len(i["input_ids"]) for i in trainer.forget.items)
                           / n_avail}
    t0 = time.perf_counter()
    grad_j, j_value = problem.outer_grad()
    out["grad_J_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    v, stats = solve_ihvp(problem, cfg.selector, grad_j)
    out["ihvp_s"] = round(time.perf_counter() - t0, 3)
    out["ihvp_stats"] = stats
    print(f"[{model}] {out['params']:,} params, {n_avail} negatives, J={j_value:.4f}, "
          f"iHVP {out['ihvp_s']:.1f} s ({stats.get('selector/hvps')} HVPs, residual "
          f"{stats.get('selector/ihvp_residual', float('nan')):.3g})", flush=True)

    rows = []
    for n in ns:
        if n > n_avail:
            print(f"[{model}] N={n}: only {n_avail} negatives, skipped", flush=True)
            continue
        idx = list(range(n))
        t0 = time.perf_counter()
        d, _ = directional_scores(problem, v, idx, cfg.selector.fd_eps)
        d_s = time.perf_counter() - t0
        row: dict[str, Any] = {"n": n, "directional_s": round(d_s, 3)}
        if n <= _per_example_max(args.per_example_max, model):
            t0 = time.perf_counter()
            p, _ = per_example_scores(problem, v, idx)
            p_s = time.perf_counter() - t0
            row.update({"per_example_s": round(p_s, 3), "ratio": round(p_s / d_s, 2),
                        "spearman": round(spearman(d, p), 5),
                        "rel_l2": float((d - p).norm() / p.norm())})
        rows.append(row)
        print(f"[{model}] N={n}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "n"),
              flush=True)
    out["scoring"] = rows

    # Residual against K, measured: one series of K terms per K (α and δ fixed from the Lanczos
    # run above), then one extra HVP for ‖(H+δI)v − ∇J‖/‖∇J‖. `residual_recurrence` is the same
    # quantity from the main series' terms at no cost: with t_k = (I − αA)^k αb and
    # v_K = Σ_{k<K} t_k, A v_K − b = −t_K/α exactly, so it is ‖t_K‖/(α‖b‖).
    alpha, delta = stats.get("selector/alpha"), stats.get("selector/damping")
    lam = problem.analytic_curvature()
    norms = stats.get("selector/ihvp_term_norms", [])

    def matvec(x):
        return finite_difference_hvp(problem.parts(), problem.inner_grad, x, extra_diag=lam)

    ks = []
    if alpha is not None and model not in args.measure_k.split(","):
        ks = [{"k": k, "residual_recurrence": norms[k]} for k in _ints(args.k) if k < len(norms)]
        ks.append({"k": stats["selector/ihvp_terms"], "residual": stats["selector/ihvp_residual"]})
    elif alpha is not None:
        for k in _ints(args.k):
            t0 = time.perf_counter()
            res = neumann_ihvp(matvec, grad_j, k, alpha, delta, tol=0.0)
            ks.append({"k": k, "residual": res.residual, "s": round(time.perf_counter() - t0, 3),
                       "residual_recurrence": norms[k] if k < len(norms) else None})
            print(f"[{model}] K={k}: residual {res.residual:.4f} ({ks[-1]['s']:.1f} s)",
                  flush=True)
    out["residual_vs_k"] = ks
    return out


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        rows = r["scoring"]
        a.plot([x["n"] for x in rows], [x["directional_s"] for x in rows], "o-",
               label=f"{r['model']}: directional")
        pe = [x for x in rows if "per_example_s" in x]
        a.plot([x["n"] for x in pe], [x["per_example_s"] for x in pe], "s--",
               label=f"{r['model']}: per-example grad")
        ks = r["residual_vs_k"]
        rec = [x for x in ks if x.get("residual_recurrence") is not None]
        meas = [x for x in ks if x.get("residual") is not None]
        if meas:
            b.plot([x["k"] for x in meas], [x["residual"] for x in meas], "o-",
                   label=f"{r['model']}: measured")
        if rec:
            b.plot([x["k"] for x in rec], [x["residual_recurrence"] for x in rec], "x:",
                   label=f"{r['model']}: recurrence")
    a.set(xscale="log", yscale="log", xlabel="negatives scored N", ylabel="seconds",
          title="scoring time")
    b.set(yscale="log", xlabel="Neumann terms K", ylabel="‖(H+δI)v − ∇J‖ / ‖∇J‖",
          title="iHVP residual")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-gpt2,smollm2-135m-instruct")
    ap.add_argument("--n", default="64,256,1024")
    ap.add_argument("--per-example-max", default="1024",
                    help="largest N also scored with per-example gradients: one number, or "
                         "MODEL=N,... per model (the rest then take 1024)")
    ap.add_argument("--k", default="1,2,4,8,16", help="Neumann terms for the residual sweep")
    ap.add_argument("--measure-k", default="tiny-gpt2",
                    help="models whose residual is measured for every K (one series each); the "
                         "others report the recurrence residual of the main series")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hessian-batch", type=int, default=16)
    ap.add_argument("--pa-pairs", type=int, default=32)
    ap.add_argument("--power-iters", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not (SHARED / "refusal" / "completions").is_dir():
        ap.error(f"{SHARED}/refusal/completions not found: the benchmark reads the real "
                 "negatives from ../shared/data beside the repository")

    import warnings

    # torch.distributed's deprecation notices fire on every ZeRO-3 collective.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from u2a_dist.engine import init_distributed
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    store = LoopbackStore(1)  # the rendezvous, on 127.0.0.1 only
    os.environ.update(rank_env(0, 1, store.port))
    init_distributed()
    t0 = time.perf_counter()
    results = [bench_model(m.strip(), args) for m in args.models.split(",") if m.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "selector_cost", "wall_seconds": round(time.perf_counter() - t0, 1),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, **stamp(),
              "results": results}
    (out_dir / "selector_cost.json").write_text(json.dumps(record, indent=2, default=float)
                                                + "\n")
    _plot(results, out_dir / "selector_cost.png")
    print(f"-> {out_dir / 'selector_cost.json'}, {out_dir / 'selector_cost.png'}")
    return record


if __name__ == "__main__":
    main()
