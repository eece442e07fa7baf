"""Reports: the markdown tables and plots the benchmarks write next to their JSON results
(``scaling.md``, ``cost_model.md`` and its projection table, which BENCHMARKS.md quotes, and the
metric-against-time curves of the time-to-target and ablation runs)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The metrics plotted against training time.
PLOTTED = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
           "eval/retain_ppl_ratio")


def fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "–"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_s(x: float) -> str:
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x * 1e3:.3g} ms"


def _table(head: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(str(x) for x in r) + " |" for r in rows]]


def _per_rank(mem: list[dict[str, Any]], get: Any) -> str:
    return " / ".join(fmt_bytes(get(m)) for m in mem)


def scaling_markdown(record: dict[str, Any]) -> str:
    """scaling.md: where each configuration was measured, then its phases, memory, and the
    selector's time against N and K and for one round."""
    lines = [f"# Scaling ({record['date_utc']})", "", f"Command: `{record['command']}`", ""]
    for i, src in enumerate(record.get("sources") or []):
        hw, v = src["hardware"], src.get("versions", {})
        lines.append(f"{i}. `{src['command']}` ({src['date_utc']}; {hw['cpu_count']} CPUs, GPU: "
                     f"{hw['gpu']}; torch {v.get('torch')}, deepspeed {v.get('deepspeed')}; "
                     f"{src['wall_seconds']} s)")
    lines += ["", "Times: medians over the repeats, slowest rank (over R launches: the median "
              "of their medians). Memory per rank: `peak RSS` the lifetime high-water mark, "
              "`GPU peak` the CUDA allocator's; `state` the engine's params / optimizer states "
              "+ master copies. `CPU/wall`: each rank's CPU seconds per wall second in the "
              "steps.", ""]
    head = ["model", "stage", "W", "device", "src", "launches", "step s", "tokens/s",
            "grad s", "HVP s", "HVP/grad", "comm/step", "peak RSS", "GPU peak", "state",
            "CPU/wall", "load"]
    rows = []
    for c in record["configs"]:
        key = [c["model"], c["stage"], c["world"], c["device"], c.get("source", "–")]
        if not c.get("ok"):
            rows.append([*key, c.get("skipped") or c.get("error", "failed")])
            continue
        mem = c["memory"]["per_rank"]
        rows.append([*key, c.get("launches", 1), f"{c['step']['median_s']:.3f}",
                     f"{c['step']['tokens_per_s']:.0f}", f"{c['grad']['median_s']:.3f}",
                     f"{c['hvp']['median_s']:.3f}", f"{c['hvp']['ratio_to_grad']:.2f}",
                     fmt_bytes(c["step"]["comm"]["wire_bytes"]),
                     _per_rank(mem, lambda m: m["peak_rss_bytes"]),
                     _per_rank(mem, lambda m: m.get("peak_cuda_bytes")),
                     " / ".join(f"{fmt_bytes(e['param_bytes'])} + "
                                f"{fmt_bytes(e['optimizer_state_bytes'] + e['master_bytes'])}"
                                for e in (m["engine"] for m in mem)),
                     " / ".join("–" if x is None else f"{x:.2f}"
                                for x in c["step"].get("cpu_per_wall_per_rank", [])),
                     c.get("loadavg", {}).get("before", ["–"])[0]])
    lines += _table(head, rows)
    ok = [c for c in record["configs"] if c.get("ok")]
    if ok:
        ratios = sorted(c["hvp"]["ratio_to_grad"] for c in ok)
        lines += ["", f"HVP over gradient pass: median {statistics.median(ratios):.2f} over "
                  f"{len(ok)} configurations ({ratios[0]:.2f}-{ratios[-1]:.2f}); one "
                  "finite-difference HVP is 2 gradient passes plus saving, perturbing and "
                  "restoring θ (docs/design.md §3)."]
    sel = [c for c in ok if "selector" in c]
    if sel:
        def sweep(key: str, unit: str, cell: Any) -> list[str]:
            head = ["model", "stage", "W", *(f"{unit}={r[unit.lower()]}"
                                             for r in sel[0]["selector"][key])]
            return _table(head, [[c["model"], c["stage"], c["world"],
                                  *(cell(r) for r in c["selector"][key])] for c in sel])

        lines += ["", "## Selector: directional scores against N (s; forward passes over N: "
                  "3 in runs before 2026-11-28, then 2)", "",
                  *sweep("scores_vs_n", "N", lambda r: f"{r['seconds']:.3f} "
                         f"({r['forward_passes']})"),
                  "", "## Selector: Neumann series against K (s; K−1 HVPs)", "",
                  *sweep("neumann_vs_k", "K", lambda r: f"{r['seconds']:.3f}"),
                  "", "## One selector round (∇J over P pairs, L + K HVPs, scores over N)", ""]
        lines += _table(["model", "stage", "W", "P", "L", "K", "N", "HVPs", "∇J s", "round s"],
                        [[c["model"], c["stage"], c["world"], r["pairs"], r["lanczos_iters"],
                          r["k"], r["n"], r["hvps"],
                          f"{c['selector']['outer_grad']['seconds']:.3f}",
                          f"{r['seconds']:.3f}"] for c in sel for r in [c["selector"]["round"]]])
    return "\n".join(lines) + "\n"


