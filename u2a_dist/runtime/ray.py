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

Modules: this one (``launch_ray``: attempts and restarts), ``ray_group`` (one attempt: connect,
start the group and the rendezvous, watch it, tear it down), ``ray_actor`` (``RankActor``),
``ray_watch`` (``Watchdog``, the progress display), ``ray_faults`` (``RayJobFailure``,
``parse_fault``, the fault hook). The names tests and callers use are importable from here.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Read once, when ray is imported: with it "0", an embedded cluster keeps 127.0.0.1; otherwise
# Ray swaps 127.0.0.1 for the routable address and binds its servers on every interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from u2a_dist.checkpoint import tag_step  # noqa: E402
from u2a_dist.config import RunConfig  # noqa: E402
from u2a_dist.rundir import RunDir  # noqa: E402
from u2a_dist.runtime.display import ProgressView  # noqa: E402
from u2a_dist.runtime.ray_actor import RankActor  # noqa: E402
from u2a_dist.runtime.ray_faults import (  # noqa: E402
    FAULT_ENV,
    RayJobFailure,
    _GroupLost,
    parse_fault,
)
from u2a_dist.runtime.ray_group import _connect, _start_group, _teardown, _watch  # noqa: E402
from u2a_dist.runtime.ray_watch import Watchdog  # noqa: E402


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


def launch_ray(run_dir: RunDir, cfg: RunConfig, view: ProgressView | None = None) -> None:
    """Run the job on Ray (embedded, the job's cluster, or runtime.ray_address) to completion.

    Restarts the whole group from the last checkpoint when an actor dies, at most
    runtime.max_failures times; raises RayJobFailure otherwise. Rank 0's progress events are
    drawn by ``view`` (made here, and closed, when not given).
    """
    fault = parse_fault(os.environ.get(FAULT_ENV))
    started, embedded = _connect(cfg)
    display = view or ProgressView()
    failures: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    try:
        attempt = 0
        while True:
            attempt += 1
            group = None
            try:
                display.event({"kind": "start", "path": ["starting ranks"], "done": 0,
                               "total": None, "unit": "", "what": f"attempt {attempt}"})
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
                    run_dir.write_json("error.json", {  # a killed actor wrote none itself
                        "error": "RayJobFailure", "rank": lost.rank, "message": lost.why,
                        "failures": failures})
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
        if view is None:
            display.close()
        if started:
            ray.shutdown()


__all__ = ["launch_ray", "RayJobFailure", "RankActor", "Watchdog"]
