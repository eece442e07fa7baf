"""The driver's live view of a run: progress events (``u2a_dist.progress``) drawn as bars or lines.

Modes: ``bar`` (tqdm, for a terminal), ``plain`` (one line per training step, per top-level
phase and at most every ``UPDATE_S`` within a phase; for logs, `ray job logs`, CI), ``none``
(progress hidden; the launcher's own messages still print) and ``auto`` (``bar`` on a terminal,
else ``plain``), from ``--progress`` or ``U2A_PROGRESS``. Whatever the phase, a plain view
prints a line at least every ``HEARTBEAT_S``: a model loading for two minutes shows that it is.

A line: total elapsed, the phase path with done/total, and the innermost phase's ETA::

    [u2a] 3:05 | train 15/30 steps (50%) › evaluation (step 15) › generate 3/8 batches | ETA 1:12

Imports no ray and no torch.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from u2a_dist.progress import STEP_KEYS as SHOWN

MODES = ("auto", "bar", "plain", "none")
ENV = "U2A_PROGRESS"
HEARTBEAT_S = 15.0  # the longest a plain view stays silent (issue 24: a line every 30 s)
UPDATE_S = 10.0  # within a phase, a plain view prints at most this often (steps excepted)


def resolve_mode(mode: str | None, stream: TextIO | None = None) -> str:
    """``--progress`` (or $U2A_PROGRESS, else auto) -> bar | plain | none."""
    mode = mode or os.environ.get(ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        stream = stream or sys.stdout
        return "bar" if hasattr(stream, "isatty") and stream.isatty() else "plain"
    return mode


def clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _State:
    total: int | None
    done: int
    unit: str
    what: str | None
    started: float  # the view's clock when the phase started
    start_done: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def eta(self, now: float) -> float | None:
        moved = self.done - self.start_done
        if self.total is None or moved <= 0 or self.done >= self.total:
            return None
        return (now - self.started) / moved * (self.total - self.done)

    def label(self, name: str) -> str:
        text = name
        if self.total:
            unit = f" {_plural(self.unit) if self.total != 1 else self.unit}".rstrip()
            text += f" {self.done}/{self.total}{unit} ({100 * self.done // self.total}%)"
        if self.what:
            text += f": {self.what}"
        return text


class ProgressView:
    """Draws progress events; thread-safe; a heartbeat thread keeps a plain view talking."""

    def __init__(self, mode: str | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self.clock = clock
        self.t0 = clock()
        self._phases: dict[tuple[str, ...], _State] = {}
        self._current: tuple[str, ...] = ()
        self._after: str | None = None  # the last top-level phase that ended
        self._printed = self.t0
        self._lock = threading.RLock()
        self._bar: Any = None
        self._bar_path: tuple[str, ...] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat and self.mode != "none":
            self._thread = threading.Thread(target=self._beat, name="u2a-progress", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- events

    def event(self, e: dict[str, Any]) -> None:
        path = tuple(e["path"])
        with self._lock:
            now = self.clock()
            if e["kind"] == "end":
                self._end(path, now)
                return
            state = self._phases.get(path)
            if e["kind"] == "start" or state is None:
                if len(path) == 1:  # top-level phases run one after another
                    self._phases.clear()
                for p in [p for p in self._phases if p[:len(path)] == path]:
                    del self._phases[p]  # a restarted phase's old children are gone
                state = _State(e.get("total"), e.get("done", 0), e.get("unit", ""),
                               e.get("what"), now, e.get("done", 0))
                self._phases[path] = state
                self._current = path
                if len(path) == 1:  # a new top-level phase: a line that stays, in every mode
                    if self.mode == "bar":
                        self._write(self.line(now))
                    self._show(now, force=True)
                    return
            state.done, state.total = e.get("done", state.done), e.get("total", state.total)
            state.what = e.get("what", state.what)
            self._current = path
            if e.get("metrics"):
                state.metrics = e["metrics"]
            self._show(now, force=bool(e.get("metrics")))

    def _end(self, path: tuple[str, ...], now: float) -> None:
        state = self._phases.pop(path, None)
        for p in [p for p in self._phases if p[:len(path)] == path]:
            del self._phases[p]
        if state is None:
            return
        if self._current[:len(path)] == path:
            self._current = path[:-1] if path[:-1] in self._phases else ()
        if len(path) == 1:
            self._after = path[0]
            if self.mode != "none" and now - state.started >= 1.0:
                self._write(f"[u2a] {clock_text(now - self.t0)} | {path[0]} done in "
                            f"{clock_text(now - state.started)}")
        if self.mode == "bar":
            self._show(now, force=True)

    def say(self, text: str) -> None:
        """A launcher's message: printed in every mode."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)
            self._printed = self.clock()

    def tick(self) -> None:
        """The heartbeat: a plain line after HEARTBEAT_S of silence; a bar's clock moves on."""
        with self._lock:
            now = self.clock()
            if self.mode == "bar" and self._bar is not None:
                self._bar.refresh()
            elif self.mode == "plain" and now - self._printed >= HEARTBEAT_S:
                self._show(now, force=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- drawing

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state."""
        now = self.clock() if now is None else now
        path = self._current
        parts = [self._phases[path[:i + 1]].label(name) for i, name in enumerate(path)
                 if path[:i + 1] in self._phases]
        idle = f"{self._after} done" if self._after else "starting"
        text = f"[u2a] {clock_text(now - self.t0)} | " + (" › ".join(parts) or idle)
        for i in range(len(path), 0, -1):  # the innermost phase that can tell
            state = self._phases.get(path[:i])
            eta = state.eta(now) if state is not None else None
            if eta is not None:
                text += f" | ETA {clock_text(eta)}"
                break
        metrics = self._phases[path].metrics if path in self._phases else {}
        shown = [f"{k} {_num(metrics[k])}" for k in SHOWN if k in metrics]
        return text + (" | " + ", ".join(shown) if shown else "")

    def _show(self, now: float, force: bool = False) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar":
            self._draw_bar(now, force)
            return
        if force or now - self._printed >= UPDATE_S:
            self._write(self.line(now))

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
        self._printed = self.clock()

    def _draw_bar(self, now: float, force: bool) -> None:
        from tqdm import tqdm

        path = self._current
        state = self._phases.get(path)
        if path != self._bar_path:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._bar_path = path
            if state is None:
                return
            self._bar = tqdm(total=state.total, initial=state.done, file=self.stream,
                             desc=" › ".join(path), unit=state.unit or "it", leave=False,
                             dynamic_ncols=True)
        if self._bar is None or state is None:
            return
        self._bar.n = state.done
        shown = {k: _num(state.metrics[k]) for k in SHOWN if k in state.metrics}
        if state.what or shown:
            self._bar.set_postfix_str(", ".join(
                ([state.what] if state.what else []) + [f"{k} {v}" for k, v in shown.items()]),
                refresh=False)
        self._bar.refresh()
        if force and any(k.startswith("eval/") for k in state.metrics):
            self._bar.write(self.line(now), file=self.stream)  # an evaluation stays on screen
        self._printed = now

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.tick()
            except Exception:  # a display error must never stop a run
                pass


def _plural(unit: str) -> str:
    if not unit or unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
