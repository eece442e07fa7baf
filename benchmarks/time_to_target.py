"""Time to the joint target: U2A against uniform unlearning, GA, NPO, DPO and RLHF (issue 6).

    python benchmarks/time_to_target.py [--config configs/refusal_smollm2.yaml]
        [--methods u2a,u2a_identity,u2a_recipe,uniform,ga,npo,dpo,dpo_sft,rlhf]
        [--runs-dir runs/time_to_target]
        [--time-budget-s S] [--reuse] [--out FILE] [section.key=value ...]

Every method (the table ``METHODS``) trains the same model from the same seed on the same
config's data and is evaluated by the same held-out evaluation every ``eval.every`` optimiser
steps, until the recipe's joint target holds (``u2a_dist.evaluate.target_holds``: the target
metric and every ``eval.target.require`` bound), a utility floor breaks, or the step budget
(``unlearn.steps``) or the time budget (``--time-budget-s``, training time) is spent. The
unlearning methods run the real CLI (``python -m u2a_dist run``: ZeRO-3 ranks, local launcher);
DPO and RLHF run TRL in one process (``benchmarks/trl_baselines.py``, which documents the RLHF
reward). Overrides apply to every method.

Writes ``benchmarks/results/time_to_target.{json,md,png}``: per method, whether and when the
target was met (training wall time, evaluation excluded and reported apart), optimiser steps,
examples used, the final metrics, and each metric against training time; stamped with
hardware, versions and the command. ``--reuse`` summarises finished run directories instead of
rerunning them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    SHOWN,
    cli_command,
    fmt,
    run_or_reuse,
    stamp,
)
from benchmarks.reports import plot_curves  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Method:
    what: str
    #: ``cli``: ``python -m u2a_dist run`` with ``overrides``; ``trl``: benchmarks.trl_baselines
    kind: str
    overrides: tuple[str, ...] = ()
    #: what one optimiser step draws ``unlearn.batch_size`` of
    unit: str = "negatives"


METHODS: dict[str, Method] = {
    "u2a": Method("U2A: top-k by hypergradient (Neumann iHVP, directional scores), then "
                  "reweighting", "cli",
                  ("selector.enabled=true", "selector.ihvp=neumann",
                   "selector.score=directional")),
    "u2a_identity": Method("U2A with the identity iHVP and per-example gradients (the paper's "
                           "public code)", "cli",
                           ("selector.enabled=true", "selector.ihvp=identity",
                            "selector.score=per_example_grad")),
    "u2a_recipe": Method("U2A with the recipe's selector settings (identity iHVP, directional "
                         "scores, scale-free reweighting step)", "cli",
                         ("selector.enabled=true",)),
    "uniform": Method("the recipe as configured, selector off: uniform weights over all "
                      "negatives", "cli", ("selector.enabled=false",)),
    "ga": Method("gradient ascent on the negatives alone (no mismatch, no retain KL)", "cli",
                 ("selector.enabled=false", "unlearn.loss=ga", "unlearn.mismatch_weight=0",
                  "unlearn.retain_kl_weight=0")),
    "npo": Method("NPO on the negatives alone (no mismatch, no retain KL)", "cli",
                  ("selector.enabled=false", "unlearn.loss=npo", "unlearn.mismatch_weight=0",
                   "unlearn.retain_kl_weight=0")),
    "dpo": Method("TRL DPOTrainer on the data.pa pairs (β = selector.dpo_beta)", "trl",
                  unit="pairs"),
    "dpo_sft": Method("TRL DPOTrainer, DPO + SFT on the chosen answers (loss_type sigmoid + "
                      "sft, 1:1, as RPO)", "trl", unit="pairs"),
    "rlhf": Method("TRL RLOOTrainer; reward −P(harm) on harmful training prompts, +1 for a "
                   "real answer on harmless ones", "trl", unit="prompts (x2 samples)"),
}


def preflight(config: str, names: list[str], overrides: list[str]) -> None:
    """Every method's config is valid and every evaluation input (the judge too) is there,
    before hours of runs start: a ConfigError / DataError names the key."""
    from benchmarks.trl_baselines import rl_prompts
    from u2a_dist.config import ConfigError, load_config
    from u2a_dist.evaluate import check_eval_inputs

    cfgs = {n: load_config(config, [*METHODS[n].overrides, *overrides]) for n in names}
    if "rlhf" in cfgs:
        rl_prompts(cfgs["rlhf"])  # harmful and harmless training prompts exist
    for name in ("dpo", "dpo_sft"):
        if name in cfgs and cfgs[name].data.pa is None:
            raise ConfigError(f"{name} needs data.pa: the preference pairs to train on")
    if cfgs:
        check_eval_inputs(next(iter(cfgs.values())))  # the same evaluation for every method


def run_method(config: str, name: str, runs_dir: Path, overrides: list[str],
               reuse: bool = False) -> dict[str, Any]:
    """Run (or with ``reuse``, read) one method and summarise its run directory. A time budget
    is the override ``unlearn.time_budget_s``: u2a runs and TRL runs both stop on it."""
    method = METHODS[name]
    out = runs_dir / name
    row: dict[str, Any] = {"method": name, "what": method.what, "kind": method.kind,
                           "overrides": [*method.overrides, *overrides]}
    if method.kind == "cli":
        cmd = cli_command(config, out, [*method.overrides, *overrides])
    else:  # run_trl replaces the run directory itself, as the CLI's --overwrite does
        cmd = [sys.executable, "-m", "benchmarks.trl_baselines", name, "--config", config,
               "--out", str(out), *overrides]
    if "error" in run_or_reuse(cmd, out, row, reuse):
        return row
    row.update(examples_used(out, row["steps"], method.unit))
    return row


def examples_used(run_dir: Path, steps: int, unit: str) -> dict[str, Any]:
    """Training examples the optimiser steps drew: a TRL run records it; a u2a run draws
    ``unlearn.batch_size`` negatives per step (each with its mismatch answer and, with retain
    KL, as many retain sequences; the selector's scoring passes come on top)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if "examples_used" in summary:
        return {"examples_used": summary["examples_used"],
                "example_unit": summary.get("example_unit", unit)}
    from u2a_dist.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    return {"examples_used": steps * cfg.unlearn.batch_size, "example_unit": unit}


def write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    head = ("| method | target met | time to target (s) | steps to target | steps (budget) | "
            "examples used | stopped | train s | eval s | harmful (judge) | "
            "no-refusal (matcher) | over-refusal | retain ppl ratio | degenerate | "
            "pa/accuracy |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error (rc {r.get('returncode')}) |" + " |" * 13)
            continue
        m = r["after"]
        support = f" (support {r['support']})" if r.get("support") else ""
        lines.append(
            f"| {r['method']} | {'yes' if r['target_met'] else 'no'} | "
            f"{fmt(r['time_to_target_s'], 0)} | {r['steps_to_target'] or '–'} | "
            f"{r['steps']} ({r['step_budget']}) | "
            f"{r['examples_used']} {r['example_unit']}{support} | "
            f"{r['stopped']} | {r['train_time_s']:.0f} | {r['eval_time_s']:.0f} | "
            f"{fmt(m.get('eval/harmful_rate'))} | {fmt(m.get('eval/harmful_no_refusal'))} | "
            f"{fmt(m.get('eval/over_refusal'))} | {fmt(m.get('eval/retain_ppl_ratio'))} | "
            f"{fmt(m.get('eval/degenerate_rate'))} | {fmt(m.get('pa/accuracy'))} |")
    lines += ["", "Methods:", ""]
    lines += [f"- `{r['method']}`: {r['what']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def target_bounds(config: str, overrides: list[str]) -> dict[str, float]:
    """The joint target's bounds, drawn on the curves."""
    from u2a_dist.config import load_config
    from u2a_dist.evaluate import joint_target

    return {metric: bound for metric, _, bound, _ in joint_target(
        load_config(config, overrides), {})}


def main(argv: list[str] | None = None) -> int:
    from u2a_dist.config import ConfigError
    from u2a_dist.data.readers import DataError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/refusal_smollm2.yaml")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs-dir", default="runs/time_to_target")
    ap.add_argument("--out", default=str(RESULTS / "time_to_target.json"))
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="stop each method after this much training time (evaluation excluded)")
    ap.add_argument("--reuse", action="store_true",
                    help="summarise a method's finished run in --runs-dir instead of rerunning")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every method")
    args = ap.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    runs_dir = Path(args.runs_dir)
    overrides = list(args.overrides)
    if args.time_budget_s is not None:
        overrides.append(f"unlearn.time_budget_s={args.time_budget_s}")
    to_run = [n for n in names if not (args.reuse and (runs_dir / n / "summary.json").is_file())]
    try:
        preflight(args.config, to_run, overrides)
        bounds = target_bounds(args.config, overrides)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"time_to_target: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "stamp": stamp(), "config": args.config, "overrides": overrides,
        "time_budget_s": args.time_budget_s,
        "seed_note": "every method: the config's runtime.seed and model",
        "time_note": "time_s / time_to_target_s: training wall time from the first step, "
                     "evaluation excluded (eval_time_s apart); u2a methods: the sum of their "
                     "steps and selector rounds; TRL methods: the Trainer's loop with the clock "
                     "stopped during evaluation",
        "rows": []}
    for name in names:
        print(f"[time_to_target] {name}: {METHODS[name].what}", flush=True)
        row = run_method(args.config, name, runs_dir, overrides, args.reuse)
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
        print(f"[time_to_target] {name}: " + json.dumps({k: row.get(k) for k in (
            "target_met", "time_to_target_s", "steps", "stopped", "train_time_s", "after",
            "error")}), flush=True)
    write_markdown(result["rows"], out.with_suffix(".md"))
    measured = [k for k in SHOWN if k != "eval/degenerate_rate" and any(
        k in c for r in result["rows"] for c in r.get("curve", []))]  # no judge: no harmful_rate
    plot_curves(result["rows"], out.with_suffix(".png"), label="method",
                keys=measured or ["pa/accuracy"], bounds=bounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
