"""Ray runtime (docs/design.md §3): one actor per rank in a placement group; restart on actor death.

Every rank runs the same code as under the local and `deepspeed` launchers: an actor sets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and calls ``u2a_dist.job.run_rank``.

Rendezvous: rank 0's actor binds a socket to ITS node IP (port 0) and hosts the c10d TCPStore
on it (torch's ``master_listen_fd``); every rank joins as a store client
(``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun's agent). So the store listens on the
node address only, not on every interface as ``init_process_group`` would make it, and no other
process can take the port between choosing and binding it. Gloo is pointed at the interface that
carries the node IP (``GLOO_SOCKET_IFNAME``): by default it resolves the hostname, which on a
multi-homed host or in a network namespace can be an address the peers cannot reach.

Failures: the driver polls every actor (metrics from rank 0 stream through the same call, so it
works wherever the driver runs). When an actor dies (killed, OOM, node lost) the whole group is
torn down and restarted; the trainer resumes from ``checkpoints/latest`` by itself. An exception
raised by the job is never retried unless an actor of the group died too (then it is the
consequence, e.g. gloo's "connection closed by peer"): a config, data or non-finite-loss error
would only fail again. A collective that gives up after ``runtime.timeout_s`` (gloo's own
timeout) ends the job with a clear error; so does no progress at all for twice that (no step
event and no rank using CPU or taking page faults: a hung rank burns neither), the backstop for
hangs outside collectives.

Fault injection (for tests and drills): ``U2A_RAY_FAULT=RANK:STEP[:exit|hang]`` in the driver's
environment makes that rank, on the FIRST attempt only, leave its process with ``os._exit(1)``
(``exit``, the default: what a killed or OOM-killed actor looks like to Ray) or stop forever
(``hang``) right after it finishes step STEP. Restarts never inherit it.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Read once, when ray is imported: with it "0", an embedded cluster keeps 127.0.0.1; otherwise
# Ray swaps 127.0.0.1 for the routable address and binds its servers on every interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.exceptions import (  # noqa: E402
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
)
from ray.util.placement_group import (  # noqa: E402
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from u2a_dist.checkpoint import tag_step  # noqa: E402
from u2a_dist.config import RunConfig  # noqa: E402
from u2a_dist.rundir import RunDir  # noqa: E402
from u2a_dist.runtime.local import RankFailure  # noqa: E402

POLL_S = 0.5  # driver poll period (metrics, liveness)
SETTLE_S = 10.0  # after a rank raises: how long to wait for the rest of the group to report
BUSY_WINDOW_S = 10.0  # the watchdog's CPU-use window
# A rank using this share of a core over a window is working, not hung. Low on purpose: on an
# oversubscribed machine a busy rank may get a quarter of a core; a hung one uses ~1% or less.
BUSY_FRACTION = 0.05
BUSY_FAULTS = 50  # ... or taking this many major page faults in a window (stalled on memory)
WATCHDOG_FACTOR = 2  # the watchdog's silence limit, in runtime.timeout_s
START_TIMEOUT_S = 600  # actor start-up and imports (at least; runtime.timeout_s if larger)
PLACE_TIMEOUT_S = 120  # waiting for the placement group (at least; runtime.timeout_s if larger)
ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "U2A_LOG_LEVEL",
                   "TORCH_EXTENSIONS_DIR")
SHOWN = ("step", "loss", "forget/nll", "pa/accuracy", "time_s")
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
    ``monitor`` group beside it, so the driver can read metrics and see that the process lives.
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

        def progress(metrics: dict[str, Any]) -> None:
            if self.rank == 0:
                self._emit({"event": "metrics", "metrics": dict(metrics)})
            if mine is not None and int(metrics.get("step", -1)) == mine[1]:
                _inject(mine[2], self.rank, mine[1])

        summary = run_rank(cfg, RunDir(run_dir),
                           progress if self.rank == 0 or mine is not None else None)
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


# --------------------------------------------------------------------------- driver side

class Watchdog:
    """No progress for `timeout_s` means a hang: no event, and no rank busy.

    A collective waiting for a peer burns no CPU, while a long phase without step events
    (model loading, evaluation, selector scoring) does; Ray's own threads in an idle actor use
    about 1% of a core, far below BUSY_FRACTION. A rank stalled on major page faults (a machine
    short of memory, re-reading evicted pages) uses little CPU but is not hung either.
    """

    def __init__(self, timeout_s: float, now: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.last = time.monotonic() if now is None else now
        self._window_start = self.last
        self._cpu0: dict[int, float] = {}
        self._faults0: dict[int, int] = {}

    def event(self, now: float | None = None) -> None:
        self.last = time.monotonic() if now is None else now

    def cpu(self, cpu_s: dict[int, float], now: float | None = None,
            faults: dict[int, int] | None = None) -> None:
        """Per-rank CPU seconds (and major page faults) so far; judged once per window."""
        now = time.monotonic() if now is None else now
        faults = faults or {}
        span = now - self._window_start
        if span < BUSY_WINDOW_S:
            for rank, value in cpu_s.items():
                self._cpu0.setdefault(rank, value)
            for rank, count in faults.items():
                self._faults0.setdefault(rank, count)
            return
        if any(value - self._cpu0.get(rank, value) >= BUSY_FRACTION * span
               for rank, value in cpu_s.items()) or any(
                count - self._faults0.get(rank, count) >= BUSY_FAULTS
                for rank, count in faults.items()):
            self.last = now
        self._window_start, self._cpu0, self._faults0 = now, dict(cpu_s), dict(faults)

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self.last > self.timeout_s


class _Display:
    """tqdm on a terminal; the local launcher's `[u2a] {...}` lines in logs (e.g. ray job logs)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.quiet = quiet
        self.bar = tqdm(total=total, desc="u2a", unit="step", dynamic_ncols=True,
                        disable=True if quiet else None)

    def metrics(self, m: dict[str, Any]) -> None:
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                 if k in SHOWN}
        if not self.bar.disable:
            self.bar.n = int(m.get("step", self.bar.n))
            self.bar.set_postfix({k: v for k, v in shown.items() if k not in ("step", "time_s")})
        elif not self.quiet:
            print(f"[u2a] {json.dumps(shown)}", flush=True)

    def say(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Group:
    pg: PlacementGroup
    actors: list[Any]
    infos: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"  # what runtime.device resolved to: every rank on a GPU of its own, or CPU


def _connect(cfg: RunConfig) -> tuple[bool, bool]:
    """Join the configured or the job's cluster, else start the embedded one on 127.0.0.1.

    Returns (initialised here, so shut down at the end; embedded). A plain ``ray.init()`` could
    attach to a stale local cluster: the embedded start is explicit, bound to loopback and
    without a dashboard (docs/design.md §6).
    """
    if ray.is_initialized():
        return False, False
    address = cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True, False
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # ray was imported before this module set the variable: apply it now, or 127.0.0.1
        # below would be replaced by the routable address (services.resolve_ip_for_localhost).
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             num_cpus=max(os.cpu_count() or 1, cfg.runtime.world_size),
             logging_level=logging.WARNING)
    return True, True


