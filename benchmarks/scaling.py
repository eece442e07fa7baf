"""Scaling of u2a-dist: step time, tokens/s, memory and communication per rank, by ZeRO stage,
world size, model and device; HVP cost over gradient cost; selector time against N and K.

    python benchmarks/scaling.py [--models tiny,smollm2] [--stages 0,2,3,3off] [--world 1,2]
        [--devices cpu,gpu] [--steps 3] [--selector-stages 3] [--n 16,64,256] [--k 1,2,4,8]
        [--out DIR] [--shared-data DIR]
    python benchmarks/scaling.py --merge A.json,B.json,... [--out DIR]

Every configuration runs in its own W real rank processes (gloo on 127.0.0.1, the launcher's
rendezvous store; nccl with one GPU per rank on ``gpu``). Each rank builds the product's own
``Trainer`` (``runtime.device`` cpu or cuda; DeepSpeed engine at that stage, fp32, AdamW, GA on
the real negatives of ``../shared/data/refusal/completions``, J = DPO on the refusal pairs) and
the selector's ``TrainerProblem`` on it, and measures, one phase after the other:

- ``step``: ``--steps`` calls of ``Trainer.train_step`` after one warm-up step;
- ``grad`` / ``hvp``: ``TrainerProblem.inner_grad`` on the Hessian batch and one
  finite-difference HVP (2 gradient passes, θ restored), ``--repeats`` times each;
- ``forward``: ``TrainerProblem.example_losses`` over ``--fwd-n`` negatives;
- ``selector`` (stages in ``--selector-stages``): ∇J over the P pairs, the Lanczos estimate
  (L HVPs), the Neumann series for every K in ``--k``, directional scores for every N in
  ``--n`` and one whole round (``selector.hypergradients``), ``--sweep-repeats`` times each;
- memory: each rank's resident-set high-water mark per phase (``VmHWM``, reset between phases
  after ``malloc_trim``; on a GPU the CUDA allocator's peak too) and the engine's own state;
- communication: every ``torch.distributed`` collective, DeepSpeed's included, with the bytes
  each rank sends under ring algorithms; the forward calls and tokens each phase really ran.

Times are the median over the repeats, from the slowest rank. ``--launches R`` runs each
configuration R times in fresh processes (timings: the median of the launches' medians): one
launch is one sample of the processes, not of the machine (BENCHMARKS.md). The ranks of the
models in ``--malloc-hugepages`` (default: tiny, whose working set fits in the caches) get
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which merges the fast and slow groups of fresh
processes that ``benchmarks/process_variance.py`` shows. ``stage 3off``: ZeRO-3 with
parameters and optimizer states offloaded to the CPU (``ds_configs/zero3_offload.json``).
``random:smollm2-135m|360m|1.7b`` time a checkpoint's shape with random weights.

``--merge`` makes one record of several runs' ``scaling.json`` (the CPU runs here, the GPU
runs of ``benchmarks/gpu_run.sh`` on a lent machine), each configuration keeping its run's
stamp. Writes ``scaling.{json,md,png}`` under ``--out`` (default ``benchmarks/results``);
``benchmarks/cost_model.py`` calibrates on ``scaling.json``.
"""

from __future__ import annotations

import argparse
import copy
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

from benchmarks.common import launch_ranks, stamp  # noqa: E402
from benchmarks.instruments import (  # noqa: E402
    CommCounter,
    ForwardCounter,
    Phases,
    engine_state,
    median,
    model_shape,
)

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"tiny": "tiny-gpt2", "smollm2": "smollm2-135m-instruct"}
#: stage key -> (ZeRO stage, DeepSpeed JSON; the stage is applied on top by build_ds_config)
STAGES = {"0": (0, "ds_configs/zero3_cpu.json"), "1": (1, "ds_configs/zero3_cpu.json"),
          "2": (2, "ds_configs/zero3_cpu.json"), "3": (3, "ds_configs/zero3_cpu.json"),
          "3off": (3, "ds_configs/zero3_offload.json")}
