"""Ray runtime (design.md §3, §7): `ray job submit` on a loopback cluster, the embedded default,
an actor killed mid-run, a hung collective, two nodes in network namespaces, and listeners.

Every job here is the same tiny run (tiny-gpt2, 2 ZeRO-3 ranks on gloo, 6 GA steps, a checkpoint
every 3 steps). The reference is the local launcher on the same config: the Ray runtime runs the
same `run_rank` on the same ranks, so losses and weights must agree to float round-off. We use
TOL = 1e-6 (absolute and relative); in practice they are bit-identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PROGRESS_LINE, tiny_config
from tests.ray_helpers import (
    LOOPBACK,
    WILDCARD,
    ListenerWatch,
    NetnsUnavailable,
    TwoHosts,
    base_env,
    losses,
    matching_pids,
    run_u2a,
    run_watched,
    start_loopback_head,
    write_config,
)
from u2a_dist.allocator import find_jemalloc

TOL = 1e-6
STEPS, EVERY = 6, 3
EXCLUDES = [".venv", "runs", ".git", "benchmarks/results", "**/__pycache__"]

pytestmark = pytest.mark.ray


def job_config(out: Path, **runtime) -> dict:
    return tiny_config(out, unlearn={"steps": STEPS},
                       runtime={"world_size": 2, "checkpoint_every": EVERY, **runtime})


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The reference: the local launcher (plain processes) on the same config."""
    root = tmp_path_factory.mktemp("local")
    cfg = write_config(root / "cfg.yaml", job_config(root / "run"))
    res = run_u2a(["run", "--config", str(cfg), "--launcher", "local"], base_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert PROGRESS_LINE.search(res.stdout), res.stdout[-3000:]  # the local driver's view
    assert len(losses(root / "run")) == STEPS
    return root / "run"


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([v for _, v in got], dtype=torch.float64),
                               torch.tensor([v for _, v in want], dtype=torch.float64),
                               rtol=TOL, atol=TOL)
    a, b = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" /
                                                                      "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=TOL, atol=TOL, msg=key)


def ranks_of(run: Path) -> list[dict]:
    return json.loads((run / "logs" / "ray_ranks.json").read_text())


def test_watchdog_needs_silence_and_idle_cpu():
    from u2a_dist.runtime.ray import RayJobFailure, Watchdog, parse_fault

    dog = Watchdog(30.0, now=0.0)
    dog.cpu({0: 0.0, 1: 0.0}, now=0.0)
    dog.cpu({0: 9.0, 1: 0.0}, now=20.0)  # rank 0 used 45% of a core: working, not hung
    assert not dog.expired(now=45.0)
    dog.cpu({0: 9.1, 1: 0.1}, now=40.0)  # both idle from here on
    assert not dog.expired(now=49.0) and dog.expired(now=51.0)
    dog.event(now=51.0)
    assert not dog.expired(now=80.0)
    # A rank stalled on major page faults (memory pressure) is slow, not hung.
    dog = Watchdog(30.0, now=0.0)
    dog.cpu({0: 0.0}, now=0.0, faults={0: 0})
    dog.cpu({0: 0.1}, now=20.0, faults={0: 500})
    assert not dog.expired(now=45.0)
    dog.cpu({0: 0.2}, now=40.0, faults={0: 510})
    assert dog.expired(now=51.0)
    assert parse_fault("1:4") == (1, 4, "exit") and parse_fault("0:2:hang") == (0, 2, "hang")
    assert parse_fault(None) is None
    with pytest.raises(RayJobFailure, match="RANK:STEP"):
        parse_fault("1:four")