def _actor_env(embedded: bool) -> dict[str, str]:
    """Environment of the rank processes (the node's own Ray settings are left alone)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ})
    if embedded:  # same machine: the driver's copy of the package, wherever it was started
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def _start_group(cfg: RunConfig, run_dir: RunDir, attempt: int, display: _Display,
                 embedded: bool) -> _Group:
    """Reserve W bundles, start one actor per rank and wire up the rendezvous."""
    world = cfg.runtime.world_size
    bundle: dict[str, float] = {"CPU": 1}
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.runtime.device == "cuda" and gpus < world:
        raise RayJobFailure(f"runtime.device: 'cuda' needs {world} GPUs (one per rank); the "
                            f"cluster has {gpus:g}")
    # auto: one GPU per rank when the cluster has enough, else every rank on the CPU
    use_gpu = cfg.runtime.device != "cpu" and gpus >= world
    if use_gpu:
        bundle["GPU"] = 1
    place_s = max(PLACE_TIMEOUT_S, cfg.runtime.timeout_s)
    pg = placement_group([dict(bundle) for _ in range(world)],
                         strategy=cfg.runtime.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=place_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RayJobFailure(
            f"Ray could not place {world} bundles of {bundle} ({cfg.runtime.placement_strategy}) "
            f"within {place_s:.0f} s; the cluster has {ray.available_resources()} "
            "available") from None
    env = _actor_env(embedded)
    logs = run_dir.path / "logs"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    actors = []
    for rank in range(world):
        actors.append(RankActor.options(
            num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank)).remote(
            rank, world, str(logs / f"rank{rank}.log"),
            f"===== u2a ray attempt {attempt}, rank {rank}, {stamp} ====="))
    group = _Group(pg, actors, device="cuda" if use_gpu else "cpu")
    try:
        start_s = max(START_TIMEOUT_S, cfg.runtime.timeout_s)
        group.infos = _get_all(actors, [a.info.remote() for a in actors], start_s)
        _get_all(actors, [a.warm.remote() for a in actors], start_s)
        master_ip, port = _get_all(actors[:1], [actors[0].open_store.remote(
            world, cfg.runtime.timeout_s)], start_s)[0]
        per_node: dict[str, list[int]] = {}
        for info in group.infos:
            per_node.setdefault(info["node_id"], []).append(info["rank"])
        envs = []
        for info in group.infos:
            ranks = per_node[info["node_id"]]
            info["local_rank"] = 0 if use_gpu else ranks.index(info["rank"])
            envs.append({"LOCAL_RANK": str(info["local_rank"]),
                         "LOCAL_WORLD_SIZE": str(1 if use_gpu else len(ranks)),
                         "MASTER_ADDR": master_ip, "MASTER_PORT": str(port),
                         "TORCHELASTIC_USE_AGENT_STORE": "True"})
        _get_all(actors, [a.set_env.remote(e) for a, e in zip(actors, envs)], start_s)
    except BaseException:
        _teardown(group)
        raise
    _record_placement(run_dir, attempt, cfg, group, f"{master_ip}:{port}")
    nodes = len(per_node)
    display.say(f"[u2a] ray: {world} ranks on {nodes} node(s) ({cfg.runtime.placement_strategy}), "
                f"rendezvous {master_ip}:{port}: " + ", ".join(
                    f"rank {i['rank']} {i['node_ip']} pid {i['pid']}" for i in group.infos))
    return group


def _get_all(actors: list[Any], refs: list[Any], timeout_s: float) -> list[Any]:
    """ray.get that names the rank whose actor died (an init failure is not retried)."""
    out = []
    for rank, ref in enumerate(refs):
        try:
            out.append(ray.get(ref, timeout=timeout_s))
        except RayActorError as exc:
            if exc.actor_init_failed:
                raise RayJobFailure(f"rank {rank}'s actor failed to start: {exc}") from None
            raise _GroupLost(rank, _why(exc)) from None
        except (OutOfMemoryError, NodeDiedError) as exc:
            raise _GroupLost(rank, _why(exc)) from None
        except GetTimeoutError:
            raise RayJobFailure(f"rank {rank}'s actor did not answer within {timeout_s} s "
                                "while starting (imports, rendezvous set-up)") from None
    return out


def _record_placement(run_dir: RunDir, attempt: int, cfg: RunConfig, group: _Group,
                      master: str) -> None:
    """logs/ray_ranks.json: where every attempt's ranks ran (node IP, PID) and the rendezvous."""
    path = run_dir.path / "logs" / "ray_ranks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.is_file() and attempt > 1 else []
    history.append({"attempt": attempt, "strategy": cfg.runtime.placement_strategy,
                    "master": master, "ranks": group.infos})
    run_dir.write_json("logs/ray_ranks.json", history)


