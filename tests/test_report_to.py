"""A run people can watch: ``runtime.report_to: tensorboard`` mirrors metrics.jsonl into
TensorBoard event files (u2a_dist.tracking), and report.md shows the metrics as PNG figures
(u2a_dist.plots), always.

The run test drives the real CLI (2 ZeRO-3 CPU ranks) and reads the event files back with
TensorBoard's own reader; the rest are units: the figures of a synthetic metrics.jsonl, the
config's errors, and a resumed writer hiding the steps a restart redoes.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config
from u2a_dist.allocator import find_jemalloc
from u2a_dist.config import ConfigError, config_from_dict, report_backends
from u2a_dist.fsio import RUN_ENTRIES
from u2a_dist.plots import _series, write_plots
from u2a_dist.rundir import RunDir
from u2a_dist.tracking import TENSORBOARD_DIR, Tracker, scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RANK_PEAK_GB = 1.0  # a tiny-gpt2 rank's peak RSS bound (measured: 0.51 GB)


def u2a(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "u2a_dist", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def read_events(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] as TensorBoard itself reads the directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def numeric_fields(record: dict) -> dict[str, float]:
    """What metrics.jsonl holds as a number (JSON numbers; "nan" strings and flags are not)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape


# ----------------------------------------------------------------------------- the real run

@pytest.mark.slow
def test_a_run_mirrors_every_logged_number_to_tensorboard_and_plots_its_report(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, unlearn={"steps": 4}, eval={"every": 2, "target": None},
                      runtime={"report_to": "tensorboard"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    started = time.time()
    res = u2a("run", "--config", str(tmp_path / "c.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert {TENSORBOARD_DIR, "plots"} <= RUN_ENTRIES  # --overwrite replaces them

    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    events = read_events(run / TENSORBOARD_DIR)
    expected = [(k, r["step"], v) for r in records for k, v in numeric_fields(r).items()]
    assert any(k == "pa/accuracy" for k, _, _ in expected) and any(
        k == "loss" for k, _, _ in expected)  # both kinds of record are there
    for key, step, value in expected:
        found = [v for s, v, _ in events.get(key, []) if s == step]
        assert len(found) == 1, (key, step, events.get(key))  # there, and only once
        assert math.isclose(found[0], value, rel_tol=1e-5, abs_tol=1e-6), (key, step)
    assert sum(len(v) for v in events.values()) == len(expected)  # nothing else
    walls = [w for v in events.values() for _, _, w in v]
    assert started <= min(walls) and max(walls) <= time.time()  # real clock times

    report = (run / "report.md").read_text()
    assert "## Metrics over training" in report
    links = re.findall(r"!\[[^\]]+\]\((plots/[^)]+\.png)\)", report)
    assert {"plots/training-step.png", "plots/training-time.png",
            "plots/preference-step.png"} <= set(links), links
    for link in links:
        assert_png(run / link)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(
        Path(link).name for link in links)  # every figure linked, no stray file

    # Each rank's peak resident memory, reported (issue 23): the tiny model's ranks peak at
    # about 0.5 GB (torch, DeepSpeed and transformers themselves); 1.0 GB is the stated bound.
    import json

    memory = json.loads((run / "summary.json").read_text())["memory"]["peak_rss_gb"]
    assert len(memory) == 2 and all(0.1 < gb <= TINY_RANK_PEAK_GB for gb in memory), memory
    # each rank ran on the malloc runtime.allocator=auto picks (jemalloc where installed)
    assert json.loads((run / "summary.json").read_text())["memory"]["allocator"] == [
        "jemalloc" if find_jemalloc() else "system"] * 2
    assert "peak resident memory per rank" in report and "peak resident memory" in res.stdout


def test_a_bad_report_to_on_the_command_line_exits_2_naming_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    res = u2a("run", "--config", str(tmp_path / "c.yaml"), "runtime.report_to=wandb")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "runtime.report_to" in res.stderr and "'tensorboard'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("value,backends", [
    ("none", []), ("tensorboard", ["tensorboard"]), ("all", ["tensorboard"]),
    (["tensorboard"], ["tensorboard"]), (["all", "tensorboard"], ["tensorboard"]), ([], []),
])
def test_report_to_accepts_trl_spellings(tmp_path, value, backends):
    cfg = config_from_dict(tiny_config(tmp_path, runtime={"report_to": value}))
    assert cfg.runtime.report_to == value  # kept as written: config.yaml says what was asked
    assert report_backends(cfg.runtime.report_to) == backends
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))  # the saved config reloads
    assert again.runtime.report_to == value
    assert config_from_dict(tiny_config(tmp_path)).runtime.report_to == "none"


