"""What the benchmarks share: the stamp of every result (hardware, versions, the command, the
time), rank processes (:func:`launch_ranks`), and for the benchmarks that run the u2a CLI the
run and the summary of its run directory."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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


def launch_ranks(module: str, spec: dict[str, Any], world: int, timeout: float,
                 env: dict[str, str] | None = None, cpu: bool = True,
                 keep_logs: Path | None = None) -> tuple[list[dict[str, Any]] | None, str]:
    """``python -m MODULE --rank-spec JSON --rank-out FILE`` in ``world`` real rank processes
    around the local launcher's rendezvous store on 127.0.0.1 (``env`` on top of each rank's
    environment; ``cpu``: the ranks see no GPU). Returns every rank's JSON record, or None and
    the failed rank's log tail; one failed rank stops the others (they would wait forever)."""
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    tmp = Path(tempfile.mkdtemp(prefix="u2a-bench-"))
    store = LoopbackStore(world, timeout_s=int(timeout))
    procs = []
    for rank in range(world):
        rank_vars = {**rank_env(rank, world, store.port), **(env or {})}
        if cpu:  # else init_distributed would pick nccl and DeepSpeed cuda
            rank_vars.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        cmd = [sys.executable, "-m", module, "--rank-spec", json.dumps(spec),
               "--rank-out", str(tmp / f"rank{rank}.json")]
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, env=rank_vars, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    deadline, error = time.monotonic() + timeout, ""
    try:
        for rank, (proc, _) in enumerate(procs):
            try:
                code: Any = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                tail = (tmp / f"rank{rank}.log").read_text().splitlines()[-25:]
                error = f"rank {rank} failed ({code}):\n" + "\n".join(tail)
                break
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        store.close()
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            (keep_logs / f"rank{rank}.log").write_text((tmp / f"rank{rank}.log").read_text())
    if error:
        return None, error
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)], ""


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

#: The metrics a benchmark table and its curves show.
SHOWN = ("eval/harmful_rate", "eval/harmful_no_refusal", "eval/over_refusal",
         "eval/retain_ppl_ratio", "eval/degenerate_rate", "pa/accuracy")


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
