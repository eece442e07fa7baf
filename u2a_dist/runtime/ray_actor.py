"""The rank actor: one Ray actor per rank, its process environment, the rendezvous store
(rank 0) and the job itself (docs/design.md §3)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Before ray is imported, as in u2a_dist.runtime.ray (ray reads it once, on import): whichever
# of the runtime's modules imports ray first sets it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from u2a_dist.config import RunConfig  # noqa: E402
from u2a_dist.rundir import RunDir  # noqa: E402
from u2a_dist.runtime.ray_faults import _inject  # noqa: E402

# --------------------------------------------------------------------------- rank actor

def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _iface_of(ip: str) -> str | None:
    """The network interface that carries `ip` (gloo binds to an interface, not an address)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


@ray.remote(num_cpus=1, max_restarts=0, concurrency_groups={"monitor": 1})
class RankActor:
    """One rank: its process environment, the rendezvous store (rank 0) and the job itself.

    ``run`` occupies the default concurrency group for the whole job; ``poll`` runs in the
    ``monitor`` group beside it, so the driver can read progress events and see that the
    process lives.
    """

    def __init__(self, rank: int, world_size: int, log_path: str | None, header: str) -> None:
        if log_path is not None:  # like the local launcher: logs/rank<r>.log, C++ output too
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            print(header, flush=True)
        logging.basicConfig(level=os.environ.get("U2A_LOG_LEVEL", "WARNING"))
        self.rank = rank
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size)})
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._store: Any = None
        self._listen: socket.socket | None = None

    def warm(self) -> None:
        """Import the heavy modules before the rendezvous, so that ranks reach it together and
        import time on a busy machine never counts against runtime.timeout_s."""
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401

        import u2a_dist.job  # noqa: F401
        import u2a_dist.trainer  # noqa: F401

    def info(self) -> dict[str, Any]:
        """Where this rank landed (the driver computes LOCAL_RANK and reports placement)."""
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "node_ip": _node_ip(), "node_id": ctx.get_node_id(),
                "pid": os.getpid(), "hostname": socket.gethostname(),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def open_store(self, world_size: int, timeout_s: int) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on this node's IP and a port chosen here."""
        from torch.distributed import TCPStore

        ip = _node_ip()
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.bind((ip, 0))
        listen.listen(128)
        port = listen.getsockname()[1]
        self._store = TCPStore(ip, port, world_size, True, datetime.timedelta(seconds=timeout_s),
                               wait_for_workers=False, master_listen_fd=listen.fileno())
        self._listen = listen  # the store uses this descriptor: keep the socket alive with it
        return ip, port

    def set_env(self, env: dict[str, str]) -> None:
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            iface = _iface_of(_node_ip())
            if iface is not None:
                env = {**env, "GLOO_SOCKET_IFNAME": iface}
        os.environ.update(env)

    def run(self, cfg: RunConfig, run_dir: str,
            fault: tuple[int, int, str] | None = None) -> dict[str, Any]:
        from u2a_dist.engine import init_distributed
        from u2a_dist.job import run_rank

        # run_rank joins too; this one marks the event
        init_distributed(cfg.runtime.timeout_s, cfg.runtime.device)
        self._emit({"event": "joined"})
        mine = fault if fault is not None and fault[0] == self.rank else None

        def at_step(metrics: dict[str, Any]) -> None:  # the fault tests' hook
            if mine is not None and int(metrics.get("step", -1)) == mine[1]:
                _inject(mine[2], self.rank, mine[1])

        if self.rank == 0:  # rank 0's progress events reach the driver through poll
            from u2a_dist import progress

            progress.set_sink(lambda e: self._emit({"event": "progress", "progress": e}))
        summary = run_rank(cfg, RunDir(run_dir), at_step if mine is not None else None)
        self._emit({"event": "done"})
        return summary

    def _emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    @ray.method(concurrency_group="monitor")
    def poll(self) -> dict[str, Any]:
        """New events since the last poll and this process's CPU seconds (for the watchdog)."""
        with self._lock:
            events, self._events = self._events, []
        import resource

        return {"events": events, "cpu_s": time.process_time(),
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}

