"""How a job on Ray fails: its exceptions, and fault injection (``U2A_RAY_FAULT``).

Fault injection (for tests and drills): ``U2A_RAY_FAULT=RANK:STEP[:exit|hang]`` in the driver's
environment makes that rank, on the FIRST attempt only, leave its process with ``os._exit(1)``
(``exit``, the default: what a killed or OOM-killed actor looks like to Ray) or stop forever
(``hang``) right after it finishes step STEP. Restarts never inherit it.

Imports no ray.
"""

from __future__ import annotations

import os
import time

from u2a_dist.runtime.local import RankFailure

FAULT_ENV = "U2A_RAY_FAULT"


class RayJobFailure(RankFailure):
    """The job did not finish on Ray: a rank's own error, retries used up, a hang, no resources.

    A RankFailure, so that the CLI reports it as one line like the local launcher's failures.
    """


class _GroupLost(Exception):
    """An actor of the group died: the attempt is over and may be retried from a checkpoint."""

    def __init__(self, rank: int, why: str) -> None:
        super().__init__(f"rank {rank}: {why}")
        self.rank, self.why = rank, why


def _inject(mode: str, rank: int, step: int) -> None:
    """The U2A_RAY_FAULT hook: die like a killed actor, or hang like a stuck rank."""
    print(f"[u2a] {FAULT_ENV}: rank {rank} {'exits' if mode == 'exit' else 'hangs'} after step "
          f"{step} (fault injection)", flush=True)
    if mode == "exit":
        os._exit(1)
    while True:
        time.sleep(3600)


def parse_fault(text: str | None) -> tuple[int, int, str] | None:
    """``RANK:STEP[:exit|hang]`` -> (rank, step, mode); None when unset or empty."""
    if not text:
        return None
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        rank, step = int(parts[0]), int(parts[1])
        mode = parts[2] if len(parts) == 3 else "exit"
        if mode not in ("exit", "hang") or rank < 0 or step < 1:
            raise ValueError
    except ValueError:
        raise RayJobFailure(f"{FAULT_ENV}={text!r}: expected RANK:STEP[:exit|hang], e.g. "
                            "1:4 or 1:4:hang") from None
    return rank, step, mode

