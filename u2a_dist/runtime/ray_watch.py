"""The driver's hang watchdog over a running group (the progress display is ``display``).

Imports no ray.
"""

from __future__ import annotations

import time

BUSY_WINDOW_S = 10.0  # the watchdog's CPU-use window
# A rank using this share of a core over a window is working, not hung. Low on purpose: on an
# oversubscribed machine a busy rank may get a quarter of a core; a hung one uses ~1% or less.
BUSY_FRACTION = 0.05
BUSY_FAULTS = 50  # ... or taking this many major page faults in a window (stalled on memory)
WATCHDOG_FACTOR = 2  # the watchdog's silence limit, in runtime.timeout_s


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