#: --devices name -> runtime.device; every device runs the product's Trainer.
DEVICES = {"cpu": "cpu", "gpu": "cuda"}
#: glibc's tunable that backs malloc's heap with transparent huge pages (glibc >= 2.35).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
TIMED = ("step", "grad", "hvp", "forward")


def _with_tunable(current: str | None, tunable: str) -> str:
    """GLIBC_TUNABLES with ``tunable`` added to what the caller's environment already sets."""
    return f"{current}:{tunable}" if current else tunable


# =============================================================================================
# one rank
# =============================================================================================


def rank_config(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    stage, ds_config = STAGES[spec["stage"]]
    if spec["data"] == "refusal":
        shared = Path(spec["shared_data"]) / "refusal"
        forget = {"path": str(shared / "completions"), "schema": "completions"}
        pa = {"path": str(shared / "refusal_pairs.jsonl"), "schema": "refusal-pairs"}
    else:  # the built-in demo data: no files needed (tests)
        forget = {"path": "builtin:harmful", "schema": "completions"}
        pa = {"path": "builtin:all", "schema": "pairs"}
    return {
        "model": {"name_or_path": MODELS.get(spec["model"], spec["model"])},
        "data": {"forget": {**forget, "limit": spec["n_forget"]},
                 "pa": {**pa, "split": "train", "limit": spec["pa_pairs"]},
                 "max_length": spec["max_length"]},
        "unlearn": {"loss": "ga", "lr": 1e-5, "steps": 10**6, "batch_size": spec["batch_size"],
                    "prox_lambda": 0.1},
        # neumann_tol: as good as 0 (every term runs), which the config refuses
        "selector": {"enabled": True, "hessian_batch": spec["hessian_batch"],
                     "lanczos_steps": spec["lanczos"], "neumann_terms": spec["round_k"],
                     "neumann_tol": 1e-30},
        "runtime": {"world_size": spec["world"], "zero_stage": stage, "ds_config": ds_config,
                    "checkpoint_every": 0, "seed": 0, "device": DEVICES[spec["device"]]},
        "eval": {"every": 0, "target": None, "batch_size": spec["eval_batch_size"]},
        "out": str(Path(out_dir) / "run"),
    }


def rank_main(spec: dict[str, Any], out_path: str) -> dict[str, Any]:
    """One rank of one configuration: every phase, written to ``out_path`` as JSON."""
    counter = CommCounter()
    counter.install()  # before DeepSpeed captures the torch.distributed functions
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from u2a_dist.config import config_from_dict
    from u2a_dist.engine import init_distributed
    from u2a_dist.linalg import ShardedVector, finite_difference_hvp
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    device = DEVICES[spec["device"]]
    rank, world = init_distributed(timeout_s=spec["timeout"], device=device)
    phases = Phases(counter, gpu=device == "cuda")
    cfg = config_from_dict(rank_config(spec, str(Path(out_path).parent)))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, None)
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    model = problem.engine.module
    rec: dict[str, Any] = {"rank": rank, "world": world, "pid": os.getpid(),
                           "torch_threads": torch.get_num_threads(),
                           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                           "setup_s": time.perf_counter() - t0, "arch": model_shape(model),
                           "n_forget": len(trainer.forget),
                           "memory": {"setup": phases.memory_mark()}}

    def measure(fn: Any, times: int) -> tuple[Any, dict[str, Any]]:
        fwd = ForwardCounter(model)
        result, section = phases.repeat(fn, times)
        return result, {**section, "counted": fwd.close(max(1, times))}

    _, warm = phases.repeat(trainer.train_step)
    _, rec["step"] = measure(trainer.train_step, spec["steps"])
    rec["step"]["warmup_s"] = warm["median_s"]
    rec["engine_state"] = engine_state(trainer.engine)
    rec["memory"]["train"] = phases.memory_mark()

    v = ShardedVector.random_like(problem.zeros(), 7)
    v.scale_(1.0 / v.norm())
    lam = problem.analytic_curvature()

    def hvp() -> Any:
        return finite_difference_hvp(problem.parts(), problem.inner_grad, v, extra_diag=lam)

    hvp()  # warm-up: the first passes allocate what later ones reuse
    _, rec["grad"] = measure(problem.inner_grad, spec["repeats"])
    _, rec["hvp"] = measure(hvp, spec["repeats"])
    rec["memory"]["hvp"] = phases.memory_mark()
    fwd_idx = list(range(min(spec["fwd_n"], len(trainer.forget))))
    _, rec["forward"] = measure(lambda: problem.example_losses(fwd_idx), spec["repeats"])
    rec["forward"]["n"] = len(fwd_idx)
    if spec["selector"]:
        rec["selector"] = selector_phases(spec, trainer, problem, phases)
        rec["memory"]["selector"] = phases.memory_mark()
    # Resetting VmHWM resets ru_maxrss too: the lifetime peak is the highest phase mark.
    rec["peak_rss_bytes"] = max(m["hwm_bytes"] for m in rec["memory"].values())
    if phases.gpu:
        rec["peak_cuda_bytes"] = max(m["cuda_peak_bytes"] for m in rec["memory"].values())
    Path(out_path).write_text(json.dumps(rec, indent=1, default=float) + "\n")
    return rec


