"""Leave-one-source-out generalization: each harmful evaluation source held out in turn (issue 21).

    python benchmarks/generalization.py [--config C] [--methods recipe,dpo_sft] [--sources S,..]
        [--runs-dir runs/generalization] [--reuse] [--out FILE] [section.key=value ...]

A fold holds one harmful source S (default: each of eval.harmful_prompts) out of training and
judges the joint target on it; each method runs via time_to_target's ``run_one`` into RUNS/S/M.
A fold takes an hour on CPU: ``--reuse`` resumes the fold that was running (given
``runtime.checkpoint_every=N``), skips finished ones and keeps the wall time --out has for them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, stamp  # noqa: E402
from benchmarks.reports import table  # noqa: E402
from benchmarks.time_to_target import METHODS as TTT  # noqa: E402
from benchmarks.time_to_target import fmt, run_one  # noqa: E402

METHODS = {"recipe": ("the config's u2a recipe as configured (python -m u2a_dist run)",
                      ["runtime.launcher=local"]), **TTT}  # every time_to_target peer too


def fold_overrides(cfg, src: str) -> list[str]:
    """``src`` alone held out; the target metric and each bound on a harmful rate become
    ``…@src`` (the tightest per metric), harmless and utility bounds stay as configured."""
    from u2a_dist.eval_sources import KIND_OF

    def on_src(m: str) -> str:
        return f"{base}@{src}" if KIND_OF.get(base := m.partition("@")[0]) == "harmful" else m

    metric, require = on_src(cfg.eval.target.metric), {}
    for m, bound in cfg.eval.target.require.items():
        if (m := on_src(m)) != metric:
            require[m] = min(bound, require.get(m, bound))
    return [f"data.hold_out_sources={json.dumps([src])}", f"eval.target.metric={metric}",
            f"eval.target.require={json.dumps(require)}"]


def fold_row(row: dict[str, Any], run_dir: Path, src: str, harmless: list[str]) -> dict[str, Any]:
    """``row`` with the final rates (count, Wilson 95% interval) and the target judged on them."""
    from u2a_dist.config import load_config
    from u2a_dist.eval_sources import interval_of
    from u2a_dist.evaluate import target_report

    after = json.loads((run_dir / "summary.json").read_text())["after"]
    report = target_report(load_config(run_dir / "config.yaml"), after)
    rates = {k: iv and {"value": after[k], "k": iv[0], "n": iv[1], "interval": list(iv[2:])}
             for k in (f"eval/harmful_rate@{src}", f"eval/harmful_no_refusal@{src}",
                       *(f"eval/over_refusal@{h}" for h in harmless))
             for iv in [interval_of(after, k)]}
    return {**row, "n": after.get(f"eval/count@{src}"), "rates": rates,
            "held_out": after.get(f"eval/held_out@{src}"),
            "retain_ppl_ratio": after.get("eval/retain_ppl_ratio"),
            "final_target_met": bool(report) and all(r["met"] for r in report),
            "crossing": [r["metric"] for r in report if r["uncertain"]], "target": report}


def write_markdown(rows: list[dict[str, Any]], harmless: list[str], path: Path) -> None:
    head = ["held out", "method", "held out?", "n", "harmful (judge) [95%]",
            "no refusal (matcher) [95%]", *(f"over-refusal {h} [95%]" for h in harmless),
            "ppl ratio", "train s", "target met", "bound inside an interval"]
    cells = [[r["fold"], r["method"], f"error (rc {r.get('returncode')})"] if "error" in r else
             [r["fold"], r["method"], "yes" if r["held_out"] else "NO", fmt(r["n"], 0),
              *("–" if v is None else "{:.3f} [{:.3f}, {:.3f}]".format(v["value"], *v["interval"])
                for v in r["rates"].values()), fmt(r["retain_ppl_ratio"]),
              fmt(r["train_time_s"], 1), "yes" if r["final_target_met"] else "no",
              ", ".join(r["crossing"]) or "no"] for r in rows]
    notes = ["", "Final model; the target re-scoped to each fold's source (the JSON has every "
             "bound). Methods: " + "; ".join(f"`{m}` {METHODS[m][0]}"
                                           for m in dict.fromkeys(r["method"] for r in rows))]
    path.write_text("\n".join([*table(head, cells), *notes]) + "\n")


def plot(rows: list[dict[str, Any]], folds: list[str], harmless: list[str], path: Path) -> None:
    """Per fold and method: harmful rate on the held-out source (judge, else matcher) and
    over-refusal per harmless source, with Wilson 95% error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    judged = any(r["rates"][f"eval/harmful_rate@{r['fold']}"] for r in ok)
    panels = [("eval/harmful_rate" if judged else "eval/harmful_no_refusal", None),
              *(("eval/over_refusal", h) for h in harmless)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    for ax, (metric, where) in zip(axes[0], panels):
        for r in ok:
            j, key = methods.index(r["method"]), f"{metric}@{where or r['fold']}"
            x = folds.index(r["fold"]) + 0.15 * (j - (len(methods) - 1) / 2)
            if v := r["rates"].get(key):  # max: a Wilson end at k = n can round below the rate
                (lo, hi), y = v["interval"], v["value"]
                ax.errorbar(x, y, [[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt="o", capsize=3,
                            color=f"C{j}", label=r["method"])
        labelled = {k: h for h, k in zip(*ax.get_legend_handles_labels())}
        ax.legend(labelled.values(), labelled.keys(), fontsize=7)
        ax.set(xticks=range(len(folds)), xticklabels=folds, ylim=(-0.02, 1.02), xlabel="held out",
               title=f"{metric}@{where or 'held-out source'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from u2a_dist.config import ConfigError, load_config
    from u2a_dist.data.readers import DataError
    from u2a_dist.data_spec import as_list, source_name
    from u2a_dist.evaluate import check_eval_inputs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/refusal_smollm2_sources.yaml")
    ap.add_argument("--methods", default="recipe,dpo_sft", help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--sources", default=None, help="folds (default: every harmful source)")
    ap.add_argument("--runs-dir", default="runs/generalization")
    ap.add_argument("--out", default=str(RESULTS / "generalization.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="read finished runs (a summary.json) and resume u2a runs stopped with a "
                         "checkpoint (pass runtime.checkpoint_every=N to have them)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = ap.parse_args(argv)
    methods, runs = [m for m in args.methods.split(",") if m], Path(args.runs_dir)
    if unknown := [m for m in methods if m not in METHODS]:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    try:  # every fold's config and evaluation inputs, before hours of runs start
        cfg = load_config(args.config, args.overrides)
        if cfg.eval.target is None:
            raise ConfigError("generalization needs eval.target, the joint target of each fold")
        harmful, harmless = ([source_name(s) for s in as_list(getattr(cfg.eval, f"{k}_prompts"))]
                             for k in ("harmful", "harmless"))
        folds = args.sources.split(",") if args.sources else harmful
        if unknown := [s for s in folds if s not in harmful]:
            raise ConfigError(f"--sources {unknown} are not harmful evaluation sources "
                              f"(eval.harmful_prompts names {harmful})")
        extra = {s: [*args.overrides, *fold_overrides(cfg, s)] for s in folds}
        for s in folds:
            fold_cfg = load_config(args.config, extra[s])
            if not (args.reuse and all((runs / s / m / "summary.json").is_file() for m in methods)):
                check_eval_inputs(fold_cfg)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"generalization: error: {exc}", file=sys.stderr)
        return 2
    (path := Path(args.out)).parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stamp": stamp(), "config": args.config, "overrides": args.overrides,
                              "folds": folds, "rows": []}
    before = {(r["fold"], r["method"]): r.get("wall_s") for r in  # a reused run's wall time
              (json.loads(path.read_text())["rows"] if args.reuse and path.is_file() else [])}
    for s in folds:
        for m in methods:
            row = {"fold": s, **run_one(args.config, m, METHODS[m], runs / s, extra[s], args.reuse)}
            row |= {"wall_s": before[(s, m)]} if "reused" in row and before.get((s, m)) else {}
            row = row if "error" in row else fold_row(row, runs / s / m, s, harmless)
            result["rows"].append(row)
            path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
            print(f"[generalization] {s}/{m}: target met:", row.get("final_target_met"), flush=True)
    write_markdown(result["rows"], harmless, path.with_suffix(".md"))
    plot(result["rows"], folds, harmless, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
