"""What every benchmark result is stamped with: hardware, versions, the command, the time;
and what the benchmarks that run the u2a CLI share: the run, a time budget, the summary of a
run directory, table cells and curves."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def stamp() -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    import u2a_dist

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__,
                "u2a_dist": u2a_dist.__version__}
    for name in ("deepspeed", "sklearn", "ray", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional: absent or broken means "not used here"
            pass
    return {
        "hardware": {"platform": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": versions,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- per-process memory (Linux /proc; used by benchmarks/scaling.py) ------------------------


def peak_rss_bytes() -> int:
    """This process's lifetime resident-set high-water mark (``ru_maxrss``), in bytes."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes


def read_hwm_rss() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes: the high-water mark since the last
    :func:`reset_hwm` and the current resident set. Falls back to ``ru_maxrss`` off Linux."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(rest.split()[0]) * 1024
        return fields["VmHWM"], fields["VmRSS"]
    except (OSError, KeyError, ValueError):
        peak = peak_rss_bytes()
        return peak, peak


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    next :func:`read_hwm_rss` reports the peak of what ran in between. False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS after a phase shows what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long 1-D sequences or tensors (no ties
    handling: scores here are continuous)."""
    import torch

    ra = torch.as_tensor(a).argsort().argsort().double()
    rb = torch.as_tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---------------------------------------------------------------- runs of the u2a CLI and their
# summaries (recipe_ablation.py and time_to_target.py share them)

REPO = Path(__file__).resolve().parents[1]

#: The metrics a benchmark table and its curves show.
SHOWN = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
         "eval/retain_ppl_ratio", "eval/degenerate_rate", "pa/accuracy")
#: The metrics plotted against training time.
PLOTTED = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
           "eval/retain_ppl_ratio")


def bench_env() -> dict[str, str]:
    """The environment every benchmark subprocess runs with (no hub, Ray on loopback)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def cli_command(config: str, out: str | Path, overrides: Sequence[str]) -> list[str]:
    """``python -m u2a_dist run`` for one benchmark run into ``out`` (replaced)."""
    return [sys.executable, "-m", "u2a_dist", "run", "--config", config, "--overwrite",
            f"out={out}", *overrides]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def run_logged(cmd: Sequence[str]) -> RunResult:
    """Run a benchmark command from the repository root and capture its output."""
    t0 = time.perf_counter()
    res = subprocess.run(list(cmd), cwd=REPO, env=bench_env(), text=True, capture_output=True)
    return RunResult(res.returncode, res.stdout, res.stderr, time.perf_counter() - t0)


def run_or_reuse(cmd: Sequence[str], out: Path, row: dict[str, Any],
                 reuse: bool = False) -> dict[str, Any]:
    """Fill ``row`` from the run directory ``out``: with ``reuse`` a finished run is read as it
    is, else ``cmd`` runs first; a failed run adds ``error`` (its output's tail) instead."""
    if reuse and (out / "summary.json").is_file():
        row["reused"] = str(out)
    else:
        res = run_logged(cmd)
        row.update(wall_s=res.wall_s, returncode=res.returncode)
        if res.returncode != 0:
            row["error"] = (res.stderr or res.stdout)[-2000:]
            return row
    row.update(summarise(out))
    return row


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (a line being written is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def is_eval_record(record: dict[str, Any]) -> bool:
    return "eval/over_refusal" in record or "pa/accuracy" in record


def summarise(run_dir: Path) -> dict[str, Any]:
    """Time to the joint target and the metrics along the way, from a finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if is_eval_record(r)]
    from u2a_dist.config import load_config
    from u2a_dist.evaluate import target_holds

    cfg = load_config(run_dir / "config.yaml")
    hit = next((r for r in evals if r["step"] > 0 and target_holds(cfg, r)), None)
    curve = [{"step": r["step"], "train_s": r.get("time_s", 0.0),
              **{k: r[k] for k in SHOWN if k in r}} for r in evals]
    best = summary.get("best") or {}
    return {"steps": summary["step"], "step_budget": cfg.unlearn.steps,
            "stopped": summary["stopped"],
            "train_time_s": summary["train_time_s"], "eval_time_s": summary["eval_time_s"],
            "target_met": hit is not None,
            "time_to_target_s": hit.get("time_s") if hit else None,
            "steps_to_target": hit["step"] if hit else None,
            "support": _support(run_dir),
            "before": {k: summary["before"].get(k) for k in SHOWN},
            "after": {k: summary["after"].get(k) for k in SHOWN},
            "best_step": best.get("step"),
            "best": {k: (best.get("metrics") or {}).get(k) for k in SHOWN},
            "curve": curve}


def _support(run_dir: Path) -> int | None:
    """How many negatives the run trained on (the selector's support; None = all)."""
    path = run_dir / "scores.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    last = max((r["round"] for r in rows), default=0)
    return sum(1 for r in rows if r["round"] == last and r.get("weight", 0) > 0)


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: a number with ``digits`` decimals (a diverged one, ≥ 1e5, in powers of
    ten), or – for none."""
    if v is None:
        return "–"
    return f"{v:.{digits}e}" if abs(v) >= 1e5 else f"{v:.{digits}f}"


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
