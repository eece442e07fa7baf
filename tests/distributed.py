"""Run a function in W real rank processes (gloo on 127.0.0.1) and collect what each returns.

``run_ranks(2, "tests.rank_fns:train_losses", {...})`` starts
``python -m tests.distributed FN ARGS OUT`` twice with RANK/WORLD_SIZE/MASTER_* set; every
rank joins the process group through ``u2a_dist.engine.init_distributed`` (the same path as the
product), runs FN(**ARGS) and torch.save()s the result. A failing rank fails the test with its
output.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def run_ranks(world_size: int, fn: str, kwargs: dict[str, Any], timeout: int = 600) -> list[Any]:
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    tmp = Path(tempfile.mkdtemp(prefix="u2a-ranks-"))
    store = LoopbackStore(world_size)  # the rendezvous, on 127.0.0.1 only, for the whole run
    port = store.port
    procs = []
    for rank in range(world_size):
        env = rank_env(rank, world_size, port)
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "tests.distributed", fn, json.dumps(kwargs),
               str(tmp / f"rank{rank}.pt")]
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((rank, code))
    store.close()
    if failed:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        details = "\n".join(f"--- rank {r} ({c}):\n" +
                            "\n".join((tmp / f"rank{r}.log").read_text().splitlines()[-40:])
                            for r, c in failed)
        raise AssertionError(f"{fn} failed on ranks {[r for r, _ in failed]}\n{details}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _main() -> None:
    fn_path, kwargs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    from u2a_dist.engine import init_distributed

    init_distributed(timeout_s=300, device="cpu")  # CPU tests stay on the CPU on a GPU box too
    module, _, name = fn_path.partition(":")
    result = getattr(importlib.import_module(module), name)(**kwargs)
    torch.save(result, out)
    from u2a_dist.runtime.worker import exit_rank

    exit_rank(0)


if __name__ == "__main__":
    _main()