def _teardown(group: _Group, wait_s: float = 30.0) -> None:
    """Kill every actor, wait until Ray reports them dead, then free the placement group."""
    for actor in group.actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
    deadline = time.monotonic() + wait_s
    for actor in group.actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.poll.remote(), timeout=1)
            except GetTimeoutError:
                continue
            except RayError:  # dead: killed, OOM-killed (OutOfMemoryError), node gone
                break
            time.sleep(0.2)
    try:
        remove_placement_group(group.pg)
    except RayError:  # the cluster is going away; nothing left to free
        pass


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _cause(exc: RayTaskError) -> BaseException:
    return exc.cause if isinstance(exc.cause, BaseException) else exc


def _is_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "timed out" in text or "timeout" in text


def _watch(group: _Group, cfg: RunConfig, run_dir: RunDir, display: _Display,
           fault: tuple[int, int, str] | None = None) -> dict[str, Any]:
    """Run the job on the group; return rank 0's summary or raise _GroupLost / RayJobFailure."""
    path = str(run_dir.path.resolve())
    # The ranks get the driver's decision (runtime.device auto: GPUs only when each rank has
    # one), not their own guess: a rank that sees a GPU Ray did not give it stays on the CPU.
    cfg = copy.deepcopy(cfg)
    cfg.runtime.device = group.device
    refs = {a.run.remote(cfg, path, fault): rank for rank, a in enumerate(group.actors)}
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    # The backstop for hangs outside collectives: a hung collective fails on its own, with
    # gloo's error, after runtime.timeout_s; the watchdog gives it that long again.
    dog = Watchdog(WATCHDOG_FACTOR * cfg.runtime.timeout_s)
    settle_until: float | None = None
    while len(results) + len(errors) < len(refs):
        pending = [r for r, rank in refs.items() if rank not in results and rank not in errors]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            rank = refs[ref]
            dog.event()
            try:
                results[rank] = ray.get(ref)
            except (RayActorError, OutOfMemoryError, NodeDiedError) as exc:
                raise _GroupLost(rank, _why(exc)) from None
            except RayTaskError as exc:
                errors[rank] = _cause(exc)
                if settle_until is None:
                    settle_until = time.monotonic() + SETTLE_S
        _poll(group, dog, display)  # raises _GroupLost when a process is gone
        if settle_until is not None and time.monotonic() > settle_until:
            break
        if dog.expired():
            raise RayJobFailure(
                f"no progress for {dog.timeout_s:.0f} s ({WATCHDOG_FACTOR} x runtime.timeout_s="
                f"{cfg.runtime.timeout_s}): no step was "
                "logged and no rank used the CPU; a collective is probably hung. The group was "
                f"torn down; rank logs are in {run_dir.path / 'logs'}")
    _poll(group, dog, display)
    if errors:
        rank = min(errors)
        exc = errors[rank]
        timed_out = sorted(r for r, e in errors.items() if _is_timeout(e))
        if timed_out:
            rank = timed_out[0]
            raise RayJobFailure(
                f"a collective timed out on rank {rank} after runtime.timeout_s="
                f"{cfg.runtime.timeout_s} s: another rank is hung or far too slow ("
                f"{_why(errors[rank])}); the group was torn down; rank logs are in "
                f"{run_dir.path / 'logs'}") from errors[rank]
        raise RayJobFailure(f"rank {rank} failed: {type(exc).__name__}: {exc} (not retried: "
                            "an error of the job itself; see "
                            f"{run_dir.path / 'logs' / f'rank{rank}.log'})") from exc
    return results[0]