def selector_phases(spec: dict[str, Any], trainer: Any, problem: Any, phases: Phases
                    ) -> dict[str, Any]:
    """∇J, Lanczos, Neumann(K) for each K, directional scores for each N, one whole round."""
    import dataclasses

    from u2a_dist.linalg import (
        extreme_eigenvalues,
        finite_difference_hvp,
        neumann_ihvp,
        resolve_damping_and_alpha,
    )
    from u2a_dist.selector import SCORE_FORWARD_PASSES, directional_scores, hypergradients

    cfg, model, reps, hvps = trainer.cfg, problem.engine.module, spec["sweep_repeats"], [0]
    lam = problem.analytic_curvature()

    def matvec(x: Any) -> Any:
        hvps[0] += 1
        return finite_difference_hvp(problem.parts(), problem.inner_grad, x, extra_diag=lam)

    def timed(fn: Any, count: bool = False) -> tuple[Any, dict[str, Any]]:
        hvps[0] = 0
        fwd = ForwardCounter(model) if count else None
        result, t = phases.repeat(fn, reps)
        out = {"seconds": t["median_s"], "min_s": t["min_s"], "hvps": hvps[0] // reps,
               "comm_wire_bytes": t["comm"]["wire_bytes"], "comm_calls": t["comm"]["calls"]}
        if fwd is not None:
            out["counted"] = fwd.close(reps)
        return result, out

    (grad_j, j_value), og = timed(problem.outer_grad, count=True)
    out: dict[str, Any] = {"outer_grad": {**og, "pairs": len(problem.outer_indices()),
                                          "J": j_value, "reference_pass_timed": False}}
    (lo, hi), out["lanczos"] = timed(
        lambda: extreme_eigenvalues(matvec, grad_j, iters=spec["lanczos"], seed=0))
    delta, alpha = resolve_damping_and_alpha(lo, hi)
    out["lanczos"].update(lambda_min=lo, lambda_max=hi, damping=delta, alpha=alpha)
    ks, v = [], grad_j
    for k in spec["k"]:
        res, row = timed(lambda k=k: neumann_ihvp(matvec, grad_j, k, alpha, delta, tol=0.0,
                                                  compute_residual=False))
        ks.append({"k": k, **row})
        v = res.v
    out["neumann_vs_k"] = ks
    # warm-up (the first scoring pass allocates the perturbation's buffers and, on a GPU, picks
    # kernels for new shapes), counted: it is the round's scoring
    n_round = min(spec["round_n"], len(trainer.forget))
    fwd = ForwardCounter(model)
    directional_scores(problem, v, list(range(n_round)), cfg.selector.fd_eps)
    round_counted = fwd.close()
    ns = []
    for n in (n for n in spec["n"] if n <= len(trainer.forget)):
        _, row = timed(lambda n=n: directional_scores(problem, v, list(range(n)),
                                                      cfg.selector.fd_eps), count=True)
        ns.append({"n": n, "forward_passes": SCORE_FORWARD_PASSES, **row})
    out["scores_vs_n"] = ns
    sel = dataclasses.replace(cfg.selector, neumann_terms=spec["round_k"],
                              lanczos_steps=spec["lanczos"], neumann_tol=0.0)
    hg, r = timed(lambda: hypergradients(problem, sel, list(range(n_round))))
    out["round"] = {**r, "n": n_round, "k": spec["round_k"], "lanczos_iters": spec["lanczos"],
                    "pairs": out["outer_grad"]["pairs"],
                    "score_forward_passes": SCORE_FORWARD_PASSES, "score_counted": round_counted,
                    "hvps": hg.stats.get("selector/hvps"), "ihvp_s": hg.stats.get("timing/ihvp_s"),
                    "score_s": hg.stats.get("timing/score_s"),
                    "residual": hg.stats.get("selector/ihvp_residual")}
    return out