@pytest.mark.slow
def test_ray_job_submit_on_loopback_cluster_matches_local(tmp_path, local_run):
    """`ray start --head` on 127.0.0.1, `ray job submit --working-dir .`, same losses as local;
    every listener of the cluster, rank actors included, is on loopback."""
    cfg = write_config(tmp_path / "cfg.yaml", job_config(tmp_path / "run"))
    cluster = start_loopback_head(num_cpus=2)
    try:
        watch = ListenerWatch(markers=cluster.markers)
        t0 = time.monotonic()
        res = run_watched(
            [str(Path(cluster.env["PATH"].split(":")[0]) / "ray"), "job", "submit",
             "--address", cluster.dashboard, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
             "--", "python", "launcher/ray_submit.py", "--config", str(cfg)],
            cluster.env, timeout=600, watch=watch)
        elapsed = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-5000:]
        assert "succeeded" in out and "[u2a] ray: 2 ranks on 1 node(s)" in out, out[-3000:]
        assert PROGRESS_LINE.search(out), out[-3000:]  # the job driver's view, in its logs
        print(f"ray job submit: {elapsed:.1f} s")
        watch.sample()
    finally:
        alive = cluster.stop()
    assert alive == [] and matching_pids(cluster.markers) == []
    # The job ran on the cluster we started (not an embedded one): the rank actors were
    # children of its raylet, so the watch saw the rendezvous store rank 0 hosted.
    placement = ranks_of(tmp_path / "run")[-1]
    master_ip, master_port = placement["master"].rsplit(":", 1)
    assert master_ip == "127.0.0.1"
    assert any(port == int(master_port) and ip in LOOPBACK for _, _, ip, port in watch.seen), (
        f"rank 0's store {placement['master']} was never seen listening: {sorted(watch.seen)}")
    assert {r["node_ip"] for r in placement["ranks"]} == {"127.0.0.1"}
    assert watch.bad(LOOPBACK) == [], f"listeners off loopback: {watch.bad(LOOPBACK)}"
    assert_same_run(tmp_path / "run", local_run)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["restarts"] == 0
    # each rank ran on the malloc runtime.allocator=auto picks (jemalloc where installed),
    # passed through the actors' runtime_env
    assert summary["memory"]["allocator"] == [
        "jemalloc" if find_jemalloc() else "system"] * 2, summary["memory"]