def _poll(group: _Group, dog: Watchdog, display: _Display) -> None:
    cpu: dict[int, float] = {}
    faults: dict[int, int] = {}
    refs = [a.poll.remote() for a in group.actors]
    for rank, ref in enumerate(refs):
        try:
            state = ray.get(ref, timeout=60)
        except ActorUnavailableError:  # transient (e.g. a network blip): look again next time
            continue
        except (RayActorError, OutOfMemoryError, NodeDiedError) as exc:
            raise _GroupLost(rank, _why(exc)) from None
        except GetTimeoutError:
            continue
        cpu[rank], faults[rank] = state["cpu_s"], state["faults"]
        for event in state["events"]:
            dog.event()
            if event["event"] == "metrics":
                display.metrics(event["metrics"])
    dog.cpu(cpu, faults=faults)


def _checkpoint_step(run_dir: RunDir) -> int | None:
    tag = run_dir.latest_checkpoint()
    return None if tag is None else tag_step(tag)


def _prepare_restart(run_dir: RunDir, attempt: int) -> tuple[int | None, int, int]:
    """Before a restart: (checkpoint step, last logged step, steps to redo).

    Without a checkpoint the job starts over, so the failed attempt's log lines go now (with one
    the trainer drops the lines past it itself). Rank 0's error.json of the failed attempt (a
    consequence of the lost peer) moves to logs/ so that the run directory does not look failed.
    """
    logged = max((int(m.get("step", 0)) for m in run_dir.read_metrics()), default=0)
    ckpt = _checkpoint_step(run_dir)
    if ckpt is None:
        run_dir.truncate_metrics_after(-1)
    error = run_dir.path / "error.json"
    if error.is_file():
        (run_dir.path / "logs").mkdir(exist_ok=True)
        error.rename(run_dir.path / "logs" / f"error-attempt{attempt}.json")
    return ckpt, logged, max(0, logged - (ckpt or 0))


