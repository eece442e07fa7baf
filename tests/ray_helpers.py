"""Ray test plumbing: clusters on loopback or in network namespaces, listeners, clean teardown.

Every cluster a test starts gets its own short temp dir (Unix socket paths must stay under 108
bytes), its own auth token and pinned ports, and is stopped by killing exactly the processes
that belong to it (those whose command line names its temp dir or GCS address, their
descendants, and everything inside the test's namespaces). ``ray stop --force`` is not used:
it kills every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
WILDCARD = {"0.0.0.0", "::"}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked (one picked and
    closed at a time, the kernel handed the same port out twice and `ray start` refused it)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def base_env(multinode: bool = False, **extra: str) -> dict[str, str]:
    """Environment for ray/u2a subprocesses: this venv first on PATH, offline, token auth."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("U2A_RAY_FAULT",)}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # "0" keeps an embedded/loopback cluster on 127.0.0.1, but it also forbids a worker node
        # from joining: the namespace cluster needs "1" (its node IPs are explicit anyway).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multinode else "0",
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def run_u2a(args: list[str], env: dict[str, str], timeout: int = 420,
            netns: str | None = None, watch: ListenerWatch | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m u2a_dist.cli ARGS` (inside `netns` if given); sample listeners while it runs."""
    cmd = [sys.executable, "-m", "u2a_dist.cli", *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return run_watched(cmd, env, timeout, watch)


def run_watched(cmd: list[str], env: dict[str, str], timeout: int,
                watch: ListenerWatch | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if watch is not None:
        watch.roots.append(proc.pid)
        watch.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree([proc.pid])
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s\n{out[-4000:]}\n"
                             f"{err[-4000:]}") from None
    finally:
        if watch is not None:
            watch.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------ processes/listeners

def _descendants(pids: list[int]) -> set[psutil.Process]:
    found: set[psutil.Process] = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            found.add(p)
            found.update(p.children(recursive=True))
        except psutil.Error:
            continue
    return found


def matching_pids(markers: list[str]) -> list[int]:
    """Processes whose command line contains any marker (a cluster's temp dir / GCS address)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if any(m in line for m in markers) and p.pid != os.getpid():
            out.append(p.pid)
    return out


def netns_pids(name: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(x) for x in res.stdout.split()]


def kill_tree(pids: list[int], wait_s: float = 20.0) -> list[int]:
    """SIGKILL these processes and all their descendants; return the PIDs still alive."""
    procs = _descendants(pids)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=wait_s)
    return [p.pid for p in alive]


def listeners(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every LISTEN socket of these processes and their descendants."""
    out = []
    for p in _descendants(pids):
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return out


def _hex_ip(text: str) -> str:
    """An address of /proc/net/tcp{,6} (little-endian 32-bit words) as text."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)  # written as psutil does: ::ffff:127.0.0.1
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def namespace_listeners(pid: int) -> set[tuple[str, int]]:
    """Every LISTEN (ip, port) of the network namespace that `pid` lives in.

    psutil reads the CALLER's /proc/net tables, so it sees no socket of a process in another
    namespace; /proc/<pid>/net/tcp{,6} are that process's namespace's tables.
    """
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == "0A":  # TCP_LISTEN
                ip, port = cols[1].split(":")
                found.add((_hex_ip(ip), int(port, 16)))
    return found


@dataclass
class ListenerWatch:
    """Samples listening sockets of a process tree (plus marker / namespace matches) until
    stopped, so that short-lived listeners of the rank actors are seen too."""

    roots: list[int] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    period_s: float = 1.0
    seen: set[tuple[int, str, str, int]] = field(default_factory=set)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = list(self.roots) + matching_pids(self.markers) if self.markers else list(
            self.roots)
        self.seen.update(listeners(pids))
        for ns in self.namespaces:  # the whole namespace: only this test's processes live there
            for pid in netns_pids(ns)[:1]:
                self.seen.update((pid, ns, ip, port) for ip, port in namespace_listeners(pid))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def bad(self, allowed: set[str]) -> list[tuple[int, str, str, int]]:
        return sorted(x for x in self.seen if x[2] not in allowed)


# ------------------------------------------------------------------------ clusters

def new_token() -> str:
    return secrets.token_hex(32)


@dataclass
class Cluster:
    """A Ray cluster started with `ray start` (a head, maybe a worker), stopped by `stop()`."""

    env: dict[str, str]
    temp_dirs: list[str] = field(default_factory=list)
    gcs: str = ""
    dashboard: str = ""
    namespaces: list[str] = field(default_factory=list)

    @property
    def markers(self) -> list[str]:
        return [*self.temp_dirs, self.gcs] if self.gcs else list(self.temp_dirs)

    def ray_start(self, args: list[str], netns: str | None = None) -> None:
        temp = tempfile.mkdtemp(prefix="u2ar", dir="/tmp")
        self.temp_dirs.append(temp)
        cmd = [str(BIN / "ray"), "start", *args, f"--temp-dir={temp}", "--disable-usage-stats"]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")

    def pids(self) -> list[int]:
        pids = matching_pids(self.markers)
        for ns in self.namespaces:
            pids += netns_pids(ns)
        return pids

    def stop(self) -> list[int]:
        """Kill every process of this cluster; return those that survived (should be none)."""
        alive = kill_tree(self.pids())
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        return alive


def start_loopback_head(num_cpus: int = 2) -> Cluster:
    """`ray start --head` on 127.0.0.1 with every port pinned, dashboard on 127.0.0.1."""
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=new_token())
    names = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    ports = dict(zip(names, free_ports(len(names))))
    cluster = Cluster(env=env, gcs=f"127.0.0.1:{ports['port']}",
                      dashboard=f"http://127.0.0.1:{ports['dashboard-port']}")
    try:
        cluster.ray_start(["--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--num-cpus={num_cpus}",
                           *(f"--{name}={port}" for name, port in ports.items())])
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ------------------------------------------------------------------------ namespaces

class NetnsUnavailable(Exception):
    """This machine does not allow the namespace test (no root, no `ip`, netns refused)."""


@dataclass
class TwoHosts:
    """Two network namespaces joined by a veth pair: two 'hosts' with their own addresses."""

    names: tuple[str, str]
    ips: tuple[str, str]
    links: tuple[str, str]

    @classmethod
    def create(cls) -> TwoHosts:
        if os.geteuid() != 0:
            raise NetnsUnavailable("needs root to create network namespaces")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("needs iproute2's `ip` (`make apt` installs it)")
        tag = f"{os.getpid() % 100000}"
        net = 1 + os.getpid() % 250
        hosts = cls(names=(f"u2a{tag}a", f"u2a{tag}b"),
                    ips=(f"10.213.{net}.1", f"10.213.{net}.2"),
                    links=(f"u2a{tag}va", f"u2a{tag}vb"))
        try:
            hosts._setup()
        except subprocess.CalledProcessError as exc:
            hosts.remove()
            raise NetnsUnavailable(f"`{' '.join(exc.cmd)}` failed: "
                                   f"{(exc.stderr or '').strip()}") from None
        return hosts

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def _setup(self) -> None:
        a, b = self.names
        self._ip("netns", "add", a)
        self._ip("netns", "add", b)
        self._ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for ns, link, ip in zip(self.names, self.links, self.ips):
            self._ip("link", "set", link, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", link)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "set", link, "up")
            # A default route over the veth: Ray finds a node's IP by "connecting" a UDP socket
            # to a public address; nothing answers beyond the peer.
            self._ip("-n", ns, "route", "add", "default", "dev", link)

    def addresses(self, ns: str) -> dict[str, list[str]]:
        """Interface -> addresses inside a namespace (to show a wildcard bind stays inside)."""
        res = subprocess.run(["ip", "-n", ns, "-j", "addr"], capture_output=True, text=True,
                             check=True)
        return {i["ifname"]: [a["local"] for a in i.get("addr_info", [])]
                for i in json.loads(res.stdout)}

    def remove(self) -> None:
        for ns in self.names:
            kill_tree(netns_pids(ns))
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.links[0]], capture_output=True)

    def exists(self) -> bool:
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        return any(line.split()[0] in self.names for line in res.stdout.splitlines()
                   if line.strip())

