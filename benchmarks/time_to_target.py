"""Time to the joint target: U2A against uniform unlearning, GA, NPO, DPO and RLHF (issue 6).

    python benchmarks/time_to_target.py [--config configs/refusal_smollm2.yaml]
        [--methods u2a,u2a_cg,u2a_identity,u2a_recipe,uniform,ga,npo,dpo,dpo_sft,rlhf]
        [--runs-dir runs/time_to_target] [--reuse] [--out FILE] [section.key=value ...]

Every method (``METHODS``) runs the config (model, seed, data, held-out evaluation every
``eval.every`` steps) until the joint target, a broken floor, ``unlearn.steps`` or
``unlearn.time_budget_s`` (training time); u2a methods through ``python -m u2a_dist run``, TRL
ones through ``python -m benchmarks.trl_baselines``; overrides apply to all. Writes
``benchmarks/results/time_to_target.{json,md,png}``: when each met the target (training time,
evaluation apart), steps, examples, final metrics, metrics against training time; stamped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, stamp  # noqa: E402
from benchmarks.reports import plot_curves, table  # noqa: E402

#: The metrics a benchmark table and its curves show (rates: on the held-out sources).
SHOWN = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
         "eval/retain_ppl_ratio", "eval/degenerate_rate", "pa/accuracy")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a finished run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def summarise(run_dir: Path) -> dict[str, Any]:
    """Time to the joint target and the metrics along the way, from a finished run (a u2a run
    or a TRL run of trl_baselines.py, which writes the same files)."""
    from u2a_dist.config import load_config
    from u2a_dist.evaluate import target_holds

    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in read_metrics(run_dir) if "eval/over_refusal" in r or "pa/accuracy" in r]
    cfg = load_config(run_dir / "config.yaml")
    hit = next((r for r in evals if r["step"] > 0 and target_holds(cfg, r)), None)
    return {"steps": summary["step"], "step_budget": cfg.unlearn.steps,
            **{k: summary[k] for k in ("stopped", "train_time_s", "eval_time_s")},
            "target_met": hit is not None,
            "time_to_target_s": hit.get("time_s") if hit else None,
            "steps_to_target": hit["step"] if hit else None,
            # a TRL run records what its steps drew; a u2a step draws unlearn.batch_size
            # negatives (with their mismatch and retain sequences; selector passes on top)
            "examples_used": summary.get("examples_used",
                                         summary["step"] * cfg.unlearn.batch_size),
            "example_unit": summary.get("example_unit", "negatives"),
            "before": shown(summary["before"]), "after": shown(summary["after"]),
            "curve": [{"step": e["step"], "train_s": e.get("time_s"), **shown(e)} for e in evals]}


def shown(m: dict[str, Any]) -> dict[str, Any]:
    """SHOWN's metrics of one evaluation, a rate over the held-out sources where any is."""
    return {k: m.get(f"{k}@held_out", m.get(k)) for k in SHOWN if k in m}


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: ``digits`` decimals, powers of ten from 1e5 (a diverged metric), – for none."""
    return "–" if v is None else f"{v:.{digits}e}" if abs(v) >= 1e5 else f"{v:.{digits}f}"


#: name -> (what it is, the overrides of its CLI run; None: a TRL run of trl_baselines.py)
Table = dict[str, tuple[str, "list[str] | None"]]

ALONE = ["unlearn.mismatch_weight=0", "unlearn.retain_kl_weight=0"]  # the forget term alone
METHODS: Table = {
    "u2a": ("U2A: top-k by hypergradient (Neumann iHVP, directional scores), then reweighting",
            ["selector.enabled=true", "selector.ihvp=neumann", "selector.score=directional"]),
    "u2a_cg": ("U2A with conjugate gradients for the iHVP (selector.ihvp=cg), directional scores",
               ["selector.enabled=true", "selector.ihvp=cg", "selector.score=directional"]),
    "u2a_identity": ("U2A with the identity iHVP and per-example gradients (the paper's code)",
                     ["selector.enabled=true", "selector.ihvp=identity",
                      "selector.score=per_example_grad"]),
    "u2a_recipe": ("U2A with the recipe's selector settings (identity iHVP, directional scores, "
                   "scale-free reweighting step)", ["selector.enabled=true"]),
    "uniform": ("the recipe as configured, selector off: uniform weights over all negatives",
                ["selector.enabled=false"]),
    "random_k": ("random-k: a seeded random support of selector.top_k negatives, uniform "
                 "weights, the U2A steps (the peer a selection must beat)",
                 ["selector.enabled=true", "selector.score=random"]),
    "ga": ("gradient ascent on the negatives alone (no mismatch, no retain KL)",
           ["selector.enabled=false", "unlearn.loss=ga", *ALONE]),
    "npo": ("NPO on the negatives alone (no mismatch, no retain KL)",
            ["selector.enabled=false", "unlearn.loss=npo", *ALONE]),
    "dpo": ("TRL DPOTrainer on the data.pa pairs (β = selector.dpo_beta)", None),
    "dpo_sft": ("TRL DPOTrainer, DPO + SFT on the chosen answers (1:1, as RPO)", None),
    "kto": ("TRL KTOTrainer: the negatives undesirable, their data.mismatch refusals "
            "desirable", None),
    "rlhf": ("TRL RLOOTrainer; reward −P(harm) on harmful training prompts, +1 for a real "
             "answer on harmless ones", None),
}


def run_one(config: str, name: str, entry: tuple[str, list[str] | None], runs_dir: Path,
            overrides: list[str], reuse: bool = False, label: str = "method") -> dict[str, Any]:
    """Run one table entry (with ``reuse``, read its finished run or resume its checkpointed
    u2a run) and summarise its run directory; a failed run gets ``error`` (its output's tail)
    instead."""
    what, own = entry
    out = runs_dir / name
    row: dict[str, Any] = {label: name, "what": what, "overrides": [*(own or []), *overrides]}
    if reuse and (out / "summary.json").is_file():
        return {**row, "reused": str(out), **summarise(out)}
    if own is not None:
        from u2a_dist.rundir import RunDir

        # With --reuse, a u2a run stopped part-way with a checkpoint (a machine or session that
        # went away mid-benchmark) is resumed, not replaced: `u2a run` refuses if its config
        # changed. Its wall_s then counts this launch only; train_time_s spans both.
        if reuse and RunDir(out).has_checkpoint():
            row["resumed"] = str(out)
        cmd = [sys.executable, "-m", "u2a_dist", "run", "--config", config,
               *([] if "resumed" in row else ["--overwrite"]), f"out={out}", *row["overrides"]]
    else:  # run_trl replaces the run directory itself, as the CLI's --overwrite does
        cmd = [sys.executable, "-m", "benchmarks.trl_baselines", name, "--config", config,
               "--out", str(out), *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, env={
        **os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    row.update(wall_s=time.perf_counter() - t0, returncode=res.returncode)
    if res.returncode != 0:
        return {**row, "error": (res.stderr or res.stdout)[-2000:]}
    return {**row, **summarise(out)}


def write_markdown(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    head = [label, "target met", "time to target (s)", "steps to target", "steps (budget)",
            "examples used", "stopped", "train s", "eval s", "harmful (judge)", "no-refusal "
            "(matcher)", "over-refusal", "retain ppl ratio", "degenerate", "pa/accuracy"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r[label], f"error (rc {r.get('returncode')})", *[""] * 13])
            continue
        cells.append([r[label], "yes" if r["target_met"] else "no", fmt(r["time_to_target_s"], 0),
                      r["steps_to_target"] or "–", f"{r['steps']} ({r['step_budget']})",
                      f"{r['examples_used']} {r['example_unit']}", r["stopped"],
                      f"{r['train_time_s']:.0f}", f"{r['eval_time_s']:.0f}",
                      *(fmt(r["after"].get(k)) for k in SHOWN)])
    notes = ["", f"{label.capitalize()}s:", "", *(f"- `{r[label]}`: {r['what']}" for r in rows)]
    path.write_text("\n".join([*table(head, cells), *notes]) + "\n")


def run_benchmark(argv: list[str] | None, doc: str, runs: Table, label: str, runs_dir: str,
                  out: str) -> int:
    """The command line of a benchmark running ``runs`` (picked by ``--{label}s``) into ``out``."""
    from u2a_dist.config import ConfigError, load_config
    from u2a_dist.data.readers import DataError
    from u2a_dist.evaluate import check_eval_inputs

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--config", default="configs/refusal_smollm2.yaml")
    ap.add_argument(f"--{label}s", dest="names", default=",".join(runs))
    ap.add_argument("--runs-dir", default=runs_dir)
    ap.add_argument("--out", default=str(RESULTS / out))
    ap.add_argument("--reuse", action="store_true",
                    help=f"summarise a {label}'s finished run in --runs-dir instead of rerunning; "
                         "resume a u2a run stopped with a checkpoint")
    ap.add_argument("overrides", nargs="*", help=f"section.key=value for every {label}")
    args = ap.parse_args(argv)
    names = [m for m in args.names.split(",") if m]
    if unknown := [m for m in names if m not in runs]:
        ap.error(f"unknown {label}s {unknown}; known: {list(runs)}")
    runs_path, tag, overrides = Path(args.runs_dir), Path(out).stem, args.overrides
    try:  # the config and every evaluation input (the judge too), before hours of runs start
        cfg = load_config(args.config, overrides)
        if not (args.reuse and all((runs_path / n / "summary.json").is_file() for n in names)):
            check_eval_inputs(cfg)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"{tag}: error: {exc}", file=sys.stderr)
        return 2
    target = cfg.eval.target  # its bounds are drawn on the curves
    bounds = {target.metric: target.value, **target.require} if target is not None else {}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stamp": stamp(), "config": args.config, "overrides": overrides,
                              "rows": []}
    for name in names:
        row = run_one(args.config, name, runs[name], runs_path, overrides, args.reuse, label)
        result["rows"].append(row)
        path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
        print(f"[{tag}] {name}: " + json.dumps({k: row.get(k) for k in (
            "target_met", "time_to_target_s", "steps", "stopped", "after", "error")}), flush=True)
    write_markdown(result["rows"], path.with_suffix(".md"), label)
    measured = [k for k in SHOWN if k != "eval/degenerate_rate" and any(
        k in c for r in result["rows"] for c in r.get("curve", []))]  # no judge: no harmful_rate
    plot_curves(result["rows"], path.with_suffix(".png"), label=label,
                keys=measured or ["pa/accuracy"], bounds=bounds)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(argv, __doc__, METHODS, "method", "runs/time_to_target",
                         "time_to_target.json")


if __name__ == "__main__":
    sys.exit(main())
