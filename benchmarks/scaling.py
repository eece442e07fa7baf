"""Scaling of u2a-dist: time, memory and communication per rank by ZeRO stage, world size,
model and device; HVP over gradient cost; selector time against N and K.

    python benchmarks/scaling.py [--models tiny,smollm2] [--stages 0,2,3,3off] [--world 1,2]
        [--devices cpu,gpu] [--selector-stages 3] [--launches 1] [--out DIR] (--help: the rest)
    python benchmarks/scaling.py --merge A.json,B.json,... [--out DIR]

Each configuration runs in W rank processes (gloo on 127.0.0.1; nccl, a GPU per rank, on
``gpu``) that build the product's own ``Trainer`` (fp32 AdamW, GA on the refusal negatives,
J = DPO on the refusal pairs) and ``TrainerProblem``, and time ``Trainer.train_step``, a gradient
pass, an HVP, a forward pass and, at the ``--selector-stages``, ∇J, Lanczos, the Neumann series
for each K, directional scores for each N and one whole round, each phase with its memory
high-water mark, collectives and forward passes (instruments.py). Times: medians over the
repeats, from the slowest rank; over ``--launches``, the median of the launches' medians (a
launch samples the processes, not the machine; so does malloc on huge pages, which the ranks of
``--malloc-hugepages`` models get: BENCHMARKS.md). ``3off``: ZeRO-3 offloaded to the CPU.

``--merge``: one record of several runs' ``scaling.json``, each configuration keeping its run's
stamp. Writes ``scaling.{json,md,png}``; ``benchmarks/cost_model.py`` calibrates on the JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import launch_ranks, stamp  # noqa: E402
from benchmarks.instruments import Phases, engine_state, model_shape  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MODELS = {"tiny": "tiny-gpt2", "smollm2": "smollm2-135m-instruct"}
STAGES = {"0": 0, "1": 1, "2": 2, "3": 3, "3off": 3}  # --stages key -> ZeRO stage
DEVICES = {"cpu": "cpu", "gpu": "cuda"}  # --devices name -> runtime.device
#: every configuration's fixed settings (its record's ``settings`` has them)
FIXED = {"batch_size": 8, "hessian_batch": 8, "eval_batch_size": 16, "max_length": 64}
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"  # malloc's heap on transparent huge pages
TIMED = ("step", "grad", "hvp", "forward")
TIMEOUT = 3600  # seconds per launch


def _with_tunable(current: str | None, tunable: str) -> str:
    """GLIBC_TUNABLES with ``tunable`` added to what the caller's environment already sets."""
    return f"{current}:{tunable}" if current else tunable


# ---- one rank ----------------------------------------------------------------------------------