# =============================================================================================
# the driver: launches, and their merge into one record per configuration
# =============================================================================================


def _config_key(spec: dict[str, Any]) -> dict[str, Any]:
    stage, ds_config = STAGES[spec["stage"]]
    return {"model": spec["model"], "model_name": MODELS.get(spec["model"], spec["model"]),
            "stage": spec["stage"], "zero_stage": stage, "offload": spec["stage"] == "3off",
            "ds_config": ds_config, "world": spec["world"], "device": spec["device"],
            "malloc_hugepages": bool(spec.get("malloc_hugepages"))}


def run_config(spec: dict[str, Any], timeout: int, keep_logs: Path | None = None
               ) -> dict[str, Any]:
    """One configuration in ``spec['world']`` rank processes; their records merged."""
    env = {"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {}
    if spec.get("malloc_hugepages"):
        env["GLIBC_TUNABLES"] = _with_tunable(os.environ.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    ranks, error = launch_ranks("benchmarks.scaling", spec, spec["world"], timeout, env,
                                cpu=DEVICES[spec["device"]] == "cpu", keep_logs=keep_logs)
    wall = round(time.perf_counter() - t0, 1)
    # the machine's 1/5/15-min load: other work skews the times
    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()]}
    if ranks is None:
        return {**_config_key(spec), "ok": False, "wall_s": wall, "loadavg": load,
                "error": error.splitlines()[0], "log_tail": {"0": error}}
    return {**merge_ranks(spec, ranks), "wall_s": wall, "loadavg": load}


def _counted(dst: dict[str, Any], counts: list[dict[str, float]], prefix: str = "") -> None:
    """The ranks' forward counts as a section's global accounting: micro-batches per rank (the
    most any rank ran) and padded tokens summed over the ranks (what the cost model reads)."""
    calls, tokens = max(c["forward_calls"] for c in counts), sum(c["tokens"] for c in counts)
    dst[f"{prefix}micro_batches"], dst[f"{prefix}padded_tokens"] = calls, tokens
    dst[f"{prefix}counted"] = {"forward_calls": calls, "tokens": tokens}


def _derive_rates(out: dict[str, Any]) -> None:
    """tokens/s, HVP over gradient pass, and the forward's ``seconds`` from the phase times."""
    out["forward"]["seconds"] = out["forward"]["median_s"]
    out["step"]["tokens_per_s"] = out["step"]["tokens"] / out["step"]["median_s"]
    out["hvp"]["ratio_to_grad"] = out["hvp"]["median_s"] / out["grad"]["median_s"]
    out["hvp"]["ratio_to_grad_min"] = out["hvp"]["min_s"] / out["grad"]["min_s"]


