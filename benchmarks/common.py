"""What the benchmarks share: the stamp of every result (hardware, versions, the command, the
time), rank processes and Spearman's ρ."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def stamp() -> dict[str, Any]:
    import torch

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "u2a_dist", "deepspeed", "sklearn", "ray",
                 "trl"):
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
    from u2a_dist.allocator import allocator_env
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    tmp = Path(tempfile.mkdtemp(prefix="u2a-bench-"))
    logs = keep_logs or tmp
    logs.mkdir(parents=True, exist_ok=True)
    store = LoopbackStore(world, timeout_s=int(timeout))
    procs = []
    for rank in range(world):
        # the ranks run on the malloc a run's ranks get (runtime.allocator's default, auto)
        rank_vars = {**rank_env(rank, world, store.port), **allocator_env("auto"),
                     **(env or {})}
        if cpu:  # else init_distributed would pick nccl and DeepSpeed cuda
            rank_vars.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        cmd = [sys.executable, "-m", module, "--rank-spec", json.dumps(spec),
               "--rank-out", str(tmp / f"rank{rank}.json")]
        log = open(logs / f"rank{rank}.log", "w")
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
                tail = (logs / f"rank{rank}.log").read_text().splitlines()[-25:]
                error = f"rank {rank} failed ({code}):\n" + "\n".join(tail)
                break
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        store.close()
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
