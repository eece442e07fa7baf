"""Shared fixtures: environment for real multi-process tests, shared data, tiny configs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test compiles anything, but every DeepSpeed engine build imports DeepSpeed's Muon optimiser
# (is_zero_supported_optimizer), whose torch.compile decorators import inductor: ~2 s per rank
# process, ~4 s of a tiny 2-rank CLI run (measured). With dynamo off the decorators are no-ops.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
#: A driver's progress line with step/total and an ETA (u2a_dist.runtime.display), e.g.
#: ``[u2a] 0:12 | train 2/4 steps (50%) | ETA 0:03 | loss -6.2``
PROGRESS_LINE = re.compile(r"^\[u2a\] \d+:\d\d(:\d\d)? \| (.* › )?train \d+/\d+ steps "
                           r"\(\d+%\)( › .*)? \| ETA \d+:\d\d", re.M)


#: The longest test files (minutes each in CI), collected first: `make test` hands whole files to
#: two workers as they free up, so starting with the longest keeps one from finishing alone.
LONGEST_FIRST = ("test_ray.py", "test_u2a_loop.py", "test_nothing_lost.py", "test_selector.py",
                 "test_linalg.py", "test_engine.py", "test_judges.py", "test_time_to_target.py",
                 "test_lora_launchers.py", "test_lora.py")


def pytest_configure(config):
    # `make test` runs two workers on a 2-core machine: a worker's own computation (a judge
    # trained in-process, the exact linear algebra) keeps to its share of the cores, so it does
    # not starve the other worker's ranks, whose every collective waits on both being scheduled.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


def tiny_config(out: str | Path, **sections) -> dict:
    """A small, fast run on the tiny model and the built-in data (no files needed)."""
    cfg = {
        "model": {"name_or_path": "tiny-gpt2"},
        "data": {"forget": {"path": "builtin:harmful", "schema": "completions",
                            "split": "train"},
                 "pa": {"path": "builtin:all", "schema": "pairs", "split": "train"},
                 "pa_eval": {"path": "builtin:all", "schema": "pairs", "split": "eval"},
                 "max_length": 64},
        "unlearn": {"loss": "ga", "lr": 1e-3, "steps": 6, "batch_size": 4,
                    "prox_lambda": 0.1},
        "selector": {"enabled": False},
        "runtime": {"world_size": 2, "checkpoint_every": 0, "device": "cpu"},
        "eval": {"every": 3, "target": None, "batch_size": 8},
        "out": str(out),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def netns():
    """A network namespace with only loopback: the `deepspeed` launcher's rendezvous store
    listens on every interface (torch's TCPStore), which then means this namespace only."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's `ip` (make apt) for a network namespace")
    name = f"u2ads{os.getpid() % 100000}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
