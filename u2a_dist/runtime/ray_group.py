"""One attempt on Ray, driver side: connect to the cluster, place and start the group of rank
actors and wire up the rendezvous, watch the job run, tear the group down."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before ray is imported, as in u2a_dist.runtime.ray (ray reads it once, on import): whichever
# of the runtime's modules imports ray first sets it.
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

from u2a_dist.allocator import allocator_env  # noqa: E402
from u2a_dist.config import RunConfig  # noqa: E402
from u2a_dist.rundir import RunDir  # noqa: E402
from u2a_dist.runtime.display import ProgressView  # noqa: E402
from u2a_dist.runtime.ray_actor import RankActor  # noqa: E402
from u2a_dist.runtime.ray_faults import RayJobFailure, _GroupLost  # noqa: E402
from u2a_dist.runtime.ray_watch import WATCHDOG_FACTOR, Watchdog  # noqa: E402

POLL_S = 0.5  # driver poll period (metrics, liveness)
SETTLE_S = 10.0  # after a rank raises: how long to wait for the rest of the group to report
START_TIMEOUT_S = 600  # actor start-up and imports (at least; runtime.timeout_s if larger)
PLACE_TIMEOUT_S = 120  # waiting for the placement group (at least; runtime.timeout_s if larger)
ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "U2A_LOG_LEVEL",
                   "TORCH_EXTENSIONS_DIR")


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


def _actor_env(embedded: bool, allocator: str = "auto") -> dict[str, str]:
    """Environment of the rank processes (the node's own Ray settings are left alone).
    ``allocator``'s library is looked up here, on the driver's machine: a node without it
    runs its rank on the system's malloc (reported in summary.json; an error for 'jemalloc')."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ})
    env.update(allocator_env(allocator))
    if embedded:  # same machine: the driver's copy of the package, wherever it was started
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def _start_group(cfg: RunConfig, run_dir: RunDir, attempt: int, display: ProgressView,
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
    env = _actor_env(embedded, cfg.runtime.allocator)
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


def _watch(group: _Group, cfg: RunConfig, run_dir: RunDir, display: ProgressView,
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


def _poll(group: _Group, dog: Watchdog, display: ProgressView) -> None:
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
            if event["event"] == "progress":
                display.event(event["progress"])
    dog.cpu(cpu, faults=faults)