@pytest.mark.parametrize("value", ["wandb", ["tensorboard", "wandb"], ["none", "tensorboard"],
                                   "TensorBoard", 3, None, {"tensorboard": True}])
def test_report_to_refuses_anything_else_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"runtime\.report_to") as err:
        config_from_dict(tiny_config(tmp_path, runtime={"report_to": value}))
    if value in ("wandb", 3):
        assert "supported: ['tensorboard']" in str(err.value)


def test_report_to_from_a_dotted_override_as_a_list(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path), ["runtime.report_to=[tensorboard]"])
    assert cfg.runtime.report_to == ["tensorboard"]


# ----------------------------------------------------------------------------- the writer

def test_the_writer_keeps_a_resumed_runs_steps_once_and_a_fresh_start_drops_the_old(tmp_path):
    def write(resumed_from, steps, scale):
        tracker = Tracker("tensorboard", tmp_path, resumed_from)
        for s in steps:
            tracker.log({"step": s, "time_s": s / 10, "loss": scale * s, "note": "text",
                         "selector/ihvp_term_norms": [1.0], "flag": True})
        tracker.close()
        time.sleep(1.05)  # event file names carry the second they were opened: keep the order

    write(None, range(6), 1.0)  # crashed after step 5; its checkpoint was at step 3
    write(3, range(4, 8), 10.0)  # the restart redoes 4 and 5, then goes on
    events = read_events(tmp_path / TENSORBOARD_DIR)
    assert sorted(events) == ["loss", "time_s"]  # strings, lists and flags are not scalars
    assert [(s, v) for s, v, _ in events["loss"]] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]

    write(None, range(2), 5.0)  # a fresh start over the same directory
    events = read_events(tmp_path / TENSORBOARD_DIR)
    assert [(s, v) for s, v, _ in events["loss"]] == [(0, 0.0), (1, 5.0)]
    assert len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 1


def test_the_writer_flushes_each_record_and_reopens_after_close_without_losing_any(tmp_path):
    tracker = Tracker("tensorboard", tmp_path, None)
    tracker.log({"step": 1, "loss": 1.5})
    # not closed: what a crash would leave must already be readable
    assert [(s, v) for s, v, _ in read_events(tmp_path / TENSORBOARD_DIR)["loss"]] == [(1, 1.5)]
    tracker.close()
    time.sleep(1.05)
    tracker.log({"step": 2, "loss": 2.5})  # after close: a new file, the first one kept
    tracker.close()
    assert [(s, v) for s, v, _ in read_events(tmp_path / TENSORBOARD_DIR)["loss"]] == [
        (1, 1.5), (2, 2.5)]


def test_overwrite_replaces_the_event_files_and_plots_and_nothing_else(tmp_path):
    from u2a_dist.fsio import clear_u2a_entries, mark

    run = tmp_path / "run"
    for entry in (TENSORBOARD_DIR, "plots"):
        (run / entry).mkdir(parents=True)
        (run / entry / "x").write_text("u2a's")
    mark(run, "run")
    (run / "notes.md").write_text("a user's")
    with pytest.raises(ConfigError, match="notes.md"):
        clear_u2a_entries(run)
    assert (run / TENSORBOARD_DIR / "x").is_file() and (run / "plots" / "x").is_file()
    (run / "notes.md").unlink()
    clear_u2a_entries(run)
    assert [p.name for p in run.iterdir()] == [".u2a"]