@pytest.mark.slow
def test_demo_runs_on_the_embedded_default(tmp_path):
    """`u2a demo` starts its own Ray (no cluster, no RAY_ADDRESS): 2 ZeRO-3 rank actors on
    127.0.0.1, and every listener of the embedded cluster is on loopback."""
    watch = ListenerWatch()
    res = run_u2a(["demo", "--model", "tiny-gpt2", "--out", str(tmp_path / "demo"),
                   "unlearn.steps=2", "eval.every=2", "data.max_length=64"],
                  base_env(), timeout=600, watch=watch)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "(ray launcher)" in out and "[u2a] ray: 2 ranks on 1 node(s)" in out, out[-3000:]
    assert PROGRESS_LINE.search(res.stdout), out[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2
    assert [r["node_ip"] for r in summary["ray"]["ranks"]] == ["127.0.0.1", "127.0.0.1"]
    assert len({r["pid"] for r in summary["ray"]["ranks"]}) == 2
    # The watch covered the embedded cluster (GCS) and the rank actors (rank 0's store).
    master = ranks_of(tmp_path / "demo")[-1]["master"]
    assert any(name == "gcs_server" for _, name, _, _ in watch.seen), sorted(watch.seen)
    assert any(f"{ip}:{port}" == master for _, _, ip, port in watch.seen), sorted(watch.seen)
    assert watch.bad(LOOPBACK) == [], f"listeners off loopback: {watch.bad(LOOPBACK)}"


@pytest.mark.slow
def test_killed_actor_restarts_from_checkpoint_with_nothing_lost(tmp_path, local_run):
    """Rank 1's process dies after step 5 (checkpoint at 3) on the first attempt; the group is
    torn down, restarted from step 3, and ends with the uninterrupted run's weights."""
    cfg = write_config(tmp_path / "cfg.yaml", job_config(tmp_path / "run"))
    res = run_u2a(["run", "--config", str(cfg), "--launcher", "ray"],
                  base_env(U2A_RAY_FAULT="1:5"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "rank 1's actor died" in out and "restarting from checkpoint step 3" in out, out[-4000:]
    assert "2 logged step(s) past it (4-5) will be redone" in out, out[-4000:]
    assert "finished after 1 restart(s); 2 step(s) redone in all" in out, out[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps_redone"] == 2
    assert summary["resumed_from"] == 3 and summary["step"] == STEPS
    (failure,) = summary["ray"]["failures"]
    assert failure["rank"] == 1 and failure["checkpoint_step"] == 3
    attempts = ranks_of(tmp_path / "run")
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["ranks"][1]["pid"] != attempts[1]["ranks"][1]["pid"]  # a new process
    assert not (tmp_path / "run" / "error.json").exists()
    assert_same_run(tmp_path / "run", local_run)


@pytest.mark.slow
def test_hung_collective_times_out_with_a_clear_error(tmp_path):
    """Rank 1 stops after step 2 and never returns: the job ends after runtime.timeout_s with
    one clear line, not a hang, and is not retried."""
    cfg = write_config(tmp_path / "cfg.yaml",
                       job_config(tmp_path / "run", checkpoint_every=0, timeout_s=20))
    res = run_u2a(["run", "--config", str(cfg), "--launcher", "ray"],
                  base_env(U2A_RAY_FAULT="1:2:hang"), timeout=600)
    ended = time.time()
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("u2a: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "runtime.timeout_s" in errors[0] and ("hung" in errors[0]), errors[0]
    steps = [s for s, _ in losses(tmp_path / "run")]
    assert steps == [1, 2], (steps, errors[0])  # rank 0 could not finish step 3 without rank 1
    # From rank 0's last log line (step 2, just before the hang) to the end of the job: the
    # timeout, the settle time after a rank's error, teardown; not a hang.
    after_hang = ended - (tmp_path / "run" / "metrics.jsonl").stat().st_mtime
    print(f"job ended {after_hang:.0f} s after the last step: {errors[0]}")
    assert "Traceback" not in res.stderr
    assert 20 <= after_hang < 20 + 120, after_hang


@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_in_network_namespaces(tmp_path, local_run):
    """A head in one network namespace, a worker node in another (veth, own addresses); SPREAD
    puts the 2 ranks on different nodes and ZeRO-3 runs across them with the same losses."""
    try:
        hosts = TwoHosts.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"two-node test: {exc}")
    from tests.ray_helpers import Cluster, new_token

    (ns_a, ns_b), (ip_a, ip_b) = hosts.names, hosts.ips
    env = base_env(multinode=True, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=new_token())
    cluster = Cluster(env=env, gcs=f"{ip_a}:6379", namespaces=list(hosts.names))
    try:
        cluster.ray_start(["--head", f"--node-ip-address={ip_a}", "--port=6379",
                           "--include-dashboard=false", "--num-cpus=1"], netns=ns_a)
        cluster.ray_start([f"--address={ip_a}:6379", f"--node-ip-address={ip_b}",
                           "--num-cpus=1"], netns=ns_b)
        cfg = write_config(tmp_path / "cfg.yaml",
                           job_config(tmp_path / "run", placement_strategy="SPREAD",
                                      ray_address=f"{ip_a}:6379"))
        watch = ListenerWatch(namespaces=list(hosts.names))
        res = run_u2a(["run", "--config", str(cfg), "--launcher", "ray"], env, timeout=600,
                      netns=ns_a, watch=watch)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-5000:]
        watch.sample()
        addrs = {ns: hosts.addresses(ns) for ns in hosts.names}
    finally:
        alive = cluster.stop()
        hosts.remove()
    assert alive == [] and not hosts.exists()
    placement = ranks_of(tmp_path / "run")[-1]
    node_ips = [r["node_ip"] for r in placement["ranks"]]
    assert sorted(node_ips) == [ip_a, ip_b], node_ips  # one rank per node, own addresses
    assert len({r["node_id"] for r in placement["ranks"]}) == 2
    assert "2 ranks on 2 node(s) (SPREAD)" in out
    assert placement["master"] == f"{node_ips[0]}:{placement['master'].rsplit(':', 1)[1]}"
    assert_same_run(tmp_path / "run", local_run)
    # Listeners: our rendezvous store and gloo bind the node address itself. Ray's own C++
    # servers (GCS, raylet) bind the wildcard whenever the node IP is not loopback (Ray 2.60 has
    # no setting for it); inside these namespaces the wildcard reaches only lo and the test's
    # veth address, which we check.
    allowed = LOOPBACK | {ip_a, ip_b, f"::ffff:{ip_a}", f"::ffff:{ip_b}"}
    master_port = int(placement["master"].rsplit(":", 1)[1])
    assert any(ip == node_ips[0] and port == master_port for _, _, ip, port in watch.seen), (
        sorted(watch.seen))  # rank 0's store, on its node's address, not on the wildcard
    assert watch.bad(allowed | WILDCARD) == [], watch.bad(allowed | WILDCARD)
    for ns, ip in zip(hosts.names, hosts.ips):
        flat = {a for values in addrs[ns].values() for a in values}
        assert flat <= {"127.0.0.1", "::1", ip} | {a for a in flat if a.startswith("fe80:")}, (
            ns, addrs[ns])


@pytest.mark.slow
def test_an_actor_killed_past_max_failures_leaves_error_json(tmp_path):
    """runtime.max_failures=0: rank 1's actor dies after step 2 and the job gives up; the
    driver writes error.json (the killed actor could not), naming the rank and the failure."""
    cfg = job_config(tmp_path / "run")
    cfg["runtime"]["max_failures"] = 0
    res = run_u2a(["run", "--config", str(write_config(tmp_path / "cfg.yaml", cfg)),
                   "--launcher", "ray"], base_env(U2A_RAY_FAULT="1:2"), timeout=600)
    assert res.returncode == 1, (res.stdout + res.stderr)[-4000:]
    assert "more than runtime.max_failures=0" in res.stderr
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["error"] == "RayJobFailure" and error["rank"] == 1
    assert [f["rank"] for f in error["failures"]] == [1]
