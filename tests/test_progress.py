"""The live view (issue 24): rank-side progress events, the driver's display, and the
`deepspeed` launcher's rank 0 drawing it (tests/test_lora_launchers.py, on a LoRA run; the local
and Ray launchers: tests/test_ray.py)."""

from __future__ import annotations

import io
import json

import pytest

from tests.conftest import PROGRESS_LINE
from u2a_dist import progress
from u2a_dist.runtime.display import HEARTBEAT_S, ProgressView, clock_text, resolve_mode


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def view(mode: str = "plain") -> tuple[ProgressView, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return ProgressView(mode, stream=out, clock=clock, heartbeat=False), out, clock


def ev(kind: str, path: list[str], done: int = 0, total: int | None = None,
       unit: str = "", what: str | None = None, metrics: dict | None = None) -> dict:
    return {"kind": kind, "path": path, "done": done, "total": total, "unit": unit,
            "what": what, "metrics": metrics}


@pytest.fixture
def events():
    got: list[dict] = []
    progress.set_sink(got.append)
    yield got
    progress.set_sink(None)


# ----------------------------------------------------------------------------- rank side

def test_phases_nest_and_report_start_advance_end(events):
    with progress.phase("train", 4, unit="step") as train:
        train.advance(metrics={"loss": 1.5})
        with progress.phase("evaluation", what="step 1"):
            for _ in progress.each("generate", [1, 2, 3]):
                pass
        train.advance(to=3, metrics={"loss": 1.0})
    seen = [(e["kind"], tuple(e["path"]), e["done"]) for e in events]
    assert seen[0] == ("start", ("train",), 0)
    assert ("advance", ("train",), 1) in seen and ("advance", ("train",), 3) in seen
    assert ("start", ("train", "evaluation"), 0) in seen
    assert ("start", ("train", "evaluation", "generate"), 0) in seen
    # generate's last item completes it: sent despite the throttle
    assert ("advance", ("train", "evaluation", "generate"), 3) in seen
    assert seen[-1] == ("end", ("train",), 3)
    assert json.loads(json.dumps(events)) == events  # what the local launcher reads back


def test_advances_are_throttled_but_metrics_and_completion_are_not(events, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress.phase("scores", 100, unit="batch") as ph:
        for _ in range(99):
            now[0] += 0.01  # 100 advances within one second: one event, not 99
            ph.advance()
        now[0] += progress.MIN_INTERVAL_S
        ph.advance()  # 100/100: sent
    advances = [e["done"] for e in events if e["kind"] == "advance"]
    assert advances == [100]
    events.clear()
    with progress.phase("train", 10, unit="step") as ph:
        ph.advance(metrics={"loss": 1.0})
        ph.advance(metrics={"loss": 0.9})
    assert [e["done"] for e in events if e["kind"] == "advance"] == [1, 2]


def test_a_phase_of_the_same_name_inside_is_the_same_phase(events):
    with progress.phase("evaluation", what="before"):
        with progress.phase("evaluation", what="step 0"):
            pass
    assert [(e["kind"], e["path"]) for e in events] == [("start", ["evaluation"]),
                                                        ("end", ["evaluation"])]


def test_without_a_sink_nothing_is_sent():
    progress.set_sink(None)
    with progress.phase("train", 3) as ph:
        ph.advance()
    assert list(progress.each("x", [1, 2])) == [1, 2]
    assert not progress.active()


# ----------------------------------------------------------------------------- display

def test_plain_lines_show_step_total_eta_and_metrics():
    v, out, clock = view()
    v.event(ev("start", ["train"], 0, 10, "step"))
    clock.t += 30
    v.event(ev("advance", ["train"], 3, 10, "step", metrics={"loss": 2.25, "lr": 1e-5}))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[u2a] 0:00 | train 0/10 steps (0%)"
    # 3 steps in 30 s, 7 to go: 70 s
    assert lines[1] == "[u2a] 0:30 | train 3/10 steps (30%) | ETA 1:10 | loss 2.25"
    assert PROGRESS_LINE.search(out.getvalue())


def test_nested_phases_show_their_path_and_the_innermost_eta():
    v, out, clock = view()
    v.event(ev("start", ["train"], 4, 10, "step"))
    clock.t += 5
    v.event(ev("start", ["train", "evaluation"], what="step 4"))
    v.event(ev("start", ["train", "evaluation", "generate"], 0, 8, "batch"))
    clock.t += 20
    v.event(ev("advance", ["train", "evaluation", "generate"], 2, 8, "batch"))
    assert v.line() == ("[u2a] 0:25 | train 4/10 steps (40%) › evaluation: step 4 › generate "
                        "2/8 batches (25%) | ETA 1:00")
    v.event(ev("end", ["train", "evaluation"]))
    assert v.line().startswith("[u2a] 0:25 | train 4/10 steps (40%)")
    # a new top-level phase replaces whatever was open
    v.event(ev("start", ["export"]))
    assert v.line() == "[u2a] 0:25 | export"
    v.event(ev("end", ["export"]))
    assert v.line() == "[u2a] 0:25 | export done"  # what a heartbeat says between phases


def test_a_silent_phase_still_gets_a_line_every_heartbeat():
    v, out, clock = view()
    v.event(ev("start", ["setup"], 1, 3, "stage", what="model and DeepSpeed engine"))
    n = len(out.getvalue().splitlines())
    clock.t += HEARTBEAT_S - 1
    v.tick()
    assert len(out.getvalue().splitlines()) == n  # not yet
    clock.t += 1
    v.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == n + 1 and lines[-1].startswith(f"[u2a] {clock_text(HEARTBEAT_S)} | setup")
    clock.t += HEARTBEAT_S
    v.tick()
    assert len(out.getvalue().splitlines()) == n + 2
    assert HEARTBEAT_S <= 30  # issue 24: a line at least every 30 s


def test_updates_within_a_phase_are_rate_limited():
    v, out, clock = view()
    v.event(ev("start", ["selection"], what="round 0"))
    v.event(ev("start", ["selection", "inverse HVP"], 0, 40, "HVP"))
    for i in range(1, 21):
        clock.t += 1
        v.event(ev("advance", ["selection", "inverse HVP"], i, 40, "HVP"))
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines  # the start line, then one every UPDATE_S (10 s)
    assert "inverse HVP 10/40 HVPs (25%)" in lines[1] and "ETA 0:30" in lines[1]


def test_none_mode_draws_nothing_but_messages_print():
    v, out, clock = view("none")
    v.event(ev("start", ["train"], 0, 4, "step"))
    v.event(ev("advance", ["train"], 1, 4, "step", metrics={"loss": 1.0}))
    clock.t += 100
    v.tick()
    assert out.getvalue() == ""
    v.say("[u2a] ray: restarting")
    assert out.getvalue() == "[u2a] ray: restarting\n"


def test_bar_mode_draws_a_bar_per_phase():
    v, out, clock = view("bar")
    v.event(ev("start", ["train"], 0, 4, "step"))
    v.event(ev("advance", ["train"], 2, 4, "step", metrics={"loss": 1.5}))
    v.close()
    text = out.getvalue()
    assert "[u2a] 0:00 | train 0/4 steps (0%)" in text
    assert "2/4" in text and "loss 1.5" in text


def test_mode_from_flag_env_and_terminal(monkeypatch):
    monkeypatch.delenv("U2A_PROGRESS", raising=False)
    assert resolve_mode(None, io.StringIO()) == "plain"
    monkeypatch.setenv("U2A_PROGRESS", "none")
    assert resolve_mode(None, io.StringIO()) == "none"
    assert resolve_mode("bar", io.StringIO()) == "bar"
    with pytest.raises(ValueError, match="progress mode 'loud'"):
        resolve_mode("loud")