def merge_ranks(spec: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per configuration: times from the slowest rank (the ranks run in lock-step),
    tokens global, memory and engine state per rank."""
    r0 = ranks[0]
    out: dict[str, Any] = {**_config_key(spec), "ok": True,
                           "setup_s": max(r["setup_s"] for r in ranks), "arch": r0["arch"],
                           "n_forget": r0["n_forget"], "torch_threads": r0["torch_threads"],
                           "glibc_tunables": [r["glibc_tunables"] for r in ranks]}
    for name in TIMED:
        sec = out[name] = {k: v for k, v in r0[name].items() if k != "counted"}
        for key in ("median_s", "min_s"):
            sec[key] = max(r[name][key] for r in ranks)
        sec["cpu_per_wall_per_rank"] = [r[name]["cpu_per_wall"] for r in ranks]
        _counted(sec, [r[name]["counted"] for r in ranks])
    # the step's tokens without padding (a step's shards repeat no example): tokens/s
    out["step"]["tokens"] = sum(r["step"]["counted"]["real"] for r in ranks)
    _derive_rates(out)
    per_rank = []
    for r in ranks:
        m = {"rank": r["rank"], "peak_rss_bytes": r["peak_rss_bytes"], "engine": r["engine_state"],
             **{f"{p}_hwm_bytes": x["hwm_bytes"] for p, x in r["memory"].items()}}
        if "peak_cuda_bytes" in r:
            m.update({"peak_cuda_bytes": r["peak_cuda_bytes"],
                      **{f"{p}_cuda_peak_bytes": x["cuda_peak_bytes"]
                         for p, x in r["memory"].items()}})
        per_rank.append(m)
    out["memory"] = {"per_rank": per_rank,
                     "peak_rss_bytes_max": max(m["peak_rss_bytes"] for m in per_rank),
                     "steady_hwm_bytes_max": max(m.get(f"{p}_hwm_bytes", 0) for m in per_rank
                                                 for p in ("train", "hvp", "selector")),
                     "param_numel_per_rank": [m["engine"]["param_numel"] for m in per_rank]}
    if "selector" in r0:
        sel = out["selector"] = copy.deepcopy(r0["selector"])
        rows = [(sel[k], [r["selector"][k] for r in ranks])
                for k in ("outer_grad", "lanczos", "round")]
        rows += [(row, [r["selector"][sweep][i] for r in ranks])
                 for sweep in ("neumann_vs_k", "scores_vs_n") for i, row in enumerate(sel[sweep])]
        for dst, srcs in rows:
            for key in ("seconds", "min_s"):
                dst[key] = max(s[key] for s in srcs)
            if "counted" in dst:
                _counted(dst, [s["counted"] for s in srcs])
        _counted(sel["round"], [r["selector"]["round"]["score_counted"] for r in ranks],
                 prefix="score_")
    out["settings"] = {k: spec[k] for k in (
        "steps", "repeats", "batch_size", "hessian_batch", "eval_batch_size", "max_length",
        "data", "pa_pairs", "fwd_n", "threads", "sweep_repeats")}
    return out


def run_launches(spec: dict[str, Any], timeout: int, launches: int,
                 keep_logs: Path | None = None) -> dict[str, Any]:
    """Run one configuration ``launches`` times, each in fresh rank processes; one record."""
    recs = []
    for i in range(max(1, launches)):
        logs = keep_logs / f"launch{i}" if keep_logs is not None and launches > 1 else keep_logs
        rec = run_config(spec, timeout, logs)
        if not rec["ok"]:
            return rec
        recs.append(rec)
    return merge_launches(recs)


def merge_launches(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a configuration launched ``len(recs)`` times in fresh processes: every
    timing is the median of the launches' medians (``launch_medians_s`` keeps them), ``min_s``
    the least minimum, the CPU share per wall second the median per rank; memory, engine state,
    collectives and token counts are the first launch's (counted: equal in every launch)."""
    out = copy.deepcopy(recs[0])
    if len(recs) == 1:
        return out

    def fold(dst: dict[str, Any], srcs: list[dict[str, Any]], key: str) -> None:
        dst[key] = median([s[key] for s in srcs])
        dst["min_s"] = min(s["min_s"] for s in srcs)
        dst["launch_medians_s"] = [s[key] for s in srcs]
        shares = [s.get("cpu_per_wall_per_rank") for s in srcs]
        if all(shares):
            dst["cpu_per_wall_per_rank"] = [
                median([x for x in col if x is not None]) if any(x is not None for x in col)
                else None for col in zip(*shares)]

    for name in TIMED:
        fold(out[name], [r[name] for r in recs], "median_s")
    _derive_rates(out)
    sel = out.get("selector")
    if sel:
        for name in ("outer_grad", "lanczos", "round"):
            fold(sel[name], [r["selector"][name] for r in recs], "seconds")
        for sweep in ("neumann_vs_k", "scores_vs_n"):
            for i, row in enumerate(sel[sweep]):
                fold(row, [r["selector"][sweep][i] for r in recs], "seconds")
    out.update(launches=len(recs), wall_s=round(sum(r["wall_s"] for r in recs), 1),
               loadavg_per_launch=[r.get("loadavg") for r in recs])
    return out


def merge_records(records: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """One scaling record from several runs: every configuration keeps the stamp of the run
    that measured it (``source``, an index into ``sources``); one measured again (same model,
    stage, W and device) is taken from the later file; skipped ones (no GPU) are left out."""
    sources: list[dict[str, Any]] = []
    by_key: dict[tuple, dict[str, Any]] = {}
    for rec, path in zip(records, paths):
        if rec.get("benchmark") != "scaling" or "configs" not in rec:
            raise SystemExit(f"--merge: {path} is not a scaling.json (no 'configs')")
        subs = rec.get("sources") or [{k: rec.get(k) for k in (
            "command", "date_utc", "hardware", "versions", "settings", "wall_seconds")}]
        base = len(sources)
        sources += [{**src, "file": path} for src in subs]
        for c in rec["configs"]:
            if not c.get("skipped"):
                key = (c["model"], str(c["stage"]), c["world"], c["device"])
                by_key[key] = {**c, "source": base + c.get("source", 0)}
    return {"benchmark": "scaling", **stamp(), "sources": sources,
            "wall_seconds": round(sum(s.get("wall_seconds") or 0 for s in sources), 1),
            "configs": list(by_key.values())}


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--models", default="tiny,smollm2",
        help=f"comma list of {sorted(MODELS)} or any model.name_or_path")
    add("--stages", default="0,2,3,3off", help=f"comma list of {sorted(STAGES)}")
    add("--world", default="1,2", help="world sizes (rank processes)")
    add("--devices", default="cpu,gpu", help="cpu (gloo), gpu (one CUDA GPU per rank, nccl; "
        "skipped without them): the Trainer with runtime.device cpu or cuda")
    add("--steps", type=int, default=3, help="timed optimiser steps (after 1 warm-up)")
    add("--repeats", type=int, default=3, help="timed gradient passes, HVPs and forward passes")
    add("--batch-size", type=int, default=8, help="global forget batch per step")
    add("--hessian-batch", type=int, default=8)
    add("--eval-batch-size", type=int, default=16, help="forward-pass batch")
    add("--max-length", type=int, default=64)
    add("--pa-pairs", type=int, default=16, help="P: pairs of J")
    add("--fwd-n", type=int, default=32, help="negatives of the forward phase")
    add("--selector-stages", default="3", help="stages that also run the selector sweeps")
    add("--sweep-repeats", type=int, default=1, help="repeats of each selector measurement")
    add("--n", default="16,64,256", help="N of the scoring sweep")
    add("--k", default="1,2,4,8", help="K of the Neumann sweep")
    add("--lanczos", type=int, default=4, help="L: Lanczos iterations")
    add("--round-k", type=int, default=4, help="K of the whole-round measurement")
    add("--round-n", type=int, default=64, help="N of the whole-round measurement")
    add("--data", choices=("refusal", "builtin", "auto"), default="auto",
        help="refusal: <--shared-data>/refusal (default when present); builtin: demo data")
    add("--shared-data", default=str(SHARED), help="the shared data folder")
    add("--threads", type=int, default=0, help="torch threads per rank; 0: CPU cores / W")
    add("--timeout", type=int, default=3600, help="seconds per configuration launch")
    add("--launches", type=int, default=1, help="launches of each configuration")
    add("--malloc-hugepages", default="tiny",
        help=f"models whose rank processes get GLIBC_TUNABLES={HUGEPAGE_TUNABLE}")
    add("--out", default=str(RESULTS))
    add("--logs", default=None, help="keep every rank's log under this directory")
    add("--merge", default=None, help="comma list of scaling.json files to merge (runs nothing)")
    add("--rank-spec", help=argparse.SUPPRESS)
    add("--rank-out", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.rank_spec:  # inside one rank process
        rank_main(json.loads(args.rank_spec), args.rank_out)
        from u2a_dist.runtime.worker import exit_rank

        exit_rank(0)
    if args.merge:
        paths = _names(args.merge)
        return write(merge_records([json.loads(Path(p).read_text()) for p in paths], paths),
                     Path(args.out))
    data, shared = args.data, Path(args.shared_data).resolve()
    if data == "auto":
        data = "refusal" if (shared / "refusal" / "completions").is_dir() else "builtin"
        if data == "builtin":
            print(f"[scaling] {shared}/refusal not found: using the built-in demo data")
    for flag, given, known in (("stages", args.stages, STAGES), ("devices", args.devices,
                                                                 DEVICES)):
        if [s for s in _names(given) if s not in known]:
            ap.error(f"--{flag} {given!r}: known {sorted(known)}")
    ns = _ints(args.n)
    common = {"steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
              "hessian_batch": args.hessian_batch, "eval_batch_size": args.eval_batch_size,
              "max_length": args.max_length, "pa_pairs": args.pa_pairs, "fwd_n": args.fwd_n,
              "n_forget": max([*ns, args.round_n, args.fwd_n, args.batch_size,
                               args.hessian_batch]),
              "data": data, "n": ns, "k": _ints(args.k), "lanczos": args.lanczos,
              "round_k": args.round_k, "round_n": args.round_n, "timeout": args.timeout,
              "sweep_repeats": args.sweep_repeats, "shared_data": str(shared),
              "threads": args.threads}
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    configs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for device in _names(args.devices):
        for model in _names(args.models):
            for stage in _names(args.stages):
                for world in _ints(args.world):
                    spec = {**common, "model": model, "stage": stage, "world": world,
                            "device": device, "selector": stage in _names(args.selector_stages),
                            "malloc_hugepages": model in _names(args.malloc_hugepages)}
                    name = f"{model} stage {stage} W={world} {device}"
                    if DEVICES[device] == "cuda" and world > gpus:
                        why = f"{world} ranks need {world} GPUs; {gpus} here"
                        print(f"[scaling] {name}: skipped ({why})", flush=True)
                        configs.append({**_config_key(spec), "ok": False, "skipped": why})
                        continue
                    print(f"[scaling] {name} ...", flush=True)
                    logs = Path(args.logs) / name.replace(" ", "_") if args.logs else None
                    rec = run_launches(spec, args.timeout, args.launches, logs)
                    configs.append(rec)
                    if rec["ok"]:
                        print(f"[scaling] {name}: step {rec['step']['median_s']:.3f} s, "
                              f"{rec['step']['tokens_per_s']:.0f} tok/s, HVP/grad "
                              f"{rec['hvp']['ratio_to_grad']:.2f}, peak RSS/rank "
                              f"{[m['peak_rss_bytes'] for m in rec['memory']['per_rank']]} B "
                              f"({rec['wall_s']} s)", flush=True)
                    else:
                        print(f"[scaling] {name}: FAILED {rec['log_tail']['0']}", flush=True)
    skip = ("out", "rank_spec", "rank_out", "logs")
    record = {"benchmark": "scaling", "wall_seconds": round(time.perf_counter() - t0, 1),
              **stamp(), "settings": {**{k: v for k, v in vars(args).items() if k not in skip},
                                      "data": data}, "configs": configs}
    return write(record, Path(args.out))


def write(record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from benchmarks.reports import scaling_markdown, scaling_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    (out_dir / "scaling.md").write_text(scaling_markdown(record))
    if any(c.get("ok") for c in record["configs"]):
        scaling_plot(record, out_dir / "scaling.png")
    print(f"-> {out_dir / 'scaling.json'}, .md, .png")
    return record


if __name__ == "__main__":
    main()
