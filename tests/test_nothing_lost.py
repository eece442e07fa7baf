"""Nothing lost, nothing executed: each command deletes only what u2a wrote, a crash at any
point of a checkpoint save leaves a resumable run, and no pickle from a run directory runs code.

Every test drives the real CLI (``python -m u2a_dist``, 2 real ZeRO-3 ranks where it trains)
and proves what it claims from the outside: exit code, message, and checksums of every file
before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, tiny_config
from u2a_dist.checkpoint import COMPLETE, CheckpointStore
from u2a_dist.config import ConfigError, load_config
from u2a_dist.fsio import CheckpointError

STEPS = 4


def u2a(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
        timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "u2a_dist", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def checksums(root: Path) -> dict[str, str]:
    """Every file under ``root`` (logs apart: a launch appends to them) -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts}


def steps_logged(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def model_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def run_config(out: Path, **unlearn) -> dict:
    return tiny_config(out, unlearn={"steps": STEPS, **unlearn},
                       runtime={"checkpoint_every": 1}, eval={"every": 2, "target": None})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A finished 2-rank tiny run with checkpoints (run dir, its config file); copy before use."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_config(root / "c.yaml", run_config(root / "run"))
    res = u2a("run", "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run", cfg


def copy_run(finished: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    cfg = yaml.safe_load(Path(finished[1]).read_text())
    cfg["out"] = str(run)
    return run, write_config(tmp_path / "c.yaml", cfg)


# ----------------------------------------------------------------------------- 1. select

@pytest.mark.slow
def test_select_on_a_finished_run_leaves_its_training_state_alone(finished, tmp_path):
    run, cfg = copy_run(finished, tmp_path)
    before = checksums(run)
    assert {"model/model.safetensors", "model/README.md", "metrics.jsonl",
            "report.md"} <= set(before)
    res = u2a("select", "--config", cfg, "selector.top_k=4", "selector.neumann_terms=3",
              "selector.power_iters=3", "selector.hessian_batch=8")
    assert res.returncode == 0, res.stderr[-3000:]
    after = checksums(run)
    assert {k: after[k] for k in before} == before  # every file of the run, byte for byte
    assert (run / "select" / "scores.jsonl").is_file()
    assert f"{run / 'select'}/scores.jsonl" in res.stdout
    # a second select replaces its own results only
    res = u2a("select", "--config", cfg, "selector.top_k=4", "selector.neumann_terms=3",
              "selector.power_iters=3", "selector.hessian_batch=8")
    assert res.returncode == 0, res.stderr[-3000:]
    assert {k: v for k, v in checksums(run).items() if k in before} == before


# ----------------------------------------------------------------------------- 2. export

@pytest.mark.slow
def test_export_replaces_only_its_own_output_and_never_the_run(finished, tmp_path):
    run, _ = copy_run(finished, tmp_path)
    before = checksums(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    res = u2a("export", "--checkpoint", str(run), "--out", str(mine))
    assert res.returncode == 2 and f"{mine} exists and is not a u2a export" in res.stderr
    assert (mine / "notes.txt").read_text() == "a user's file"
    for out in (run, run / "checkpoints", tmp_path):  # the run itself, inside it, around it
        res = u2a("export", "--checkpoint", str(run), "--out", str(out))
        assert res.returncode == 2 and "overlaps the input" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    res = u2a("export", "--checkpoint", str(run), "--out", ".", cwd=mine)
    assert res.returncode == 2 and "Traceback" not in res.stderr and str(mine) in res.stderr
    assert checksums(run) == before and (mine / "notes.txt").is_file()
    # a new directory, then the same one again: it is u2a's now, so it is replaced
    out = tmp_path / "exported"
    for _ in range(2):
        res = u2a("export", "--checkpoint", str(run), "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert checksums(run) == before


# ----------------------------------------------------------------------------- 3. overwrite

def test_overwrite_and_demo_delete_only_u2a_run_directories(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cfg = write_config(tmp_path / "c.yaml", run_config(mine))
    res = u2a("run", "--config", cfg, "--overwrite")
    assert res.returncode == 2 and f"{mine} was not created by u2a" in res.stderr
    res = u2a("run", "--config", cfg)
    assert res.returncode == 2 and "holds files u2a did not write (e.g. " in res.stderr
    res = u2a("demo", "--model", "tiny-gpt2", "--out", str(mine))
    assert res.returncode == 2 and f"{mine} was not created by u2a" in res.stderr
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # an input inside the output is refused before anything is written
    data = tmp_path / "proj"
    data.mkdir()
    (data / "forget.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    inside = tiny_config(data, data={"forget": {"path": str(data / "forget.jsonl"),
                                                "schema": "qa"}})
    res = u2a("run", "--config", write_config(tmp_path / "c2.yaml", inside))
    assert res.returncode == 2 and "overlaps the input" in res.stderr
    assert sorted(p.name for p in data.iterdir()) == ["forget.jsonl"]


@pytest.mark.slow
def test_overwrite_of_a_u2a_run_keeps_a_users_file_in_it(finished, tmp_path):
    run, cfg = copy_run(finished, tmp_path)
    (run / "my_notes.md").write_text("mine")
    before = checksums(run)
    res = u2a("run", "--config", cfg, "--overwrite")
    assert res.returncode == 2 and "my_notes.md" in res.stderr
    assert checksums(run) == before
    (run / "my_notes.md").unlink()
    res = u2a("run", "--config", cfg, "--overwrite", "unlearn.steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps_logged(run) == [0, 1]


# ----------------------------------------------------------------------------- 4. checkpoints

def _fake_checkpoint(root: Path, tag: str, complete: bool = True) -> None:
    (root / tag).mkdir(parents=True)
    (root / tag / "part.pt").write_bytes(b"x" * 10)
    if complete:
        (root / tag / COMPLETE).write_text(json.dumps({"files": {"part.pt": 10}}))


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    """Issue item 4 as it happened: the end-of-run re-save removed the tag `latest` named
    before writing it, so `latest` named an empty directory; the rerun restarted at step 1."""
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, "step2")
    _fake_checkpoint(root, "step4", complete=False)  # a save cut short
    (root / "latest").write_text("step4\n")
    store = CheckpointStore(root)
    assert store.resume_tag() == "step2"
    assert "latest names 'step4'" in capsys.readouterr().out
    (root / "latest").write_text("../../etc\n")  # not a tag: never followed
    assert store.resume_tag() == "step2"
    (root / "step2" / "part.pt").write_bytes(b"x" * 3)  # truncated file: not complete
    with pytest.raises(CheckpointError, match="refusing to restart from step 0"):
        store.resume_tag()
    assert CheckpointStore(tmp_path / "none").resume_tag() is None


def _crash_each_then_finish(run: Path, cfg: str, crashes: list[tuple[str, str | None]]) -> str:
    """Launch the run killed (SIGKILL) at each point in turn, each launch resuming what the one
    before left; then once more to the end, which resumes from step 4. Returns its stdout."""
    for spec, resumed in crashes:  # (where it is killed, what the launch resumed from)
        res = u2a("run", "--config", cfg, env={"U2A_CRASH_AT": spec})
        assert res.returncode == 1, (spec, res.stdout[-2000:], res.stderr[-3000:])
        rank = spec.split(":")[0]
        assert f"rank {rank} was killed by SIGKILL" in res.stderr, res.stderr[-3000:]
        assert "Warning" not in res.stderr  # the failure message is the failure, not warnings
        error = json.loads((run / "error.json").read_text())
        assert error["error"] == "RankFailure" and "SIGKILL" in error["message"]
        if resumed is not None:
            assert f"resumed from step {resumed[4]}" in res.stdout
        if resumed == "step3":  # `latest` named the one before: said, not silent
            assert f"resuming from the newest complete checkpoint {resumed}" in res.stdout
        if spec == "0:during_swap:3":
            assert (run / "checkpoints" / "latest").read_text().strip() == "step2"
    res = u2a("run", "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 4" in res.stdout
    assert steps_logged(run) == [0, 1, 2, 3, 4]
    assert not (run / "error.json").exists()  # the earlier attempts' went to logs/
    assert len(list((run / "logs").glob("error-*.json"))) >= 1
    return res.stdout


def assert_same_weights(run: Path, reference_run: Path) -> None:
    reference = model_state(reference_run)
    for key, value in model_state(run).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_crash_at_every_point_of_a_checkpoint_save_loses_nothing(finished, tmp_path):
    """A run killed at each point of the checkpoint write in turn ends with the uninterrupted
    run's weights, each step logged once; its last step, saved, is not saved twice."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run_config(run))
    _crash_each_then_finish(run, cfg, [
        ("1:write:1", None),                # rank 1, its partition written, nothing sealed
        ("0:before_swap:2", None),          # sealed, not moved into place
        ("0:during_swap:3", "step1"),       # in place, `latest` still names step 2
        ("0:after_swap:4", "step3"),        # swapped, not pruned
    ])
    assert_same_weights(run, finished[0])
    for done in (run, finished[0]):  # a second copy of step 4 would have pruned step 3
        assert {p.name for p in (done / "checkpoints").glob("step*")} >= {"step3", "step4"}
        assert not (done / "checkpoints" / "step4.1").exists()


@pytest.mark.slow
def test_the_end_of_run_save_of_an_unsaved_last_step_loses_nothing(finished, tmp_path):
    """checkpoint_every 3 of 4 steps: the end-of-run save writes step 4; killed in its swap (in
    place, `latest` still naming step 3), the next launch resumes from step 4, not step 3."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        run, unlearn={"steps": STEPS}, runtime={"checkpoint_every": 3},
        eval={"every": 2, "target": None}))
    out = _crash_each_then_finish(run, cfg, [("0:final_during_swap:4", None)])
    assert "resuming from the newest complete checkpoint step4" in out
    assert_same_weights(run, finished[0])
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step3", "step4"]


def _rank_pids(run: Path) -> list[int]:
    """Live rank processes (``u2a_dist.runtime.worker --run-dir RUN``), from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"u2a_dist.runtime.worker" in args and str(run).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_a_terminated_launch_stops_its_ranks_and_the_next_one_resumes(finished, tmp_path):
    """SIGTERM to `u2a run` (a scheduler's stop, `timeout`, `kill`) stops its ranks too — none
    runs on orphaned — and the next launch resumes and ends with the uninterrupted weights."""
    import signal
    import time

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run_config(run))
    proc = subprocess.Popen([sys.executable, "-m", "u2a_dist", "run", "--config", cfg], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "latest").is_file():  # running, one step saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    ranks = _rank_pids(run)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: stopping the ranks" in err
    assert _rank_pids(run) == []
    res = u2a("run", "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step" in res.stdout
    assert steps_logged(run) == [0, 1, 2, 3, 4]
    assert_same_weights(run, finished[0])


# ----------------------------------------------------------------------------- 5. pickle

class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_a_pickle_payload_in_a_run_directory_is_refused_and_never_runs(finished, tmp_path):
    run, cfg = copy_run(finished, tmp_path)
    target = tmp_path / "pwned.txt"
    store = CheckpointStore(run / "checkpoints")
    tag = store.resume_tag()
    ckpt = run / "checkpoints" / tag
    # a trainer_state.pt of an older u2a (a pickle), and DeepSpeed's optimizer state with the
    # payload inside; the manifest is updated so that the checkpoint looks whole
    for name in ("trainer_state.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"optimizer_state_dict": _Payload(target)}, ckpt / name)
    manifest = json.loads((ckpt / COMPLETE).read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != COMPLETE}
    (ckpt / COMPLETE).write_text(json.dumps(manifest))
    res = u2a("export", "--checkpoint", str(run), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "refused to load" in res.stderr, res.stderr[-3000:]
    assert "pickled exec" in res.stderr
    res = u2a("run", "--config", cfg, "unlearn.steps=6")
    assert res.returncode == 1 and "refused to load" in (run / "error.json").read_text()
    assert not target.exists()
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # proof the payload works
    assert target.read_text() == "pwned"


# ----------------------------------------------------------------------------- 6. blow-up

@pytest.mark.slow
def test_a_blown_up_update_is_never_kept_nor_checkpointed_nor_exported(tmp_path):
    """Adam's first steps move every weight by about lr: lr 10 leaves the tiny model's weights
    (at most 1 at θ0) within 11 after step 1 and takes those that keep their direction to about
    20 after step 2, past unlearn.max_param_abs=15 (lr 1e30 passes the default bound at step 1:
    item 6 as reported)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run_config(out, lr=10.0, max_param_abs=15.0))
    res = u2a("run", "--config", cfg)
    assert res.returncode == 1
    error = json.loads((out / "error.json").read_text())
    assert error["error"] == "NonFiniteLossError" and "step 2:" in error["message"]
    assert "checkpoint step1 is the last good one" in error["message"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step1"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")] \
        == ["step1"]
    assert steps_logged(out) == [0, 1]
    res = u2a("export", "--checkpoint", str(out), "--out", str(tmp_path / "exported"))
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert max(float(t.abs().max()) for t in weights.values()) <= 15.0

    out = tmp_path / "run30"
    cfg = write_config(tmp_path / "c30.yaml", run_config(out, lr=1e30))
    res = u2a("run", "--config", cfg)
    assert res.returncode == 1 and "step 1:" in (out / "error.json").read_text()
    assert steps_logged(out) == [0] and not (out / "checkpoints" / "latest").exists()
    res = u2a("export", "--checkpoint", str(out), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


# ----------------------------------------------------------------------------- 7. bad input

@pytest.mark.parametrize("override, message", [
    ("unlearn.lr=.inf", "unlearn.lr must be a finite number"),
    ("unlearn.prox_lambda=.nan", "unlearn.prox_lambda must be a finite number"),
    ("unlearn.grad_clip=.nan", "unlearn.grad_clip must be a finite number"),
    ("selector.fd_eps=.nan", "selector.fd_eps must be a finite number or 'auto'"),
    ("selector.fd_rel_step=big", "selector.fd_rel_step must be a number or 'auto'"),
    ("selector.fd_rel_step=0", "selector.fd_rel_step must be positive"),
    ("selector.cg_iters=0", "selector.cg_iters must be > 0"),
    ("selector.ihvp=lbfgs", "selector.ihvp must be one of"),
    ("selector.score_on=prompt", "selector.score_on must be one of"),
    ("selector.hvp=exact", "selector.hvp: exact needs runtime.zero_stage 0"),
    ("selector.hvp=autograd", "selector.hvp must be one of"),
    ("unlearn.lr_scheduler_type=step", "unlearn.lr_scheduler_type must be one of"),
    ("unlearn.warmup_steps=-3", "unlearn.warmup_steps must be >= 0, got -3"),
    ("runtime.timeout_s=-5", "runtime.timeout_s must be > 0, got -5"),
    ("unlearn.max_param_abs=0", "unlearn.max_param_abs must be > 0"),
])
def test_every_numeric_key_is_checked_for_finiteness_and_sign(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(write_config(tmp_path / "c.yaml", run_config(tmp_path / "run")),
                    [override])
    assert not (tmp_path / "run").exists()


def test_integers_written_in_exponent_form_are_integers(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", run_config(tmp_path / "run")),
                      ["unlearn.steps=1e3"])
    assert cfg.unlearn.steps == 1000


def test_unreadable_inputs_name_their_file(tmp_path):
    from u2a_dist.cli import main

    latin = tmp_path / "forget.jsonl"
    row = json.dumps({"question": "caf\u00e9", "answer": "x"}, ensure_ascii=False)
    latin.write_bytes(row.encode("latin-1") + b"\n")
    fake_gz = tmp_path / "forget.jsonl.gz"
    fake_gz.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    latin_csv = tmp_path / "forget.csv"
    latin_csv.write_bytes("question,answer\ncaf\u00e9,x\n".encode("latin-1"))
    for path, message in ((latin, "not UTF-8 text"), (fake_gz, "not a valid gzip file"),
                          (latin_csv, "not UTF-8 text")):
        cfg = run_config(tmp_path / "run")
        cfg["data"]["forget"] = {"path": str(path), "schema": "qa"}
        res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
        assert res.returncode == 2 and f"{path}: {message}" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes("out: caf\u00e9\n".encode("latin-1"))
    assert main(["run", "--config", str(bad_yaml)]) == 2


# ----------------------------------------------------------------------------- 8. resume

@pytest.mark.slow
def test_a_log_line_cut_by_a_crash_is_skipped_and_resume_drops_it(tmp_path):
    """metrics.jsonl and scores.jsonl as a SIGKILL mid-append leaves them: reading skips the
    cut line, and the resume's truncation keeps the whole lines of the steps and rounds the
    checkpoint holds, byte for byte, and drops the rest."""
    from u2a_dist.rundir import RunDir

    run = RunDir(tmp_path)
    metrics = [json.dumps({"step": k, "loss": 1.0 / (k + 1)}) for k in range(4)]
    scores = [json.dumps({"round": r, "index": i, "score": 0.5 * i}) for r in (0, 1)
              for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + '\n{"step": 4, "lo')
    (tmp_path / "scores.jsonl").write_text("\n".join(scores) + '\n{"round": 1, "ind')
    assert [m["step"] for m in run.read_metrics()] == [0, 1, 2, 3]
    assert len(run.read_scores()) == 6
    run.truncate_metrics_after(2)
    run.drop_scores_from_round(1)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(f"{m}\n" for m in metrics[:3])
    assert (tmp_path / "scores.jsonl").read_text() == "".join(f"{s}\n" for s in scores[:3])


def test_a_run_can_be_extended_and_reports_theta0_as_before(finished, tmp_path):
    run, cfg = copy_run(finished, tmp_path)
    res = u2a("run", "--config", cfg, "unlearn.lr=0.5")
    assert res.returncode == 2 and "differs in unlearn.lr (0.001 -> 0.5)" in res.stderr
    before = json.loads((run / "before.json").read_text())["metrics"]
    with open(run / "metrics.jsonl", "a") as fh:  # a rank killed while appending a line
        fh.write('{"step": 5, "loss": 0.12')
    # more passes a step (less memory) may be chosen when resuming: the same gradient
    res = u2a("run", "--config", cfg, "unlearn.steps=6", "runtime.micro_batches=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming with " in res.stdout and "unlearn.steps (4 -> 6)" in res.stdout
    assert "runtime.micro_batches (1 -> 2)" in res.stdout
    assert steps_logged(run) == list(range(7))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == STEPS
    assert summary["before"]["pa/accuracy"] == before["pa/accuracy"]
    assert summary["before"]["forget/nll"] == before["forget/nll"]
    assert load_config(run / "config.yaml").unlearn.steps == 6
    res = u2a("run", "--config", cfg, "unlearn.steps=5")
    assert res.returncode == 2 and "unlearn.steps (6 -> 5): may only grow" in res.stderr
