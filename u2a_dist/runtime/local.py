"""Local launcher: W real rank processes on this machine, rendezvous on 127.0.0.1 (gloo on CPU).

Every rank's full output goes to ``<run>/logs/rank<r>.log``; the launcher follows rank 0's,
draws its progress events (``u2a_dist.progress``) on the console and echoes its ``[u2a]``
messages. If one rank fails the others are stopped, so nothing hangs; so are all of them when
the launcher is stopped (Ctrl-C, or SIGTERM from a scheduler, ``timeout`` or ``kill``).

Nothing listens beyond loopback: ``init_process_group`` would make rank 0 host the rendezvous
store on every interface (``::``), so the launcher hosts it instead, on a socket it bound to
127.0.0.1, and the ranks join it as clients (``TORCHELASTIC_USE_AGENT_STORE``, as under
torchrun's agent); gloo's own sockets are pinned to the loopback interface.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from u2a_dist import progress
from u2a_dist.allocator import allocator_env
from u2a_dist.rundir import RunDir
from u2a_dist.runtime.display import ProgressView


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_iface() -> str:
    """The network interface that carries 127.0.0.1 (``lo`` on Linux)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except ImportError:
        pass
    return "lo"


class LoopbackStore:
    """The rendezvous TCPStore, hosted by the launcher on a socket bound to 127.0.0.1 only."""

    def __init__(self, world_size: int, timeout_s: int = 600) -> None:
        from torch.distributed import TCPStore

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.store: Any = TCPStore("127.0.0.1", self.port, world_size, True,
                                   datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                                   master_listen_fd=self._sock.fileno())

    def close(self) -> None:
        # The store owns the descriptor and closes it when it is destroyed: only forget it here.
        self.store = None
        self._sock.detach()

    def __enter__(self) -> LoopbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank_env(rank: int, world_size: int, port: int, local_rank: int | None = None) -> dict:
    """Environment of one rank joining the launcher's LoopbackStore on `port`."""
    env = dict(os.environ)
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
                "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": loopback_iface(),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS":
                env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))})
    return env


class RankFailure(RuntimeError):
    pass


def launch_local(run_dir: RunDir, world_size: int, view: ProgressView | None = None,
                 allocator: str = "auto") -> None:
    """Run ``python -m u2a_dist.runtime.worker`` W times and wait; raise if any rank fails.
    Progress is drawn by ``view`` (made here, and closed, when not given); the ranks run on
    ``allocator`` (runtime.allocator, u2a_dist.allocator)."""
    display = view or ProgressView()
    # SIGTERM would end this process without running its `finally`, and the ranks would run on,
    # orphaned; raised as SystemExit it stops them as Ctrl-C does (the main thread only may).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        _launch(run_dir, world_size, display, allocator_env(allocator))
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if view is None:
            display.close()


def _terminated(signum: int, frame: Any) -> None:
    print(f"[u2a] {signal.Signals(signum).name}: stopping the ranks (`u2a run` with the same "
          "config resumes from the newest checkpoint)", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _launch(run_dir: RunDir, world_size: int, view: ProgressView, extra: dict[str, str]
            ) -> None:
    logs = run_dir.path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stale = run_dir.path / "error.json"
    if stale.is_file():  # an earlier attempt's: kept in logs/, so that this one's is not mixed
        stale.rename(logs / f"error-{int(stale.stat().st_mtime)}.json")
    store = LoopbackStore(world_size)
    port = store.port
    procs = []
    files = []
    for rank in range(world_size):
        log_file = open(logs / f"rank{rank}.log", "w")
        files.append(log_file)
        cmd = [sys.executable, "-m", "u2a_dist.runtime.worker", "--run-dir", str(run_dir.path)]
        procs.append(subprocess.Popen(cmd, env={**rank_env(rank, world_size, port), **extra},
                                      stdout=log_file, stderr=subprocess.STDOUT))
    view.event({"kind": "start", "path": ["starting ranks"], "done": 0, "total": None,
                "unit": "", "what": f"{world_size} processes"})
    follow = _Follower(logs / "rank0.log", view)
    failed: int | None = None
    try:
        while True:
            follow()
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                # a rank killed by a signal is the cause; the others' errors follow from it
                failed = min((i for i, c in enumerate(codes) if c not in (None, 0)),
                             key=lambda i: (codes[i] > 0, i))
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in files:
            f.close()
        store.close()
    follow()
    if failed is not None:
        code = procs[failed].returncode
        how = _exit_text(code)
        log_path = logs / f"rank{failed}.log"
        written = run_dir.path / "error.json"
        if code < 0 or not written.is_file():
            # A killed rank writes nothing; what another rank wrote is a consequence of it.
            record = {"error": "RankFailure", "rank": failed, "exit": code,
                      "message": f"rank {failed} {how}", "log": str(log_path),
                      "tail": _tail(log_path)}
            if written.is_file():
                record["consequence"] = json.loads(written.read_text())
            run_dir.write_json("error.json", record)
        raise RankFailure(f"rank {failed} {how}; last lines of {log_path} (warnings left "
                          "out):\n" + _tail(log_path))


def _exit_text(code: int) -> str:
    """``failed (exit 1)`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"failed (exit {code})"


class _Follower:
    """Reads what rank 0 has added to its log: progress events to the view, ``[u2a]``
    messages echoed. Whole lines only (a line being written is read next time)."""

    def __init__(self, path: Path, view: ProgressView) -> None:
        self.path, self.view, self.offset = path, view, 0

    def __call__(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith(progress.LINE_PREFIX):
                try:
                    self.view.event(json.loads(line[len(progress.LINE_PREFIX):]))
                except (ValueError, KeyError):  # a torn or foreign line: not worth a crash
                    continue
            elif line.startswith("[u2a]"):
                self.view.say(line)


def _tail(path: Path, n: int = 25) -> str:
    """The last ``n`` lines of a rank's log without Python warnings (a warning's line and the
    source line it quotes), which otherwise crowd out the error."""
    if not path.is_file():
        return "(no log)"
    kept: list[str] = []
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        if skip_next and line.startswith(" "):
            skip_next = False
            continue
        skip_next = bool(_WARNING.search(line))
        if not skip_next:
            kept.append(line)
    return "\n".join(kept[-n:])


_WARNING = re.compile(r":\d+: \w*Warning: ")
