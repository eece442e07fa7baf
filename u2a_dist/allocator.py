"""The rank processes' memory allocator (``runtime.allocator``): jemalloc when it is installed.

Why: glibc's malloc keeps the heap that a step's freed temporaries leave behind (gathered
parameters, reduce buckets, AdamW's intermediates) instead of returning it to the system. On
SmolLM2 with 2 ZeRO-3 CPU ranks that was ~1.8 GB of a rank's 6.8 GB peak; jemalloc with decay
(``MALLOC_CONF`` below) returns it within a second, at the same step time and the same numbers to
the bit (BENCHMARKS.md, "Memory"). glibc's own knobs (``MALLOC_TRIM_THRESHOLD_``) did as much for
memory but made steps 1.5x slower.

An allocator has to be in place before a process starts, so it goes into the ranks' environment
(``LD_PRELOAD``): the local launcher's ``Popen`` and the Ray actors' ``runtime_env`` set it; under
the ``deepspeed`` launcher, whose ranks we do not start, the entry point re-executes itself once
with it (``reexec_with``). Each rank reports the allocator it really runs on (``in_use``, from
its own memory map) in summary.json's ``memory.allocator``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from u2a_dist.config import ALLOCATORS, ConfigError

LIBRARY = "libjemalloc.so.2"  # Debian/Ubuntu: apt-get install libjemalloc2
# Freed pages go back to the system after ~1 s (dirty) and at once once purged (muzzy), by a
# background thread, so that a step's peak does not stay the process's size.
MALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/usr/local/lib", "/opt/homebrew/lib")
_REEXEC_FLAG = "U2A_ALLOCATOR_REEXEC"


class AllocatorError(ConfigError):
    """runtime.allocator cannot be had as asked."""


def find_jemalloc() -> str | None:
    """The path of jemalloc's shared library on this machine, or None."""
    for directory in _DIRS:
        path = Path(directory) / LIBRARY
        if path.is_file():
            return str(path)
    name = ctypes.util.find_library("jemalloc")  # ldconfig's cache: a name, not a path
    return name if name and name.startswith("libjemalloc.so") else None


def allocator_env(choice: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to add to a rank's environment for ``runtime.allocator = choice``.

    auto: jemalloc when it is installed, else nothing; jemalloc: the same, but an error when it
    is not; system: nothing. A malloc the user already preloads (any ``*malloc*`` in
    ``LD_PRELOAD``) and a ``MALLOC_CONF`` of their own are kept as they are."""
    if choice not in ALLOCATORS:
        raise AllocatorError(f"runtime.allocator must be one of {ALLOCATORS}, got {choice!r}")
    env = os.environ if environ is None else environ
    if choice == "system":
        return {}
    preload = env.get("LD_PRELOAD", "").replace(":", " ").split()
    if any("malloc" in Path(p).name for p in preload):
        return {}
    path = find_jemalloc()
    if path is None:
        if choice == "jemalloc":
            raise AllocatorError(
                f"runtime.allocator is 'jemalloc' but {LIBRARY} is not installed on this "
                "machine (Debian/Ubuntu: apt-get install libjemalloc2; or runtime.allocator="
                "system)")
        return {}
    return {"LD_PRELOAD": " ".join([path, *preload]),
            "MALLOC_CONF": env.get("MALLOC_CONF", MALLOC_CONF)}


def in_use() -> str:
    """'jemalloc' when this process has jemalloc mapped (preloaded), else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def check(choice: str) -> None:
    """In a rank: fail when ``runtime.allocator: jemalloc`` was asked for and is not in use
    (with ``auto``, a node without the library runs on the system's malloc)."""
    if choice == "jemalloc" and in_use() != "jemalloc":
        raise AllocatorError(
            f"runtime.allocator is 'jemalloc' but this rank (pid {os.getpid()}) does not run on "
            f"it: {LIBRARY} missing on this node, or LD_PRELOAD not passed to the rank")


def reexec_with(choice: str) -> None:
    """Replace this process by itself (same pid, same arguments) with the allocator preloaded,
    unless it is already in use, not wanted, or this is the re-executed process already."""
    env = allocator_env(choice)
    if not env or in_use() == "jemalloc" or os.environ.get(_REEXEC_FLAG):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, **env, _REEXEC_FLAG: "1"})