def scaling_plot(record: dict[str, Any], path: Path) -> None:
    """scaling.png: step time and peak memory per configuration; the selector's time against
    N (directional scores) and K (Neumann terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in record["configs"] if c.get("ok")]
    fig, ((a, b), (n_ax, k_ax)) = plt.subplots(2, 2, figsize=(12, 8))
    x = range(len(ok))
    a.bar(x, [c["step"]["median_s"] for c in ok])
    b.bar(x, [max(m.get("peak_cuda_bytes") or m["peak_rss_bytes"]
                  for m in c["memory"]["per_rank"]) / 1e9 for c in ok])
    a.set(ylabel="seconds per optimiser step", yscale="log")
    b.set(ylabel="GB: peak per rank (GPU: CUDA allocator, else RSS)", yscale="log")
    for ax in (a, b):
        ax.set_xticks(list(x), [f"{c['model']} z{c['stage']} W{c['world']} {c['device']}"
                                for c in ok], fontsize=6, rotation=90)
    for c in (c for c in ok if "selector" in c):
        label, sel = f"{c['model']} z{c['stage']} W{c['world']}", c["selector"]
        n_ax.plot([r["n"] for r in sel["scores_vs_n"]],
                  [r["seconds"] for r in sel["scores_vs_n"]], "o-", label=label)
        k_ax.plot([r["k"] for r in sel["neumann_vs_k"]],
                  [r["seconds"] for r in sel["neumann_vs_k"]], "o-", label=label)
    n_ax.set(xscale="log", yscale="log", xlabel="negatives scored N", ylabel="seconds")
    k_ax.set(yscale="log", xlabel="Neumann terms K (K−1 HVPs)", ylabel="seconds")
    for ax in (n_ax, k_ax):
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def projection_table(rows: list[dict[str, Any]]) -> str:
    """The cost model's 7B/70B projection (cost_model.md and BENCHMARKS.md)."""
    return "\n".join(_table(
        ["model", "GPUs", "stage", "memory/GPU", "of it: states / θ0 / fp32 twin / selector",
         "fits", "step", "tokens/s", "HVP", "scores (N)", "U2A round"],
        [[r["model"], r["gpus"], r["stage"], fmt_bytes(m["total"]),
          " / ".join(fmt_bytes(m[k]) for k in ("model_states", "theta0", "fp32_twin",
                                               "selector_vectors")),
          "yes" if r["fits"] else "**no**", fmt_s(r["step_s"]), f"{r['tokens_per_s']:.3g}",
          fmt_s(r["hvp_s"]), fmt_s(r["scores_s"]), fmt_s(r["round_s"])]
         for r in rows for m in [r["memory_bytes"]]])) + "\n"


def cost_model_markdown(result: dict[str, Any]) -> str:
    """cost_model.md: the fit's constants, its errors (every one is in cost_model.json), the
    communication check and the projection. The formulas: cost_model.py's docstring."""
    consts, tol = result["constants"], result["tolerance"]
    errors, lo, cm = result["errors"], result["leave_one_out"], result["comm_checks"]

    def within(rows: list[dict[str, Any]]) -> str:
        med = statistics.median(abs(r["rel_error"]) for r in rows) if rows else math.nan
        return (f"{sum(r['ok'] for r in rows)} of {len(rows)} within ±{tol:.0%} "
                f"(median |error| {med:.0%})")

    lines = [f"# Cost model ({result['date_utc']})", "", f"Command: `{result['command']}`", "",
             f"Calibrated on `{result['scaling']}` ({result['n_configs']} configurations, "
             f"{result['n_observations']} observations). Formulas: the docstring of "
             "`benchmarks/cost_model.py`; every prediction and error: `cost_model.json`.", "",
             f"- in-sample: {within(errors)}", f"- held out (each configuration predicted by "
             f"constants fitted on the others of its device): {within(lo)}",
             f"- communication formulas against the counted collectives: {within(cm)}", ""]
    for r in sorted([r for r in errors + lo + cm if not r["ok"]],
                    key=lambda r: -abs(r["rel_error"])):
        kind = "held out" if r in lo else "comm" if r in cm else "in-sample"
        lines.append(f"- miss ({kind}): {r['config']} `{r['quantity']}` measured "
                     f"{r['measured']:.4g}, predicted {r['predicted']:.4g} "
                     f"({r['rel_error']:+.0%})")
    names = [k for k, v in next(iter(consts.values())).items() if isinstance(v, float)]
    lines += ["", *_table(["constant", *consts],
                          [[k, *(f"{consts[d][k]:.4g}" for d in consts)] for k in names]), "",
              "Engine bytes per parameter (replicated r, partitioned p): " + ", ".join(
                  f"stage {s} r={r:.2f} p={p:.2f}" for s, (r, p) in sorted(
                      next(iter(consts.values()))["engine_bytes_per_param"].items())),
              "", "## Projection: 7B and 70B on 8-64 GPUs", "", result["projections"]["notes"],
              "", projection_table(result["projections"]["rows"])]
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path, label: str = "variant",
                keys: Sequence[str] = PLOTTED,
                bounds: dict[str, float] | None = None) -> None:
    """One panel per metric: each row's evaluated ``curve`` against training time;
    ``bounds`` draws the target's bound on a panel as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    axes = grid[0]
    for ax, key in zip(axes, keys):
        for r in rows:
            pts = [(c["train_s"], c[key]) for c in r.get("curve", []) if key in c]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=r[label])
        if bounds and key in bounds:
            ax.axhline(bounds[key], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training time (s, evaluation excluded)")
        ax.set_title(key)
        values = [y for line in ax.lines for y in line.get_ydata()]
        if values and min(values) > 0 and max(values) / min(values) > 1e3:
            ax.set_yscale("log")  # a diverged run (GA's perplexity ratio) would flatten the rest
    # the legend goes on the first panel with lines (without a judge eval/harmful_rate has none)
    next((ax for ax in axes if ax.lines), axes[0]).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
