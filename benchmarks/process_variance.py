"""How much one process's timings say: the same forward pass timed in many fresh processes,
with glibc's default malloc and with malloc on transparent huge pages.

    python benchmarks/process_variance.py [--models tiny,smollm2] [--processes 10,5]

Each process builds the model (seeded), times no-grad forward passes and fwd+bwd passes of a
fixed batch on one thread, and reports their medians. The
processes run one after the other on an otherwise idle machine. Why it exists: the tiny model's
forward pass fits in the caches, and its speed then depends on which physical pages a process
happens to get, so fresh processes fall into a fast and a slow group; a W = 2 phase waits for
the slower of two processes and lands in the slow group more often than W = 1. With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` the heap sits on 2-MB pages and the groups merge.
``benchmarks/scaling.py --malloc-hugepages`` applies this to the models that need it.

Writes ``process_variance.json`` and ``process_variance.png`` under ``--out`` (default
``benchmarks/results``), stamped; ``--replot`` redraws the plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import stamp  # noqa: E402
from benchmarks.scaling import HUGEPAGE_TUNABLE, MODELS, _with_tunable  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: (batch, tokens, timed passes) per model: the tiny model as the scaling benchmark's forward
#: phase runs it (16 negatives of 64 tokens); SmolLM2 smaller and fewer (seconds per pass).
SHAPES = {"tiny": (16, 64, 20), "smollm2": (8, 64, 4)}
#: the timed passes, as each process reports them
PASSES = ("forward_s", "fwd_bwd_s")


def one_process(model: str) -> dict[str, float]:
    """Inside a fresh process: medians of the timed passes after 2 warm-up ones."""
    import torch

    from u2a_dist.config import ModelConfig
    from u2a_dist.models import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = load_model(ModelConfig(name_or_path=MODELS.get(model, model))).eval()
    batch, tokens, iters = SHAPES.get(model, (8, 64, 4))
    ids = torch.randint(0, min(300, m.config.vocab_size), (batch, tokens))

    def forward() -> None:
        with torch.no_grad():
            torch.log_softmax(m(input_ids=ids).logits.float(), -1).sum()

    def fwd_bwd() -> None:
        torch.log_softmax(m(input_ids=ids).logits.float(), -1).mean().backward()

    out = {}
    for name, fn in zip(PASSES, (forward, fwd_bwd)):
        for _ in range(2):
            fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def run(models: list[str], processes: list[int]) -> dict[str, Any]:
    rows = []
    for model, count in zip(models, processes):
        for malloc in ("default", "hugepages"):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if malloc == "hugepages":
                env["GLIBC_TUNABLES"] = _with_tunable(env.get("GLIBC_TUNABLES"),
                                                      HUGEPAGE_TUNABLE)
            per = []
            for _ in range(count):
                cmd = [sys.executable, "-m", "benchmarks.process_variance", "--one", model]
                res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                     check=False)
                if res.returncode != 0:
                    raise SystemExit(f"{model} ({malloc}): a process failed:\n{res.stderr[-2000:]}")
                per.append(json.loads(res.stdout.strip().splitlines()[-1]))
            row: dict[str, Any] = {"model": model, "malloc": malloc, "processes": per}
            for key in PASSES:
                xs = sorted(p[key] for p in per)
                row[key] = {"min": xs[0], "median": statistics.median(xs), "max": xs[-1],
                            "max_over_min": xs[-1] / xs[0]}
            rows.append(row)
            print(f"[process_variance] {model} {malloc}: " + ", ".join(
                f"{k} {row[k]['min'] * 1e3:.1f}-{row[k]['max'] * 1e3:.1f} ms "
                f"(median {row[k]['median'] * 1e3:.1f})" for k in PASSES),
                flush=True)
    return {"benchmark": "process_variance", **stamp(), "shapes": SHAPES, "rows": rows}


def plot(record: dict[str, Any], path: Path) -> None:
    """Each process's median pass time, relative to the fastest process of its model and pass:
    one column per (model, malloc), forward and fwd+bwd side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, PASSES, ("no-grad forward", "fwd+bwd")):
        for x, row in enumerate(rows):
            fastest = min(r[key]["min"] for r in rows if r["model"] == row["model"])
            ys = [p[key] / fastest for p in row["processes"]]
            ax.scatter([x] * len(ys), ys, alpha=0.6)
        ax.set_xticks(range(len(rows)),
                      [f"{r['model']}\n{r['malloc']}" for r in rows])
        ax.set(title=f"{title}: one dot per fresh process")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("median pass time / fastest process of the model")
    fig.suptitle(f"process_variance ({record['date_utc']}, {record['hardware']['cpu_count']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--processes", default="10,5",
                    help="fresh processes per malloc setting, one count per model (the last "
                         "repeats)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plot from --out's process_variance.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        record = json.loads((out / "process_variance.json").read_text())
        plot(record, out / "process_variance.png")
        return record
    if args.one:  # inside one measured process
        print(json.dumps({**one_process(args.one),
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}))
        return None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    if not counts or any(c < 1 for c in counts):
        ap.error(f"--processes: positive counts, got {args.processes!r}")
    counts += [counts[-1]] * (len(models) - len(counts))
    record = run(models, counts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "process_variance.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out / "process_variance.png")
    print(f"-> {out / 'process_variance.json'}, {out / 'process_variance.png'}")
    return record


if __name__ == "__main__":
    main()
