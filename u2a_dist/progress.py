"""A rank's progress events: which phase the job is in and how far along it is.

A process-wide sink, as `logging` has handlers: a phase deep inside generation or the selector
reports without a parameter threaded through every call between it and the launcher. Only
rank 0 sets a sink (``set_sink``); on the other ranks every call is a no-op.

Phases nest (``evaluation › generate``). Each event is one JSON-serialisable dict::

    {"kind": "advance", "path": ["train"], "done": 7, "total": 30, "unit": "step",
     "what": None, "metrics": {"loss": 2.29}}

sent when a phase starts (``kind: start``), as it advances, at most every
``MIN_INTERVAL_S`` unless an advance carries metrics or completes the phase, and when it ends
(``kind: end``). The launcher turns
them into the driver's display (``u2a_dist.runtime.display``): local ranks print them as lines
of their log, Ray ranks hand them to the driver through their actor, and under the `deepspeed`
launcher rank 0 draws the display itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

Event = dict[str, Any]
T = TypeVar("T")
#: Advances are sent at most this often (a SmolLM2 scoring pass has hundreds of batches).
MIN_INTERVAL_S = 1.0
#: The prefix of an event line in a local rank's log (read back by the local launcher).
LINE_PREFIX = "[u2a:progress] "
#: The metrics a training step's event carries (the full record is in metrics.jsonl).
STEP_KEYS = ("loss", "forget/nll", "pa/accuracy", "eval/harmful_rate", "eval/harmful_no_refusal",
             "eval/over_refusal", "eval/retain_ppl_ratio", "selector/support")

_sink: Callable[[Event], None] | None = None
_stack: list[Phase] = []


def set_sink(sink: Callable[[Event], None] | None) -> None:
    """Where this process's events go (None: nowhere, the default)."""
    global _sink
    _sink = sink
    _stack.clear()


def active() -> bool:
    return _sink is not None


def step_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The STEP_KEYS of a metrics record, rounded for display."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
            if k in STEP_KEYS}


class Phase:
    """One open phase; ``advance`` moves it on."""

    def __init__(self, path: list[str], total: int | None, done: int, unit: str,
                 what: str | None) -> None:
        self.path, self.total, self.done, self.unit, self.what = path, total, done, unit, what
        self._sent = float("-inf")

    def event(self, kind: str = "advance", metrics: dict[str, Any] | None = None) -> Event:
        return {"kind": kind, "path": self.path, "done": self.done, "total": self.total,
                "unit": self.unit, "what": self.what, "metrics": metrics}

    def advance(self, n: int = 1, *, to: int | None = None, what: str | None = None,
                metrics: dict[str, Any] | None = None) -> None:
        self.done = to if to is not None else self.done + n
        if what is not None:
            self.what = what
        now = time.monotonic()
        if _sink is None:
            return
        finished = self.total is not None and self.done >= self.total
        if metrics is not None or finished or now - self._sent >= MIN_INTERVAL_S:
            self._sent = now
            _sink(self.event(metrics=metrics))


class _Nothing(Phase):
    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def phase(name: str, total: int | None = None, *, done: int = 0, unit: str = "",
          what: str | None = None) -> Iterator[Phase]:
    """A phase of the job, nested in the one open around it. Re-entrant: inside a phase of the
    same name (an evaluation that its caller already reports as one) it is that phase."""
    if _sink is None:
        yield _Nothing([name], total, done, unit, what)
        return
    if _stack and _stack[-1].path[-1] == name:
        yield _stack[-1]
        return
    parent = _stack[-1].path if _stack else []
    ph = Phase([*parent, name], total, done, unit, what)
    _stack.append(ph)
    ph._sent = time.monotonic()
    _sink(ph.event("start"))
    try:
        yield ph
    finally:
        _stack.remove(ph)
        if _sink is not None:
            _sink(ph.event("end"))


def each(name: str, items: Sequence[T], unit: str = "batch") -> Iterator[T]:
    """``items`` reported as a phase: one advance per item."""
    with phase(name, len(items), unit=unit) as ph:
        for item in items:
            yield item
            ph.advance()
