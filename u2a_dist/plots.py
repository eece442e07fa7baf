"""The run's metrics as PNG figures for report.md: each group of metrics against the step and
against training time (``time_s``), one panel per metric.

A pure function of metrics.jsonl's records: records lacking a metric, ``step`` or ``time_s``
simply contribute no point there, and a group with no data makes no figure. Matplotlib draws
through its Agg canvas on a bare ``Figure`` (no pyplot), so no display is needed and no global
backend of the process is changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (file stem, title, which keys) per figure, in report order. Per-source keys (``@``) have
#: their figure of their own ("sources"): with them the groups' panels would be unreadable.
GROUPS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("training", "Training",
     lambda k: k == "loss" or k.startswith("loss/") or k in ("forget/nll", "grad_norm", "lr")),
    ("preference", "Preference alignment (held-out pairs)",
     lambda k: (k.startswith("pa/") and k != "pa/n_pairs") or k.startswith("rewards/")),
    ("evaluation", "Generation and utility evaluation (pooled)",
     lambda k: k.startswith("eval/") and not _is_count(k)),
    ("selector", "Selector rounds", lambda k: k.startswith("selector/")),
]
#: The x axes: (record key, file suffix, axis label).
AXES = (("step", "step", "step"), ("time_s", "time", "training time (s)"))


@dataclass(frozen=True)
class Plot:
    """One written figure: its file (inside the plots directory) and what it shows."""

    file: str
    title: str
    axis: str


def _is_count(key: str) -> bool:
    """Sizes of the evaluation sets (``eval/count_harmful``, ``eval/n_excluded``, …) and the
    held-out flags: bookkeeping, not metrics to follow over training."""
    name = key.partition("/")[2].partition("@")[0]
    return name.startswith(("count", "n_", "held_out"))


def _number(value: Any) -> float | None:
    """A finite float, or None (a string, a list, a flag, NaN or inf: nothing to draw)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    points = sorted((xs, ys) for r in records
                    if (xs := _number(r.get(x))) is not None
                    and (ys := _number(r.get(key))) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def _groups(records: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(stem, title, {panel: [keys drawn in it]}) for every group with data."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if _number(v) is not None))
    out = []
    for stem, title, wanted in GROUPS:
        panels = {k: [k] for k in keys if "@" not in k and wanted(k)}
        if panels:
            out.append((stem, title, panels))
    by_source: dict[str, list[str]] = {}  # eval/harmful_rate: [eval/harmful_rate@advbench, …]
    for k in keys:
        if "@" in k and k.startswith("eval/") and not _is_count(k):
            by_source.setdefault(k.partition("@")[0], []).append(k)
    if by_source:
        out.append(("sources", "Evaluation by source", by_source))
    return out


def write_plots(records: list[dict[str, Any]], out_dir: str | Path) -> list[Plot]:
    """Draw every group with data against each x axis as ``out_dir/<group>-<axis>.png``; return
    the figures written, in report order. Earlier PNGs in ``out_dir`` are replaced."""
    from matplotlib.figure import Figure  # imported here: only the report draws

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a figure whose group has gone must not linger
        old.unlink()
    written = []
    for stem, title, panels in _groups(records):
        for x, suffix, label in AXES:
            series = {p: [(k, _series(records, k, x)) for k in keys]
                      for p, keys in panels.items()}
            series = {p: s for p, s in series.items() if any(xs for _, (xs, _) in s)}
            if not series:  # e.g. no record has time_s
                continue
            cols = min(3, len(series))
            rows = math.ceil(len(series) / cols)
            width, height = 4.2 * cols, 2.8 * rows
            fig = Figure(figsize=(width, height))
            # Fixed margins in inches (tick labels, axis label, titles) rather than a layout
            # engine: constrained layout measured every text box again and cost more than the
            # rest of the report, at the end of every run.
            axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
                left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                top=1 - 0.55 / height, wspace=0.25, hspace=0.5)).ravel()
            for ax, (panel, lines) in zip(axes, series.items()):
                for key, (xs, ys) in lines:
                    # markers: evaluations are sparse (every eval.every steps)
                    ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1,
                            label=key.partition("@")[2] or None)
                ax.set_title(panel, fontsize=9)
                ax.set_xlabel(label, fontsize=8)
                ax.tick_params(labelsize=7)
                if len(lines) > 1:
                    ax.legend(fontsize=6)
            for ax in axes[len(series):]:
                ax.set_visible(False)
            fig.suptitle(f"{title}, against {label}", fontsize=10)
            name = f"{stem}-{suffix}.png"
            tmp = out_dir / f".{name}.tmp"  # a reader never sees half a PNG
            fig.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, out_dir / name)
            written.append(Plot(name, title, label))
    return written