def rank_config(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One rank's run config."""
    if spec["data"] == "refusal":
        shared = Path(spec["shared_data"]) / "refusal"
        forget = {"path": str(shared / "completions"), "schema": "completions"}
        pa = {"path": str(shared / "refusal_pairs.jsonl"), "schema": "refusal-pairs"}
    else:  # the built-in demo data: no files needed (tests)
        forget = {"path": "builtin:harmful", "schema": "completions"}
        pa = {"path": "builtin:all", "schema": "pairs"}
    offload = "offload" if spec["stage"] == "3off" else "cpu"
    return {
        "model": {"name_or_path": MODELS.get(spec["model"], spec["model"]),
                  "dtype": spec.get("dtype", "float32")},
        "data": {"forget": {**forget, "limit": spec["n_forget"]},
                 "pa": {**pa, "split": "train", "limit": spec["pa_pairs"]},
                 "max_length": spec["max_length"]},
        "unlearn": {"loss": "ga", "lr": 1e-5, "steps": 10**6, "batch_size": spec["batch_size"],
                    "prox_lambda": 0.1},
        # neumann_tol: as good as 0 (every term runs), which the config refuses
        "selector": {"enabled": True, "hessian_batch": spec["hessian_batch"],
                     "lanczos_steps": spec["lanczos"], "neumann_terms": spec["round_k"],
                     "neumann_tol": 1e-30},
        "runtime": {"world_size": spec["world"], "zero_stage": STAGES[spec["stage"]],
                    "ds_config": f"ds_configs/zero3_{offload}.json", "checkpoint_every": 0,
                    "seed": 0, "device": DEVICES[spec["device"]]},
        "eval": {"every": 0, "target": None, "batch_size": spec["eval_batch_size"]},
        "out": str(Path(out_dir) / "run"),
    }


def rank_main(spec: dict[str, Any], out_path: str) -> None:
    """One rank of one configuration: every phase, written to ``out_path`` as JSON."""
    phases = Phases(gpu=spec["device"] == "gpu")  # before DeepSpeed: it counts the collectives
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from u2a_dist.config import config_from_dict
    from u2a_dist.engine import init_distributed
    from u2a_dist.linalg import ShardedVector, finite_difference_hvp
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    rank, _ = init_distributed(timeout_s=TIMEOUT, device=DEVICES[spec["device"]])
    cfg = config_from_dict(rank_config(spec, str(Path(out_path).parent)))
    trainer = Trainer(cfg, None)
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    phases.watch(problem.engine.module)
    rec: dict[str, Any] = {"rank": rank, "torch_threads": torch.get_num_threads(),
                           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                           "arch": model_shape(problem.engine.module),
                           "memory": {"setup": phases.memory_mark()}}
    trainer.train_step()  # warm-up
    _, rec["step"] = phases.repeat(trainer.train_step, spec["steps"])
    rec["engine_state"] = engine_state(trainer.engine)
    rec["memory"]["train"] = phases.memory_mark()

    lam, hvps = problem.analytic_curvature(), [0]

    def matvec(x: Any) -> Any:  # one finite-difference HVP, counted
        hvps[0] += 1
        return finite_difference_hvp(problem.parts(), problem.inner_grad, x, extra_diag=lam)

    v = ShardedVector.random_like(problem.zeros(), 7)
    v.scale_(1.0 / v.norm())
    matvec(v)  # warm-up: the first passes allocate what later ones reuse
    _, rec["grad"] = phases.repeat(problem.inner_grad, spec["repeats"])
    _, rec["hvp"] = phases.repeat(lambda: matvec(v), spec["repeats"])
    rec["memory"]["hvp"] = phases.memory_mark()
    fwd_idx = list(range(min(spec["fwd_n"], len(trainer.forget))))
    _, rec["forward"] = phases.repeat(lambda: problem.example_losses(fwd_idx), spec["repeats"])
    if spec["selector"]:
        rec["selector"] = selector_phases(spec, problem, phases, matvec, hvps)
        rec["memory"]["selector"] = phases.memory_mark()
    Path(out_path).write_text(json.dumps(rec, indent=1, default=float) + "\n")


def selector_phases(spec: dict[str, Any], problem: Any, phases: Phases, matvec: Any,
                    hvps: list[int]) -> dict[str, Any]:
    """∇J, Lanczos, Neumann(K) for each K, directional scores for each N, one whole round (the
    run config's L and K, ``--round-n``), each ``--sweep-repeats`` times."""
    from u2a_dist.linalg import extreme_eigenvalues, neumann_ihvp, resolve_damping_and_alpha
    from u2a_dist.selector import SCORE_FORWARD_PASSES, directional_scores, hypergradients

    sel, reps = problem.trainer.cfg.selector, spec["sweep_repeats"]
    n_forget = len(problem.trainer.forget)

    def timed(fn: Any) -> tuple[Any, dict[str, Any]]:
        hvps[0] = 0
        result, t = phases.repeat(fn, reps)
        return result, {"seconds": t["median_s"], "min_s": t["min_s"], "hvps": hvps[0] // reps,
                        "counted": t["counted"]}

    def scores(n: int) -> Any:
        return directional_scores(problem, v, list(range(n)), sel.fd_eps)

    (grad_j, j_value), og = timed(problem.outer_grad)
    out: dict[str, Any] = {"outer_grad": {**og, "pairs": len(problem.outer_indices()),
                                          "J": j_value, "reference_pass_timed": False}}
    (lo, hi), out["lanczos"] = timed(
        lambda: extreme_eigenvalues(matvec, grad_j, iters=sel.lanczos_steps, seed=0))
    delta, alpha = resolve_damping_and_alpha(lo, hi)
    out["lanczos"].update(lambda_min=lo, lambda_max=hi, damping=delta, alpha=alpha)
    out["neumann_vs_k"], v = [], grad_j
    for k in spec["k"]:
        res, row = timed(lambda k=k: neumann_ihvp(matvec, grad_j, k, alpha, delta, tol=0.0,
                                                  compute_residual=False))
        out["neumann_vs_k"].append({"k": k, **row})
        v = res.v
    # warm-up (the first scoring pass allocates the perturbation's buffers and, on a GPU, picks
    # kernels for new shapes), counted: it is the round's scoring
    n_round = min(spec["round_n"], n_forget)
    round_counted = phases.repeat(lambda: scores(n_round))[1]["counted"]
    out["scores_vs_n"] = [{"n": n, "forward_passes": SCORE_FORWARD_PASSES,
                           **timed(lambda n=n: scores(n))[1]} for n in spec["n"] if n <= n_forget]
    hg, r = timed(lambda: hypergradients(problem, sel, list(range(n_round))))
    out["round"] = {**r, "n": n_round, "k": sel.neumann_terms, "hvps": hg.stats["selector/hvps"],
                    "score_forward_passes": SCORE_FORWARD_PASSES, "score_counted": round_counted}
    return out


# ---- the driver: launches, and their merge into one record per configuration ------------------


def _config_key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("model", "stage", "world", "device", "malloc_hugepages")}


