"""Reports next to the benchmarks' JSON results: ``scaling.md`` and ``scaling.png``, and the
metric-against-time curves of the time-to-target and ablation runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The metrics plotted against training time.
PLOTTED = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
           "eval/retain_ppl_ratio")


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def table(head: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(str(x) for x in r) + " |" for r in rows]]


def scaling_markdown(record: dict[str, Any]) -> str:
    """scaling.md: the runs that measured the configurations, then each configuration's phases
    and memory, and the selector's time against N and K and for one round."""
    lines = [f"# Scaling ({record['date_utc']})", "", f"Command: `{record['command']}`", ""]
    for i, src in enumerate(record.get("sources") or []):
        hw, v = src["hardware"], src.get("versions", {})
        lines.append(f"{i}. `{src['command']}` ({src['date_utc']}; {hw['cpu_count']} CPUs, GPU: "
                     f"{hw['gpu']}; torch {v.get('torch')}, deepspeed {v.get('deepspeed')}; "
                     f"{src['wall_seconds']} s)")
    lines += ["", "Times: medians over the repeats, slowest rank (over R launches: the median "
              "of their medians). Per rank: `peak` the RSS high-water mark (GPU: the CUDA "
              "allocator's), `state` the engine's params + optimizer states and master copies, "
              "`CPU/wall` CPU seconds per wall second in the steps.", ""]
    rows = []
    for c in record["configs"]:
        key = [c["model"], c["stage"], c["world"], c["device"], c.get("source", "–")]
        if not c.get("ok"):
            rows.append([*key, c.get("skipped") or c.get("error", "failed")])
            continue
        mem = c["memory"]["per_rank"]
        rows.append([*key, c.get("launches", 1), *(f"{c[s]['median_s']:.3f}" for s in
                                                   ("step", "grad", "hvp", "forward")),
                     f"{c['step']['tokens_per_s']:.0f}", f"{c['hvp']['ratio_to_grad']:.2f}",
                     fmt_bytes(c["step"]["comm"]["wire_bytes"]),
                     " / ".join(fmt_bytes(m.get("peak_cuda_bytes") or m["peak_rss_bytes"])
                                for m in mem),
                     " / ".join(f"{fmt_bytes(e['param_bytes'])} + "
                                f"{fmt_bytes(e['optimizer_state_bytes'] + e['master_bytes'])}"
                                for e in (m["engine"] for m in mem)),
                     " / ".join("–" if x is None else f"{x:.2f}"
                                for x in c["step"].get("cpu_per_wall_per_rank", []))])
    lines += table(["model", "stage", "W", "device", "src", "launches", "step s", "grad s",
                     "HVP s", "forward s", "tokens/s", "HVP/grad", "comm/step", "peak", "state",
                     "CPU/wall"], rows)
    sel = [c for c in record["configs"] if c.get("ok") and "selector" in c]
    if sel:  # the sweeps of the first configuration head the columns
        lines += ["", "The selector (s): ∇J over P pairs, directional scores against N, the "
                  "Neumann series against K (K−1 HVPs), one round (L + K HVPs, scores over N).", ""]
        s0 = sel[0]["selector"]
        head = ["model", "stage", "W", "P", "∇J", *(f"N={r['n']}" for r in s0["scores_vs_n"]),
                *(f"K={r['k']}" for r in s0["neumann_vs_k"]), "round"]
        lines += table(head, [[c["model"], c["stage"], c["world"], s["outer_grad"]["pairs"],
                               *(f"{r['seconds']:.3f}" for r in (s["outer_grad"], *s["scores_vs_n"],
                                                                 *s["neumann_vs_k"], s["round"]))]
                              for c in sel for s in [c["selector"]]])
    return "\n".join(lines) + "\n"


def scaling_plot(record: dict[str, Any], path: Path) -> None:
    """scaling.png: the selector's time against N (directional scores) and K (Neumann terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for c in (c for c in record["configs"] if c.get("ok") and "selector" in c):
        for ax, sweep, x in zip(axes, ("scores_vs_n", "neumann_vs_k"), "nk"):
            rows = c["selector"][sweep]
            ax.plot([r[x] for r in rows], [r["seconds"] for r in rows], "o-",
                    label=f"{c['model']} z{c['stage']} W{c['world']} {c['device']}")
    axes[0].set(xscale="log", yscale="log", xlabel="negatives scored N", ylabel="seconds")
    axes[1].set(yscale="log", xlabel="Neumann terms K (K−1 HVPs)", ylabel="seconds")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
