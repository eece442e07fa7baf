"""A bf16 run's selector against an fp32 run's: what the fp32 twin costs and what it selects.

    python benchmarks/half_precision.py [--model smollm2-135m-instruct] [--world 2]
        [--n 64] [--top-k 16] [--out DIR]

docs/design.md §3: the selector's finite differences perturb θ by about 1% of its RMS, which bf16
weights round away, so a bf16 run's selector runs on an fp32 twin engine (same ZeRO-3
partitions) loaded with the optimizer's fp32 master weights (``Trainer.selector_engine``). For
each precision this runs, in ``--world`` real rank processes (ZeRO-3, CPU or one GPU per rank),
the round-0 selection at θ0: ∇J, the iHVP (Lanczos + Neumann), directional scores of the first
``--n`` negatives; and records each rank's resident memory after the trainer, after the twin
and after the round (with the lifetime peak) and the time of each phase.

The fp32 run is the peer: both select at θ0 (the bf16 run at θ0 rounded to bf16), so their
scores should agree up to that rounding (Spearman, top-k overlap, relative L2), and the bf16
run's extra memory should be the twin's fp32 weights and gradients, 8 bytes per local
parameter (the cost model's term). Results: ``half_precision.{json,md,png}`` under
``benchmarks/results/``, stamped with hardware, versions and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import launch_ranks, spearman, stamp  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
DTYPES = ("float32", "bfloat16")


def _data(n: int, pa_pairs: int) -> dict[str, Any]:
    """The real refusal completions and pairs when ../shared/data has them, else built-ins."""
    refusal = SHARED / "refusal"
    if (refusal / "completions").is_dir() and (refusal / "refusal_pairs.jsonl").is_file():
        return {"forget": {"path": str(refusal / "completions"), "schema": "completions",
                           "limit": n},
                "pa": {"path": str(refusal / "refusal_pairs.jsonl"), "schema": "refusal-pairs",
                       "split": "train", "limit": pa_pairs}}
    return {"forget": {"path": "builtin:harmful", "schema": "completions", "split": "train",
                       "limit": n},
            "pa": {"path": "builtin:all", "schema": "pairs", "split": "train",
                   "limit": pa_pairs}}


def run_config(spec: dict[str, Any], out: str) -> dict[str, Any]:
    return {
        "model": {"name_or_path": spec["model"], "dtype": spec["dtype"]},
        "data": {**_data(spec["n"], spec["pa_pairs"]), "max_length": spec["max_length"]},
        "unlearn": {"loss": "ga", "batch_size": spec["batch_size"], "prox_lambda": 0.1},
        "selector": {"enabled": True, "top_k": spec["top_k"],
                     "hessian_batch": spec["hessian_batch"],
                     "neumann_terms": spec["neumann_terms"], "lanczos_steps": spec["power_iters"],
                     "outer_sample": spec["pa_pairs"]},
        "runtime": {"world_size": spec["world"], "zero_stage": 3, "checkpoint_every": 0,
                    "device": spec["device"], "ds_config": "ds_configs/zero3_cpu.json"},
        "eval": {"every": 0, "target": None, "batch_size": spec["batch_size"]},
        "out": out,
    }


# ---- one rank ---------------------------------------------------------------------------------


def held_bytes(engine: Any) -> int:
    """Bytes of the distinct storages a ZeRO-3 engine holds for this rank's partitions: the
    parameters, ZeRO's fp32 master copy (when separate) and the gradient partitions."""
    opt = engine.ds.optimizer
    tensors = [*engine.local_parts(), *getattr(opt, "fp32_partitioned_groups_flat", [])]
    grads = getattr(opt, "grad_partitions_flat_buffer", None)
    if grads is not None:
        tensors.append(grads)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t.numel()}
    return sum(storages.values())


