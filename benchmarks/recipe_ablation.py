"""Ablations of the alignment recipe (issue 7), every variant in one run of this script.

    python benchmarks/recipe_ablation.py [--config configs/refusal_smollm2.yaml]
        [--variants recipe,no_npo,...] [--runs-dir runs/ablation] [--out FILE] [overrides ...]

Each variant is the recipe with some keys overridden (the table ``VARIANTS``): each inner term
switched off, GA instead of NPO, the U2A selector (Neumann iHVP) against uniform weights over all
negatives, the identity iHVP, and the number of selected examples k. Every variant runs the real
CLI (``python -m u2a_dist run``, 2 ZeRO-3 ranks, local launcher) to its target or its step budget,
with the same model, data, seed and evaluation on held-out prompts. The script reads each run's
``metrics.jsonl`` and writes ``benchmarks/results/recipe_ablation.{json,md,png}``: time to the
joint target (training wall time, evaluation excluded and reported apart), the metrics at the
best evaluated step and at the end, and each metric against training time, stamped with
hardware, versions and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    cli_command,
    fmt,
    run_or_reuse,
    stamp,
)
from benchmarks.reports import plot_curves  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

#: The selector's reweighting step as first measured, and the scale-free one the recipe keeps.
RAW_STEP = ["selector.eta_scale=raw", "selector.eta=50"]
NORM_STEP = ["selector.ihvp=identity", "selector.eta_scale=max_abs", "selector.eta=2"]

#: variant name -> (what it tests, overrides on top of the recipe)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the recipe as configured (uniform weights over all negatives)", []),
    "no_forget_term": ("c_f = 0: no NPO on the harmful compliances",
                       ["unlearn.forget_weight=0"]),
    "no_mismatch": ("c_m = 0: no templated-refusal mismatch", ["unlearn.mismatch_weight=0"]),
    "no_retain_kl": ("c_r = 0: no retain KL on harmless prompts",
                     ["unlearn.retain_kl_weight=0"]),
    "no_prox": ("λ = 0: no prox term", ["unlearn.prox_lambda=0"]),
    "ga": ("GA instead of NPO for the forget term", ["unlearn.loss=ga"]),
    "u2a_neumann": ("U2A: top-k by Neumann-iHVP hypergradient, then reweighting (raw step, η 50)",
                    ["selector.enabled=true", "selector.ihvp=neumann", *RAW_STEP]),
    "u2a_identity": ("U2A with the identity iHVP (the paper's public code; raw step, η 50)",
                     ["selector.enabled=true", "selector.ihvp=identity", *RAW_STEP]),
    # The raw step η·s_i collapsed both rows above onto one negative (scores scale as 1/δ);
    # these two take the scale-free step η/max|s| and differ only in k. Identity iHVP because
    # its round-0 scores ranked like Neumann's (Spearman 0.97) at half the cost.
    "u2a_norm": ("U2A, identity iHVP, scale-free step (η/max|s| = 2), k = 64",
                 ["selector.enabled=true", *NORM_STEP]),
    "u2a_norm_k16": ("as u2a_norm, keeping k = 16 negatives",
                     ["selector.enabled=true", *NORM_STEP, "selector.top_k=16"]),
}


def run_variant(config: str, name: str, runs_dir: Path, overrides: list[str],
                reuse: bool = False) -> dict[str, Any]:
    out = runs_dir / name
    row: dict[str, Any] = {"variant": name, "what": VARIANTS[name][0],
                           "overrides": VARIANTS[name][1] + overrides}
    return run_or_reuse(cli_command(config, out, [*VARIANTS[name][1], *overrides]), out, row,
                        reuse)


def write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    head = ("| variant | target met | time to target (s) | steps (budget) | train s | eval s | "
            "harmful (judge) | no-refusal (matcher) | over-refusal | retain ppl ratio | "
            "degenerate | pa/accuracy |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error (rc {r['returncode']}) |" + " |" * 10)
            continue
        m = r["after"]
        lines.append(
            f"| {r['variant']} | {'yes' if r['target_met'] else 'no'} | "
            f"{fmt(r['time_to_target_s'], 0)} | {r['steps']} ({r['step_budget']}) | "
            f"{r['train_time_s']:.0f} | "
            f"{r['eval_time_s']:.0f} | {fmt(m.get('eval/harmful_rate'))} | "
            f"{fmt(m.get('eval/harmful_no_refusal'))} | {fmt(m.get('eval/over_refusal'))} | "
            f"{fmt(m.get('eval/retain_ppl_ratio'))} | {fmt(m.get('eval/degenerate_rate'))} | "
            f"{fmt(m.get('pa/accuracy'))} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/refusal_smollm2.yaml")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runs-dir", default="runs/ablation")
    ap.add_argument("--out", default=str(RESULTS / "recipe_ablation.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="summarise a variant's finished run in --runs-dir instead of rerunning")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every variant")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stamp": stamp(), "config": args.config, "seed_note":
                              "every variant: the config's runtime.seed", "rows": []}
    for name in names:
        print(f"[ablation] {name}: {VARIANTS[name][0]}", flush=True)
        row = run_variant(args.config, name, Path(args.runs_dir), args.overrides, args.reuse)
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
        print(f"[ablation] {name}: " + json.dumps({k: row.get(k) for k in (
            "target_met", "time_to_target_s", "steps", "train_time_s", "after", "error")}),
              flush=True)
    write_markdown(result["rows"], out.with_suffix(".md"))
    plot_curves(result["rows"], out.with_suffix(".png"), label="variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
