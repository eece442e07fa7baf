"""Noisy pools (issue 22): each method on flagged outputs where a share ρ are false positives,
with P curated preference pairs.

    python benchmarks/noisy_pool.py --config FILE.yaml [--rho 0,0.5] [--pairs 64]
        [--methods uniform,random_k,...] [--runs-dir runs/noisy_pool] [--reuse] [--select-only]
        [--out FILE] [section.key=value ...]

The config's ``data.forget`` lists the pool's specs, each with its ``label`` (ground truth, which
nothing that trains or selects reads): ``harmful`` specs are the true negatives, every other label
a false positive. A pool at ρ keeps the true negatives as configured and cuts the false-positive
specs (``limit``, in their order) to ``round(ρ/(1−ρ)·N_harmful)`` rows, so that they are ρ of it;
``--pairs P`` keeps P of ``data.pa``'s pairs, shared as evenly as its specs allow (J's refusal and
over-refusal pairs alike; "all": as configured). Each method runs via time_to_target's ``run_one``
into RUNS/rho<ρ>/<method>; a row has its time to the joint target and, for the selecting methods,
round 0's ROC AUC of harmful against benign and the false-positive share of the final support and
of its weight mass (from ``scores.jsonl``). ``--select-only`` runs ``u2a select`` instead (round-0
scores, no training) for the selecting methods: the AUC and top-k precision of each selector
variant, cheaply.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, stamp  # noqa: E402
from benchmarks.reports import table  # noqa: E402
from benchmarks.time_to_target import METHODS as TTT  # noqa: E402
from benchmarks.time_to_target import fmt, read_metrics, run_one  # noqa: E402

#: The true negatives' label; every other label is a false positive.
HARMFUL = "harmful"
METHODS = {
    **{m: TTT[m] for m in ("uniform", "random_k", "u2a_identity", "u2a", "u2a_cg",
                                 "u2a_recipe")},
    "u2a_forget": ("the recipe's selector ranking and reweighting by the forget term's part of "
                   "the score alone", ["selector.enabled=true", "selector.score_on=forget"]),
    "u2a_mismatch": ("the recipe's selector ranking and reweighting by the mismatch part alone",
                     ["selector.enabled=true", "selector.score_on=mismatch"]),
    "simnpo": ("SimNPO as the inner loss (open-unlearning's), selector off: uniform weights",
               ["selector.enabled=false", "unlearn.loss=simnpo"]),
    **{m: TTT[m] for m in ("kto", "dpo_sft")},
}


def _selects(overrides: list[str] | None) -> bool:
    return overrides is not None and "selector.enabled=true" in overrides


def pool_overrides(cfg, rho: float, pairs: int | None) -> list[str]:
    """``data.forget`` (and ``data.pa`` for ``pairs``) as JSON overrides for the pool at ρ."""
    from u2a_dist.data.examples import load_completions, load_pairs
    from u2a_dist.data_spec import as_list

    specs = as_list(cfg.data.forget)
    if not specs or any(s.label is None for s in specs):
        raise ValueError("noisy_pool needs data.forget as a list of specs, each with a label "
                         f"({HARMFUL!r} for the true negatives)")
    harmful = sum(len(load_completions(s)) for s in specs if s.label == HARMFUL)
    if not harmful:
        raise ValueError(f"noisy_pool: no data.forget spec has label {HARMFUL!r}")
    if not 0 <= rho < 1:
        raise ValueError(f"--rho must be in [0, 1), got {rho}")
    want = round(rho / (1 - rho) * harmful)
    pool = []
    for s in specs:
        raw = _raw(s)
        if s.label != HARMFUL:
            total = len(load_completions(s))  # its rows and their near-duplicates
            n = min(want, total)
            if n == 0:
                continue
            if n < total:  # cut: rows and near-duplicates in the spec's proportion
                dups = round(n * s.near_duplicates / total)
                raw["limit"], raw["near_duplicates"] = n - dups, dups
            want -= n
        pool.append(raw)
    if want:
        raise ValueError(f"noisy_pool: ρ={rho} needs {want} more false positives than the "
                         "data.forget specs hold")
    out = [f"data.forget={json.dumps(pool)}"]
    if pairs is not None:  # P shared as evenly as the specs allow (refusal and over-refusal)
        specs = as_list(cfg.data.pa)
        sizes, take = [len(load_pairs(s)) for s in specs], [0] * len(specs)
        while sum(take) < pairs and any(t < n for t, n in zip(take, sizes)):
            for i in range(len(specs)):
                if take[i] < sizes[i] and sum(take) < pairs:
                    take[i] += 1
        kept = [{**_raw(s), "limit": n} for s, n in zip(specs, take) if n]
        out.append(f"data.pa={json.dumps(kept)}")
    return out


def _raw(spec) -> dict[str, Any]:
    """A spec as the config file would write it (the fields that differ from the defaults)."""
    import dataclasses

    from u2a_dist.data_spec import DataSpec

    defaults = DataSpec(path="")  # `exclude` is data.hold_out_sources's, laid in again on load
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name == "path"
            or f.name != "exclude" and getattr(spec, f.name) != getattr(defaults, f.name)}


def selection_row(run_dir: Path) -> dict[str, Any]:
    """Round 0's label statistics (metrics.jsonl, or a select summary) and the false-positive
    share of the last round's support and of each round's weight mass (``scores.jsonl``)."""
    summary = run_dir / "summary.json"
    if summary.is_file() and "stats" in (doc := json.loads(summary.read_text())):
        stats = doc["stats"]
    else:
        records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        stats = next((r for r in records if "selector/J" in r or "selector/pool@harmful" in r),
                     {})
    scores = run_dir / "scores.jsonl"
    rows = [json.loads(x) for x in scores.read_text().splitlines()] if scores.is_file() else []
    rounds = [[r for r in rows if r["round"] == k] for k in sorted({r["round"] for r in rows})]
    fp_mass = [sum(r["weight"] for r in rd if r.get("label") not in (None, HARMFUL))
               / (sum(r["weight"] for r in rd) or 1.0) for rd in rounds]
    support = [r.get("label") not in (None, HARMFUL) for r in (rounds or [[]])[-1]
               if r["weight"] > 0]  # each kept negative: a false positive or not
    return {"auc_harmful": stats.get(f"selector/auc@{HARMFUL}"),
            # each term alone (u2a_loop.term_scores), and the ranking where it is not the total
            **{f"auc_harmful_{t}": stats[key] for t in ("forget", "mismatch", "ranking")
               if (key := f"selector/auc@{HARMFUL}/{t}") in stats},
            **{k[7:]: stats[k] for k in ("timing/ihvp_s", "timing/score_s") if k in stats},
            "support": len(support),
            "fp_share_support": sum(support) / len(support) if support else None,
            "fp_share_weight": fp_mass[-1] if support else None,
            "fp_share_weight_by_round": fp_mass}  # reweighting can move mass toward them


def select_only(config: str, method: str, runs: Path, overrides: list[str]) -> dict[str, Any]:
    """``u2a select`` for one selecting method: round-0 scores and label statistics."""
    out = runs / method
    cmd = [sys.executable, "-m", "u2a_dist", "select", "--config", config, f"out={out}",
           *METHODS[method][1], *overrides]
    res = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    if res.returncode != 0:
        return {"method": method, "error": (res.stderr or res.stdout)[-2000:]}
    return {"method": method, **selection_row(out / "select")}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    head = ["ρ", "method", "target met", "time to target (s)", "steps", "train s",
            "round-0 AUC harmful", "support", "false positives in support", "... of weight",
            "harmful (judge)", "no-refusal", "over-refusal", "ppl ratio"]
    cells = []
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["rho"], r["method"], f"error (rc {r.get('returncode')})",
                          *[""] * (len(head) - 3)])
            continue
        after = r.get("after", {})
        cells.append([r["rho"], r["method"],
                      "" if "target_met" not in r else "yes" if r["target_met"] else "no",
                      fmt(r.get("time_to_target_s"), 0), r.get("steps", "–"),
                      fmt(r.get("train_time_s"), 0), fmt(r.get("auc_harmful"), 3),
                      r.get("support") or "–",
                      *(fmt(r.get(k)) for k in ("fp_share_support", "fp_share_weight")),
                      *(fmt(after.get(k)) for k in ("eval/harmful_rate", "eval/harmful_no_refusal",
                                                    "eval/over_refusal", "eval/retain_ppl_ratio"))])
    notes = ["", f"P = {result['pairs']} curated pairs; ρ = the false positives' share of the "
             "pool. Methods: " + "; ".join(f"`{m}` {w}" for m, (w, _) in METHODS.items())]
    path.write_text("\n".join([*table(head, cells), *notes]) + "\n")


def main(argv: list[str] | None = None) -> int:
    from u2a_dist.config import ConfigError, load_config
    from u2a_dist.data.readers import DataError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rho", default="0,0.5", help="false-positive shares, comma-separated")
    ap.add_argument("--pairs", default="64", help="curated pairs P of data.pa, or 'all'")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs-dir", default="runs/noisy_pool")
    ap.add_argument("--out", default=str(RESULTS / "noisy_pool.json"))
    ap.add_argument("--reuse", action="store_true", help="read finished runs, resume stopped ones")
    ap.add_argument("--select-only", action="store_true",
                    help="round-0 selection of the selecting methods only (u2a select)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    if args.select_only:
        methods = [m for m in methods if _selects(METHODS[m][1])]
    pairs = None if args.pairs == "all" else int(args.pairs)
    try:
        rhos = [float(x) for x in args.rho.split(",")]
        cfg = load_config(args.config, args.overrides)
        pools = {rho: pool_overrides(cfg, rho, pairs) for rho in rhos}
        for extra in pools.values():
            load_config(args.config, [*args.overrides, *extra])
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"noisy_pool: error: {exc}", file=sys.stderr)
        return 2
    (path := Path(args.out)).parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stamp": stamp(), "config": args.config, "pairs": args.pairs,
                              "overrides": args.overrides, "select_only": args.select_only,
                              "rows": []}
    for rho in rhos:
        runs, extra = Path(args.runs_dir) / f"rho{rho:g}", [*args.overrides, *pools[rho]]
        for m in methods:
            if args.select_only:
                row = select_only(args.config, m, runs, extra)
            else:
                row = run_one(args.config, m, METHODS[m], runs, extra, args.reuse)
                if "error" not in row and _selects(METHODS[m][1]):
                    row.update(selection_row(runs / m))
            result["rows"].append({"rho": rho, **row})
            path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
            print(f"[noisy_pool] ρ={rho:g} {m}: " + json.dumps(
                {k: row.get(k) for k in ("target_met", "time_to_target_s", "auc_harmful",
                                         "auc_harmful_forget", "auc_harmful_mismatch",
                                         "auc_harmful_ranking", "fp_share_support", "error")}),
                flush=True)
    write_markdown(result, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