def rank_main(spec: dict[str, Any], out_path: str) -> None:
    import gc

    import torch

    from benchmarks.instruments import malloc_trim, peak_rss_bytes, read_hwm_rss
    from u2a_dist.config import config_from_dict
    from u2a_dist.engine import init_distributed
    from u2a_dist.selector import directional_scores, solve_ihvp
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    rank, _ = init_distributed(device=spec["device"])
    cfg = config_from_dict(run_config(spec, tempfile.mkdtemp(prefix="u2a-half-")))
    rec: dict[str, Any] = {"rank": rank, "dtype": spec["dtype"], "rss_bytes": {}, "time_s": {}}

    def mark(phase: str, t0: float) -> None:
        gc.collect()
        malloc_trim()  # freed heap back to the OS: the RSS is what is live
        rec["rss_bytes"][phase] = read_hwm_rss()[1]  # the current RSS
        rec["time_s"][phase] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, None)
    mark("trainer", t0)
    t0 = time.perf_counter()
    engine = trainer.selector_engine()  # the twin in a bf16 run (built and loaded here)
    mark("selector_engine", t0)
    t0 = time.perf_counter()
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    grad_j, j_value = problem.outer_grad()
    v, stats = solve_ihvp(problem, cfg.selector, grad_j, seed=cfg.runtime.seed)
    ihvp_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, _ = directional_scores(problem, v, list(range(len(trainer.forget))))
    rec["time_s"]["scores"] = round(time.perf_counter() - t1, 3)
    mark("round", t0)
    rec["time_s"]["ihvp"] = round(ihvp_s, 3)
    rec.update({
        "peak_rss_bytes": peak_rss_bytes(),
        "twin": engine is not trainer.engine,
        "run_dtype": str(trainer.engine.local_parts()[0].dtype),
        "selector_dtype": str(engine.local_parts()[0].dtype),
        "local_params": sum(t.numel() for t in engine.local_parts()),
        "selector_engine_held_bytes": held_bytes(engine),
        "params": sum(p.ds_numel for p in engine.params),
        "negatives": len(trainer.forget), "J": j_value,
        "stats": {k: v for k, v in stats.items() if not isinstance(v, list)},
        "scores": [float(x) for x in scores],
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available()
        else None,
    })
    Path(out_path).write_text(json.dumps(rec))


# ---- the driver -------------------------------------------------------------------------------


def launch(spec: dict[str, Any], timeout: int) -> list[dict[str, Any]]:
    """``spec['world']`` real rank processes (gloo or nccl on 127.0.0.1); their records."""
    ranks, error = launch_ranks("benchmarks.half_precision", spec, spec["world"], timeout,
                                {"OMP_NUM_THREADS": str(spec["threads"])},
                                cpu=spec["device"] == "cpu")
    if ranks is None:
        raise RuntimeError(f"{spec['dtype']}: {error}")
    return ranks


def compare(runs: dict[str, list[dict[str, Any]]], top_k: int) -> dict[str, Any]:
    """Selection agreement (rank 0 holds the scores every rank holds) and memory per rank."""
    import torch

    a, b = runs["float32"][0]["scores"], runs["bfloat16"][0]["scores"]
    k = min(top_k, len(a))
    top_a = set(torch.tensor(a).topk(k).indices.tolist())
    top_b = set(torch.tensor(b).topk(k).indices.tolist())
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    memory = []
    for r32, r16 in zip(runs["float32"], runs["bfloat16"]):
        twin = r16["rss_bytes"]["selector_engine"] - r16["rss_bytes"]["trainer"]
        memory.append({
            "rank": r32["rank"], "predicted_twin_bytes": 8 * r16["local_params"],
            "twin_held_bytes": r16["selector_engine_held_bytes"],
            "twin_build_rss_bytes": twin,
            "round_rss_bf16_minus_fp32": r16["rss_bytes"]["round"] - r32["rss_bytes"]["round"],
            "peak_rss_bf16_minus_fp32": r16["peak_rss_bytes"] - r32["peak_rss_bytes"]})
    return {"spearman": spearman(a, b), "top_k": k, "top_k_overlap": len(top_a & top_b),
            "rel_l2": float((tb - ta).norm() / ta.norm()), "memory": memory}


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if abs(x) >= 1e9 else f"{x / 1e6:.0f} MB"