def _sections(rec: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every timed section of a record, in a fixed order, with the key of its median time."""
    out = [(rec[name], "median_s") for name in TIMED]
    sel = rec.get("selector")
    if sel:
        out += [(sel[name], "seconds") for name in ("outer_grad", "lanczos", "round")]
        out += [(row, "seconds") for sweep in ("neumann_vs_k", "scores_vs_n") for row in sel[sweep]]
    return out


def _counted(dst: dict[str, Any], counts: list[dict[str, float]], prefix: str = "") -> None:
    """The ranks' forward counts as a section's global accounting: micro-batches per rank (the
    most any rank ran) and padded tokens summed over the ranks (what the cost model reads)."""
    calls, tokens = max(c["forward_calls"] for c in counts), sum(c["tokens"] for c in counts)
    dst[f"{prefix}micro_batches"], dst[f"{prefix}padded_tokens"] = calls, tokens
    dst[f"{prefix}counted"] = {"forward_calls": calls, "tokens": tokens}


def _derive_rates(out: dict[str, Any]) -> None:
    """tokens/s, HVP over gradient pass and the forward's ``seconds``, from the phase times."""
    out["forward"]["seconds"] = out["forward"]["median_s"]
    out["step"]["tokens_per_s"] = out["step"]["tokens"] / out["step"]["median_s"]
    out["hvp"]["ratio_to_grad"] = out["hvp"]["median_s"] / out["grad"]["median_s"]


def merge_ranks(spec: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per configuration: times from the slowest rank (the ranks run in lock-step),
    forward counts global, memory and engine state per rank."""
    r0 = ranks[0]
    out: dict[str, Any] = {**_config_key(spec), "ok": True, "arch": r0["arch"],
                           "torch_threads": r0["torch_threads"],
                           "glibc_tunables": [r["glibc_tunables"] for r in ranks],
                           **copy.deepcopy({k: r0[k] for k in (*TIMED, "selector") if k in r0})}
    for (dst, key), *srcs in zip(*map(_sections, [out, *ranks])):
        for k in (key, "min_s"):
            dst[k] = max(s[k] for s, _ in srcs)
        _counted(dst, [s["counted"] for s, _ in srcs])
        if "cpu_per_wall" in dst:
            dst["cpu_per_wall_per_rank"] = [s["cpu_per_wall"] for s, _ in srcs]
    if "selector" in out:
        _counted(out["selector"]["round"],
                 [r["selector"]["round"]["score_counted"] for r in ranks], prefix="score_")
    # the step's tokens without padding (a step's shards repeat no example): tokens/s
    out["step"]["tokens"] = sum(r["step"]["counted"]["real"] for r in ranks)
    _derive_rates(out)
    per_rank = []
    for r in ranks:
        m = {"rank": r["rank"], "engine": r["engine_state"],
             **{f"{p}_{k}": x for p, mark in r["memory"].items() for k, x in mark.items()}}
        # resetting VmHWM resets ru_maxrss too: the lifetime peak is the highest phase mark
        for k, peak in (("hwm_bytes", "peak_rss_bytes"), ("cuda_peak_bytes", "peak_cuda_bytes")):
            if k in r["memory"]["setup"]:
                m[peak] = max(mark[k] for mark in r["memory"].values())
        per_rank.append(m)
    out["memory"] = {"per_rank": per_rank}
    out["settings"] = {k: spec[k] for k in (*FIXED, "steps", "repeats", "data", "pa_pairs",
                                            "fwd_n", "threads", "sweep_repeats")}
    return out


def run_launches(spec: dict[str, Any], launches: int) -> dict[str, Any]:
    """One configuration launched ``launches`` times, each in fresh rank processes; one record."""
    env = {"OMP_NUM_THREADS": str(spec["threads"])} if spec["threads"] else {}
    if spec["malloc_hugepages"]:
        env["GLIBC_TUNABLES"] = _with_tunable(os.environ.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE)
    recs = []
    for _ in range(launches):
        t0 = time.perf_counter()
        ranks, error = launch_ranks("benchmarks.scaling", spec, spec["world"], TIMEOUT, env,
                                    cpu=spec["device"] == "cpu")
        if ranks is None:
            return {**_config_key(spec), "ok": False, "error": error.splitlines()[0],
                    "log_tail": error}
        recs.append({**merge_ranks(spec, ranks), "wall_s": round(time.perf_counter() - t0, 1)})
    return merge_launches(recs)


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def merge_launches(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a configuration launched ``len(recs)`` times in fresh processes: every
    timing is the median of the launches' medians (``launch_medians_s`` keeps them), ``min_s``
    the least minimum, the CPU share per wall second the median per rank; memory, engine state,
    collectives and token counts are the first launch's (counted: equal in every launch)."""
    out = copy.deepcopy(recs[0])
    if len(recs) == 1:
        return out
    for (dst, key), *srcs in zip(*map(_sections, [out, *recs])):
        dst["launch_medians_s"] = [s[key] for s, _ in srcs]
        dst[key] = _median(dst["launch_medians_s"])
        dst["min_s"] = min(s["min_s"] for s, _ in srcs)
        if all(s.get("cpu_per_wall_per_rank") for s, _ in srcs):
            dst["cpu_per_wall_per_rank"] = [_median(list(col)) for col in zip(
                *(s["cpu_per_wall_per_rank"] for s, _ in srcs))]
    _derive_rates(out)
    out.update(launches=len(recs), wall_s=round(sum(r["wall_s"] for r in recs), 1))
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
    migrations = [m for rec in records for m in rec.get("migrations", [])]  # kept, not redone
    return {"benchmark": "scaling", **stamp(), "sources": sources,
            "wall_seconds": round(sum(s.get("wall_seconds") or 0 for s in sources), 1),
            "configs": list(by_key.values()), **({"migrations": migrations} if migrations else {})}


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--models", type=_names, default="tiny,smollm2", help=f"{sorted(MODELS)} or any model")
    add("--stages", type=_names, default="0,2,3,3off", help=str(sorted(STAGES)))
    add("--world", type=_ints, default="1,2", help="world sizes (rank processes)")
    add("--devices", type=_names, default="cpu,gpu", help="cpu, gpu (skipped without GPUs)")
    add("--steps", type=int, default=3, help="timed optimiser steps (after 1 warm-up)")
    add("--repeats", type=int, default=3, help="timed gradient passes, HVPs and forward passes")
    add("--pa-pairs", type=int, default=16, help="P: pairs of J")
    add("--fwd-n", type=int, default=32, help="negatives of the forward phase")
    add("--selector-stages", type=_names, default="3", help="stages that run the selector too")
    add("--sweep-repeats", type=int, default=1, help="repeats of each selector measurement")
    add("--n", type=_ints, default="16,64,256", help="N of the scoring sweep")
    add("--k", type=_ints, default="1,2,4,8", help="K of the Neumann sweep")
    add("--lanczos", type=int, default=4, help="L: Lanczos iterations")
    add("--round-k", type=int, default=4, help="K of the whole round")
    add("--round-n", type=int, default=64, help="N of the whole round")
    add("--data", choices=("refusal", "builtin", "auto"), default="auto",
        help="refusal: <--shared-data>/refusal (auto: when present); builtin: demo data")
    add("--shared-data", default=str(SHARED))
    add("--threads", type=int, default=0, help="torch threads per rank; 0: CPU cores / W")
    add("--launches", type=int, default=1, help="launches of each configuration")
    add("--malloc-hugepages", type=_names, default="tiny",
        help=f"models whose ranks get GLIBC_TUNABLES={HUGEPAGE_TUNABLE}")
    add("--out", default=str(REPO / "benchmarks" / "results"))
    add("--merge", type=_names, help="comma list of scaling.json files to merge (runs nothing)")
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
    out = Path(args.out)
    if args.merge:
        return write(merge_records([json.loads(Path(p).read_text()) for p in args.merge],
                                   args.merge), out)
    for flag, known in (("stages", STAGES), ("devices", DEVICES)):
        if not set(getattr(args, flag)) <= set(known):
            ap.error(f"--{flag} {getattr(args, flag)}: known {sorted(known)}")
    shared = Path(args.shared_data).resolve()
    if args.data == "auto":
        args.data = "refusal" if (shared / "refusal" / "completions").is_dir() else "builtin"
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge", "rank_spec",
                                                                  "rank_out")}
    common = {**FIXED, **settings, "shared_data": str(shared),
              "n_forget": max(*args.n, args.round_n, args.fwd_n, FIXED["batch_size"],
                              FIXED["hessian_batch"])}
    import torch

    configs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for device, model, stage, world in itertools.product(args.devices, args.models, args.stages,
                                                         args.world):
        spec = {**common, "model": model, "stage": stage, "world": world, "device": device,
                "selector": stage in args.selector_stages,
                "malloc_hugepages": model in args.malloc_hugepages}
        name = f"[scaling] {model} stage {stage} W={world} {device}"
        gpus = torch.cuda.device_count()
        if device == "gpu" and world > gpus:
            configs.append({**_config_key(spec), "ok": False,
                            "skipped": f"{world} ranks need {world} GPUs; {gpus} here"})
            print(f"{name}: skipped ({configs[-1]['skipped']})", flush=True)
            continue
        print(f"{name} ...", flush=True)
        rec = run_launches(spec, args.launches)
        configs.append(rec)
        print(f"{name}: " + (f"step {rec['step']['median_s']:.3f} s, HVP/grad "
                             f"{rec['hvp']['ratio_to_grad']:.2f} ({rec['wall_s']} s)"
                             if rec["ok"] else f"FAILED {rec['log_tail']}"), flush=True)
    return write({"benchmark": "scaling", "wall_seconds": round(time.perf_counter() - t0, 1),
                  **stamp(), "settings": settings, "configs": configs}, out)


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