def launch_ray(run_dir: RunDir, cfg: RunConfig, quiet: bool = False) -> None:
    """Run the job on Ray (embedded, the job's cluster, or runtime.ray_address) to completion.

    Restarts the whole group from the last checkpoint when an actor dies, at most
    runtime.max_failures times; raises RayJobFailure otherwise.
    """
    fault = parse_fault(os.environ.get(FAULT_ENV))
    started, embedded = _connect(cfg)
    display = _Display(cfg.unlearn.steps, quiet)
    failures: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    try:
        attempt = 0
        while True:
            attempt += 1
            group = None
            try:
                group = _start_group(cfg, run_dir, attempt, display, embedded)
                infos = group.infos
                summary = _watch(group, cfg, run_dir, display, fault if attempt == 1 else None)
                break
            except _GroupLost as lost:
                if group is not None:  # first stop every rank, so none writes to the run dir
                    _teardown(group)
                    group = None
                ckpt, logged, redo = _prepare_restart(run_dir, attempt)
                failures.append({"attempt": attempt, "rank": lost.rank, "error": lost.why,
                                 "checkpoint_step": ckpt, "logged_step": logged,
                                 "steps_redone": redo})
                where = (f"checkpoint step {ckpt}" if ckpt is not None
                         else "the start (no checkpoint)")
                if len(failures) > cfg.runtime.max_failures:
                    raise RayJobFailure(
                        f"rank {lost.rank}'s actor died ({lost.why}); that is failure "
                        f"{len(failures)}, more than runtime.max_failures="
                        f"{cfg.runtime.max_failures}: giving up (resume later from {where} by "
                        "running the same command again)") from None
                redo_text = (f"{redo} logged step(s) past it ({(ckpt or 0) + 1}-{logged}) "
                             "will be redone" if redo else "no logged step is redone")
                display.say(f"[u2a] ray: rank {lost.rank}'s actor died ({lost.why}); tearing the "
                            f"group down and restarting from {where} (restart {len(failures)} "
                            f"of at most {cfg.runtime.max_failures}); {redo_text}")
            finally:
                if group is not None:
                    _teardown(group)
        redone = sum(f["steps_redone"] for f in failures)
        late = run_dir.path / "error.json"
        if failures and late.is_file():
            # The last attempt succeeded, so this is a torn-down attempt's rank 0 that wrote it
            # after _prepare_restart had moved the first one (teardown does not wait for exit).
            (run_dir.path / "logs").mkdir(exist_ok=True)
            late.rename(run_dir.path / "logs" / f"error-attempt{attempt - 1}-late.json")
        if failures:
            display.say(f"[u2a] ray: finished after {len(failures)} restart(s); "
                        f"{redone} step(s) redone in all")
        summary_path = run_dir.path / "summary.json"
        if summary_path.is_file():  # rank 0 wrote it when on a shared filesystem with us
            summary = json.loads(summary_path.read_text())
        summary["ray"] = {"attempts": attempt, "failures": failures, "steps_redone": redone,
                          "ranks": [{k: i[k] for k in ("rank", "node_ip", "pid")}
                                    for i in infos]}
        summary["restarts"] = len(failures)
        summary["steps_redone"] = redone
        run_dir.write_json("summary.json", summary)
    finally:
        display.close()
        if started:
            ray.shutdown()


__all__ = ["launch_ray", "RayJobFailure", "RankActor", "Watchdog"]