def test_report_to_none_writes_nothing(tmp_path):
    tracker = Tracker("none", tmp_path, None)
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    assert scalars({"step": 3, "loss": 2, "ok": False, "s": "x"}) == {"loss": 2.0}


# ----------------------------------------------------------------------------- the plots

def synthetic_metrics(run: Path) -> list[dict]:
    run.mkdir()
    rd = RunDir(run)
    rd.append("metrics.jsonl", {"step": 0, "time_s": 0.0, "pa/accuracy": 0.5,
                                "eval/harmful_rate": 0.6, "eval/count_harmful": 10.0,
                                "eval/harmful_rate@advbench": 0.7,
                                "eval/harmful_rate@styled": 0.5, "eval/count@advbench": 5.0})
    for step in range(1, 7):
        record = {"step": step, "time_s": 0.5 * step, "loss": -float(step),
                  "forget/nll": 2.0 + step, "lr": 1e-3}
        if step == 3:
            del record["time_s"]  # a record without the time axis
        if step == 4:
            del record["loss"]  # and one without a metric
            record["forget/nll"] = float("nan")  # metrics.jsonl writes it as "nan"
            record["floors_broken"] = "eval/over_refusal"
        if step % 3 == 0:
            record.update({"pa/accuracy": 0.5 + step / 20, "eval/harmful_rate": 0.6 - step / 20,
                           "eval/harmful_rate@advbench": 0.7 - step / 20,
                           "eval/harmful_rate@styled": 0.5})
        rd.append("metrics.jsonl", record)
    rd.append("metrics.jsonl", {"step": 6, "round": 2, "selector/J": 0.3,
                                "selector/ihvp_term_norms": [1.0, 0.5]})  # no time_s
    return rd.read_metrics()


def test_plots_draw_each_group_against_step_and_time_and_skip_what_has_no_data(tmp_path):
    records = synthetic_metrics(tmp_path / "run")
    out = tmp_path / "run" / "plots"
    out.mkdir()
    (out / "timing-step.png").write_bytes(PNG_MAGIC)  # an earlier run's figure
    plots = write_plots(records, out)
    names = [p.file for p in plots]
    assert names == ["training-step.png", "training-time.png", "preference-step.png",
                     "preference-time.png", "evaluation-step.png", "evaluation-time.png",
                     "selector-step.png", "sources-step.png", "sources-time.png"]
    # selector records carry no time_s: no figure against time; nothing else lingers
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert_png(out / name)
    # the points drawn: the record without time_s is on the step axis only, the one
    # without loss and the NaN are no points at all
    assert _series(records, "loss", "step") == ([1, 2, 3, 5, 6], [-1, -2, -3, -5, -6])
    assert _series(records, "loss", "time_s") == ([0.5, 1.0, 2.5, 3.0], [-1, -2, -5, -6])
    assert _series(records, "forget/nll", "step")[0] == [1, 2, 3, 5, 6]
    assert [p.axis for p in plots[:2]] == ["step", "training time (s)"]


def test_plots_of_no_metrics_are_none_and_a_failure_keeps_the_report(tmp_path, monkeypatch):
    assert write_plots([], tmp_path / "plots") == []
    assert write_plots([{"step": 1, "time_s": 1.0, "note": "x"}], tmp_path / "p2") == []

    from u2a_dist import job

    run = tmp_path / "run"
    synthetic_metrics(run)
    cfg = config_from_dict(tiny_config(run))
    summary = {"step": 6, "stopped": "budget", "train_time_s": 3.0, "eval_time_s": 1.0,
               "world_size": 2, "before": {"pa/accuracy": 0.5}, "after": {"pa/accuracy": 0.8}}
    job.write_report(RunDir(run), cfg, summary)
    report = (run / "report.md").read_text()
    assert "![Training, against step](plots/training-step.png)" in report
    assert "(plots/sources-time.png)" in report

    def broken(*_args, **_kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(job, "write_plots", broken)
    job.write_report(RunDir(run), cfg, summary)
    report = (run / "report.md").read_text()
    assert "## Metrics over training" in report and "no fonts today" in report
    assert "| pa/accuracy |" in report and "![" not in report  # the rest of the report stays
