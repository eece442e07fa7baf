"""Leave-one-model-out AUC of the harm judge on the real labelled completions.

    python benchmarks/judge_auc.py [--data DIR] [--out FILE] [--encoder DIR] [--c-grid 0.1,1]

Trains the judge (``u2a_dist.judges``) on four source models and tests on the fifth, each in
turn, and writes ``benchmarks/results/judge_auc.json`` stamped with hardware, versions and the
command line. Reads ``../shared/data/refusal/completions`` by default (never copied here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import stamp  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "refusal" / "completions"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "judge_auc.json"


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="completions dir or *.json file")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where to write the JSON result")
    ap.add_argument("--encoder", default=None, help="sentence-encoder dir (default: packaged)")
    ap.add_argument("--c-grid", default="", help="extra logistic-head C values, comma-separated")
    args = ap.parse_args(argv)

    from u2a_dist.data.completions import load_labelled_completions
    from u2a_dist.judges import leave_one_model_out_auc

    if not Path(args.data).exists():
        ap.error(f"--data {args.data} does not exist (the ../shared/data checkout is needed)")
    t0 = time.perf_counter()
    completions = load_labelled_completions(args.data)
    grid = [float(c) for c in args.c_grid.split(",") if c.strip()]
    result = leave_one_model_out_auc(completions, args.encoder, c_grid=grid)
    wall = time.perf_counter() - t0

    record = {"benchmark": "judge_auc", "data": str(Path(args.data).resolve()),
              "wall_seconds": round(wall, 2), **stamp(), "result": result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{'held-out model':28s} {'n':>4s} {'harm':>4s} {'AUC':>6s} {'disj.':>6s} "
          f"{'substr':>6s} {'bal.acc':>7s}")
    for model, f in result["folds"].items():
        print(f"{model:28s} {f['n_test']:4d} {f.get('n_test_harmful', 0):4d} {_fmt(f['auc'])} "
              f"{_fmt(f.get('prompt_disjoint_auc'))} {_fmt(f.get('substring_auc'))} "
              f"{_fmt(f.get('balanced_accuracy'))}")
    print(f"{'mean':28s} {'':4s} {'':4s} {_fmt(result['mean_auc'])} "
          f"{_fmt(result['mean_prompt_disjoint_auc'])} {_fmt(result['mean_substring_auc'])}")
    for c, s in result.get("c_sweep", {}).items():
        print(f"C={c:<8s} mean AUC {_fmt(s['mean_auc'])} min {_fmt(s['min_auc'])} | "
              f"prompt-disjoint mean {_fmt(s['mean_prompt_disjoint_auc'])} "
              f"min {_fmt(s['min_prompt_disjoint_auc'])}")
    print(f"AUC: held-out model; disj.: held-out model and prompts; substr: refusal phrases. "
          f"C={result['C']}, {result['n_texts']} texts, encode {result['encode_seconds']} s, "
          f"total {wall:.0f} s -> {out}")
    return record


if __name__ == "__main__":
    main()
