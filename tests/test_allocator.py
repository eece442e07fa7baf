"""The ranks' malloc (runtime.allocator, u2a_dist/allocator.py; issue 23).

What the launchers add to a rank's environment, checked against the user's own settings; and in
real processes: that the environment really puts jemalloc under a process (its memory map), and
that it does what it is there for — a step's freed temporaries go back to the system, where
glibc's malloc keeps them (the pattern of a ZeRO-3 step: many gathered/bucket-sized buffers
freed while a later one is still alive). The runs of the launchers report each rank's malloc in
summary.json (tests/test_report_to.py local, tests/test_ray.py Ray, tests/test_progress.py the
`deepspeed` launcher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from u2a_dist import allocator
from u2a_dist.allocator import MALLOC_CONF, AllocatorError, allocator_env, find_jemalloc

JEMALLOC = find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 not installed "
                                    "(make apt installs it as root)")

# A child that allocates ~1.2 GB in 2.4 MB tensors (a reduce bucket's size order), keeps the
# last one (so glibc cannot trim its heap's top), frees the rest, waits past jemalloc's 1 s
# decay and reports its resident memory before, at the peak and after, and its malloc.
CHILD = r"""
import json, time, torch
from u2a_dist.allocator import in_use
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
t = torch.empty(600_000); del t          # glibc raises its mmap threshold past this size
base = rss()
bufs = [torch.ones(600_000) for _ in range(500)]
peak = rss()
keep = bufs[-1]
del bufs
time.sleep(2.5)
print(json.dumps({"base": base, "peak": peak, "after": rss(), "malloc": in_use()}))
"""


def child(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.update(env_extra, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_what_each_choice_adds_to_a_ranks_environment(monkeypatch):
    assert allocator_env("system", {}) == {}
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")
    assert allocator_env("auto", {}) == {"LD_PRELOAD": "/lib/libjemalloc.so.2",
                                         "MALLOC_CONF": MALLOC_CONF}
    assert allocator_env("jemalloc", {}) == allocator_env("auto", {})
    # the user's own preloads stay (after it), their MALLOC_CONF wins, their malloc is theirs
    env = allocator_env("auto", {"LD_PRELOAD": "/x/libfoo.so:/x/libbar.so",
                                 "MALLOC_CONF": "narenas:2"})
    assert env == {"LD_PRELOAD": "/lib/libjemalloc.so.2 /x/libfoo.so /x/libbar.so",
                   "MALLOC_CONF": "narenas:2"}
    assert allocator_env("auto", {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) == {}
    with pytest.raises(AllocatorError, match="runtime.allocator"):
        allocator_env("mimalloc", {})

    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    assert allocator_env("auto", {}) == {}  # not installed: the system's malloc
    with pytest.raises(AllocatorError, match=r"runtime.allocator is 'jemalloc'.*libjemalloc2"):
        allocator_env("jemalloc", {})


def test_a_rank_asked_for_jemalloc_without_it_fails_naming_the_key():
    if allocator.in_use() == "jemalloc":
        pytest.skip("the test process itself runs on jemalloc")
    allocator.check("auto")  # auto: the system's malloc is acceptable
    with pytest.raises(AllocatorError, match="runtime.allocator is 'jemalloc'"):
        allocator.check("jemalloc")


@needs_jemalloc
def test_jemalloc_returns_a_steps_freed_buffers_where_glibc_keeps_them():
    glibc = child(allocator_env("system"))
    jemalloc = child(allocator_env("auto", {}))
    assert glibc["malloc"] == "system" and jemalloc["malloc"] == "jemalloc"
    gb = 1e9
    for r in (glibc, jemalloc):  # both really held the 1.2 GB at the peak
        assert r["peak"] - r["base"] > 1.1 * gb, r
    kept_glibc = (glibc["after"] - glibc["base"]) / gb
    kept_jemalloc = (jemalloc["after"] - jemalloc["base"]) / gb
    print(f"kept after free: glibc {kept_glibc:.2f} GB, jemalloc {kept_jemalloc:.2f} GB")
    assert kept_glibc > 1.0, glibc  # the heap's freed pages stay resident
    assert kept_jemalloc < 0.1, jemalloc  # only the kept buffer (2.4 MB) and the arenas


def test_a_bad_allocator_exits_2_naming_the_key(tmp_path):
    import yaml

    from tests.conftest import REPO, tiny_config

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    res = subprocess.run([sys.executable, "-m", "u2a_dist", "run", "--config",
                          str(tmp_path / "c.yaml"), "runtime.allocator=tcmalloc"], cwd=REPO,
                         text=True, capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "runtime.allocator" in res.stderr and "'jemalloc'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
