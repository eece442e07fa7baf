"""Baseline evaluation of the recipes before any unlearning: ``u2a eval`` of the starting model.

    python benchmarks/eval_baseline.py [--model smollm2-135m-instruct] [--recipes a.yaml,b.yaml]
                                       [--out FILE] [overrides ...]

Runs the real CLI (``python -m u2a_dist eval --model M --config RECIPE``) once per recipe, in a
fresh process each, and writes ``benchmarks/results/eval_baseline.json``: every recipe's eval.json
object (pa/accuracy, eval/harmful_rate, eval/over_refusal, eval/retain_ppl, ... and its
``timing/*``) with the wall time of the whole command, stamped with hardware, versions and the
command line. Needs ../shared/data and, for eval/harmful_rate, the judge of ``eval.judge``
(``u2a judge-train --data ../shared/data/refusal/completions --out runs/judge --no-holdout``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import stamp  # noqa: E402

DEFAULT_RECIPES = "configs/refusal_smollm2.yaml,configs/hh_smollm2.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "eval_baseline.json"
SHOWN = ("pa/accuracy", "pa/margin", "eval/harmful_rate", "eval/harmful_no_refusal",
         "eval/degenerate_rate", "eval/over_refusal", "eval/retain_ppl")


def run_one(model: str, recipe: str, out_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "u2a_dist", "eval", "--model", model, "--config", recipe,
           "--out", str(out_dir), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    return {"recipe": recipe, "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
            "metrics": metrics}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated configs")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--runs", default="runs/eval_baseline", help="eval output directories")
    ap.add_argument("--reuse", action="store_true",
                    help="take a recipe's existing <runs>/<recipe>/eval.json instead of running "
                         "it again (recorded as reused, with its own timing/eval_s)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every recipe")
    args = ap.parse_args(argv)

    results = []
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        out_dir = Path(args.runs) / Path(recipe).stem
        if args.reuse and (out_dir / "eval.json").is_file():
            metrics = json.loads((out_dir / "eval.json").read_text())
            results.append({"recipe": recipe, "reused": str(out_dir / "eval.json"),
                            "wall_seconds": round(metrics["timing/eval_s"], 1),
                            "metrics": metrics})
        else:
            print(f"[eval_baseline] {recipe} ...", flush=True)
            results.append(run_one(args.model, recipe, out_dir, args.overrides))
        m = results[-1]["metrics"]
        shown = ", ".join(f"{k}={m[k]:.3f}" for k in SHOWN if k in m)
        print(f"[eval_baseline] {recipe}: {shown}; {results[-1]['wall_seconds']} s", flush=True)
    record = {"benchmark": "eval_baseline", "model": args.model, **stamp(),
              "load_average_at_end": os.getloadavg(), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")
    return record


if __name__ == "__main__":
    main()