def markdown(record: dict[str, Any]) -> str:
    c, runs = record["comparison"], record["runs"]
    lines = [f"# bf16 selector against fp32 ({record['date_utc']})", "",
             f"Command: `{record['command']}`", "",
             f"Model {record['spec']['model']}, {runs['float32'][0]['params']:,} parameters; "
             f"ZeRO-3, {record['spec']['world']} ranks on {record['spec']['device']}; "
             f"round-0 selection at θ0 over {runs['float32'][0]['negatives']} negatives.", "",
             "| precision | rank | selector runs in | RSS after trainer | + selector engine "
             "| after the round | peak | ∇J + iHVP | scores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for r in runs[dtype]:
            rss = r["rss_bytes"]
            lines.append(
                f"| {dtype} | {r['rank']} | {r['selector_dtype']}"
                f"{' (twin)' if r['twin'] else ''} | {_gb(rss['trainer'])} "
                f"| {_gb(rss['selector_engine'])} | {_gb(rss['round'])} "
                f"| {_gb(r['peak_rss_bytes'])} | {r['time_s']['ihvp']:.1f} s "
                f"| {r['time_s']['scores']:.1f} s |")
    lines += ["", f"Selection agreement (bf16 run against fp32 run): Spearman "
              f"{c['spearman']:.4f}, top-{c['top_k']} overlap {c['top_k_overlap']}/{c['top_k']}, "
              f"relative L2 {c['rel_l2']:.3g}.", "",
              "| rank | twin predicted (8 B × local params) | held by its engine "
              "| RSS added building it | bf16 − fp32 RSS after the round | bf16 − fp32 peak |",
              "|---|---|---|---|---|---|"]
    for m in c["memory"]:
        lines.append(f"| {m['rank']} | {_gb(m['predicted_twin_bytes'])} "
                     f"| {_gb(m['twin_held_bytes'])} | {_gb(m['twin_build_rss_bytes'])} "
                     f"| {_gb(m['round_rss_bf16_minus_fp32'])} "
                     f"| {_gb(m['peak_rss_bf16_minus_fp32'])} |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    phases = ["trainer", "selector_engine", "round"]
    width = 0.38
    for i, dtype in enumerate(DTYPES):
        r = runs[dtype][0]
        ax1.bar([x + i * width for x in range(len(phases))],
                [r["rss_bytes"][p] / 1e9 for p in phases], width, label=dtype)
    ax1.set_xticks([x + width / 2 for x in range(len(phases))])
    ax1.set_xticklabels(["after trainer", "+ selector engine", "after round 0"])
    ax1.set_ylabel("rank 0 resident memory (GB)")
    ax1.legend()
    ax1.set_title("memory per rank")
    a, b = runs["float32"][0]["scores"], runs["bfloat16"][0]["scores"]
    ax2.scatter(a, b, s=12)
    lo, hi = min(a + b), max(a + b)
    ax2.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax2.set_xlabel("fp32 run: directional score")
    ax2.set_ylabel("bf16 run (fp32 twin): directional score")
    ax2.set_title(f"round-0 scores, Spearman {record['comparison']['spearman']:.3f}")
    fig.suptitle(f"{record['spec']['model']}, ZeRO-3, {record['spec']['world']} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=64, help="negatives scored in round 0")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--pa-pairs", type=int, default=16)
    ap.add_argument("--hessian-batch", type=int, default=8)
    ap.add_argument("--neumann-terms", type=int, default=4)
    ap.add_argument("--power-iters", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--rank-spec", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.rank_spec:
        rank_main(json.loads(args.rank_spec), args.rank_out)
        return {}
    spec = {"model": args.model, "world": args.world, "device": args.device, "n": args.n,
            "top_k": args.top_k, "pa_pairs": args.pa_pairs,
            "hessian_batch": args.hessian_batch, "neumann_terms": args.neumann_terms,
            "power_iters": args.power_iters, "batch_size": args.batch_size,
            "max_length": args.max_length, "threads": args.threads}
    runs = {}
    for dtype in DTYPES:
        t0 = time.perf_counter()
        runs[dtype] = launch({**spec, "dtype": dtype}, args.timeout)
        print(f"[{dtype}] {time.perf_counter() - t0:.0f} s", flush=True)
    record = {"benchmark": "half_precision", **stamp(), "spec": spec, "runs": runs,
              "comparison": compare(runs, args.top_k)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "half_precision.json").write_text(json.dumps(record, indent=1))
    (out / "half_precision.md").write_text(markdown(record))
    plot(record, out / "half_precision.png")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
