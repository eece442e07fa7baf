"""What one run does, independent of how ranks were started (local, deepspeed, Ray):
``run_rank`` runs in every rank process (the driver's checks first are in ``preflight``).
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

from u2a_dist import allocator, progress
from u2a_dist.config import RunConfig, load_config
from u2a_dist.engine import init_distributed
from u2a_dist.eval_sources import source_table
from u2a_dist.evaluate import target_report
from u2a_dist.export import write_model_card
from u2a_dist.fsio import atomic_write
from u2a_dist.model_card import metric_table
from u2a_dist.plots import write_plots
from u2a_dist.rundir import RunDir
from u2a_dist.score_check import check_groups
from u2a_dist.selection_labels import kept_and_left_out
from u2a_dist.sharded import peak_memory_gb
from u2a_dist.trainer import Trainer
from u2a_dist.u2a_loop import ranking_scores, run_u2a, select_round0

log = logging.getLogger(__name__)


def job_mode(run_dir: RunDir) -> str:
    """`train` (default) or `select` (round-0 scores only), as the driver wrote it."""
    path = run_dir.path / "job.json"
    return json.loads(path.read_text()).get("mode", "train") if path.is_file() else "train"


def run_rank(cfg: RunConfig, run_dir: RunDir, at_step=None) -> dict[str, Any]:
    """Train (U2A when the selector is enabled, else uniform weights), checkpoint, export.

    In `select` mode (``u2a select``): round-0 scores of every negative, no training.
    """
    allocator.check(cfg.runtime.allocator)
    rank, world_size = init_distributed(cfg.runtime.timeout_s, cfg.runtime.device)
    try:
        trainer = Trainer(cfg, run_dir, rank, world_size)
        if job_mode(run_dir) == "select":
            return _select_only(trainer, run_dir)
        with progress.phase("evaluation", what="before"):
            before, samples_before = _before(trainer, run_dir)
        if trainer.resumed_from is not None and rank == 0:
            print(f"[u2a] resumed from step {trainer.resumed_from}", flush=True)
        result = run_training(trainer, at_step)
        trainer.close_log()  # the trackers' files are complete: training logs no more
        with progress.phase("evaluation", what="after"):
            after = _snapshot(trainer)
        # The last step, unless a checkpoint of it exists: a second copy would prune the one before
        if cfg.runtime.checkpoint_every and trainer.step != trainer.saved_step:
            trainer.save_checkpoint(final=True)
        with progress.phase("export"):
            trainer.export(run_dir.path / "model")
        summary = {**result, "world_size": world_size, "resumed_from": trainer.resumed_from,
                   "theta0_cached": trainer.theta0_cache.hits,  # θ0's work read, not redone
                   "memory": peak_memory_gb(), "before": before, "after": after,
                   "samples": {"before": samples_before, "after": _samples(trainer)},
                   **_selection(trainer, run_dir)}
        if rank == 0:
            run_dir.write_json("summary.json", summary)
            write_report(run_dir, cfg, summary)
            if (run_dir.path / "model").is_dir():  # the exported model, when there is one
                write_model_card(run_dir.path / "model", cfg, summary, run_dir.path)
        return summary
    except Exception as exc:
        if rank == 0:
            run_dir.write_json("error.json", {"error": type(exc).__name__, "message": str(exc),
                                              "rank": rank, "traceback": traceback.format_exc()})
        raise


def _before(trainer, run_dir: RunDir) -> tuple[dict[str, float], dict[str, Any]]:
    """The "before" metrics and samples of θ0: measured at a fresh start and kept in
    before.json, read back on resume (the checkpoint is not θ0)."""
    path = run_dir.path / "before.json"
    if trainer.resumed_from is not None and path.is_file():
        saved = json.loads(path.read_text())
        return saved["metrics"], saved["samples"]
    before, samples = _snapshot(trainer), _samples(trainer)
    if trainer.resumed_from is not None:
        log.warning("%s is missing: 'before' is the checkpoint at step %d, not θ0", path,
                    trainer.resumed_from)
    elif trainer.rank == 0:
        run_dir.write_json("before.json", {"metrics": before, "samples": samples})
    return before, samples


def _select_only(trainer, run_dir: RunDir) -> dict[str, Any]:
    if trainer.rank == 0:
        (run_dir.path / "scores.jsonl").unlink(missing_ok=True)
    with progress.phase("selection", what="round 0"):
        hg = select_round0(trainer)
    check = {}
    if trainer.cfg.selector.check_steps:
        check = {"check": check_groups(trainer, hg, ranking_scores(trainer, hg))}
    summary = {"mode": "select", "world_size": trainer.world_size, "n": len(hg.index),
               "support": trainer.sampler.support, "stats": hg.stats, "step": 0,
               "stopped": "select", "train_time_s": 0.0, "eval_time_s": 0.0,
               "memory": peak_memory_gb(),
               "before": {}, "after": {}, **check, **_selection(trainer, run_dir)}
    if trainer.rank == 0:
        run_dir.write_json("summary.json", summary)
    return summary


def _selection(trainer, run_dir: RunDir) -> dict[str, Any]:
    """``{"selection": …}``: what round 0 kept and left out of a labelled pool, by label
    (:func:`kept_and_left_out`, from ``scores.jsonl``: also after a resume), on rank 0."""
    if trainer.rank != 0 or not trainer.cfg.selector.enabled:
        return {}
    by_label = kept_and_left_out(run_dir.read_scores(),
                                 [e.prompt for e in trainer.forget.examples])
    return {"selection": by_label} if by_label else {}


def _snapshot(trainer) -> dict[str, float]:
    """Metrics reported before and after training (evaluation time is counted apart)."""
    out = trainer.evaluate() if trainer.has_eval() else {}
    out["forget/nll"] = trainer.forget_nll()
    return out


#: Sample generations per prompt set shown in report.md before and after training.
N_SAMPLES = 10


def _samples(trainer) -> dict[str, list[dict[str, str]]]:
    """The first N_SAMPLES harmful and harmless prompts with the latest generations."""
    gen = trainer.gen_eval
    if gen is None:
        return {}
    out = {}
    for kind, prompts in (("harmful", gen.harmful), ("harmless", gen.harmless)):
        texts = gen.last_generations.get(kind, [])
        out[kind] = [{"prompt": p.prompt, "response": t}
                     for p, t in zip(prompts[:N_SAMPLES], texts[:N_SAMPLES])]
    return out


def run_training(trainer, at_step=None) -> dict[str, Any]:
    """The training loop for this run's config: the U2A loop or plain weighted unlearning.
    ``at_step(record)`` is called with every logged record (the fault tests' hook)."""
    if trainer.cfg.selector.enabled:
        return run_u2a(trainer, at_step)
    return trainer.train(at_step=at_step)


def write_report(run_dir: RunDir, cfg: RunConfig, summary: dict[str, Any]) -> None:
    lines = ["# u2a-dist run report", "",
             f"- model: `{cfg.model.name_or_path}`, world size {summary['world_size']}, "
             f"ZeRO stage {cfg.runtime.zero_stage}",
             f"- steps: {summary['step']} (stopped: {summary['stopped']}), training time "
             f"{summary['train_time_s']:.1f} s, evaluation time {summary['eval_time_s']:.1f} s",
             *_memory_lines(summary.get("memory", {})),
             "", *metric_table(summary["before"], summary["after"])]
    lines += _target_lines(cfg, summary)
    lines += _plot_lines(run_dir)
    lines += _sample_lines(summary.get("samples", {}))
    atomic_write(run_dir.path / "report.md", "\n".join(lines) + "\n")


def _plot_lines(run_dir: RunDir) -> list[str]:
    """The metrics figures (``plots/``, :func:`u2a_dist.plots.write_plots`), linked. A figure
    that fails costs the figures only: the report, the summary and the model stay."""
    head = ["", "## Metrics over training", ""]
    try:
        plots = write_plots(run_dir.read_metrics(), run_dir.path / "plots")
    except Exception as exc:  # noqa: BLE001 (any plotting error: matplotlib, fonts, disk)
        log.warning("plots of %s failed: %s", run_dir.path, exc, exc_info=True)
        return [*head, f"(the plots could not be drawn: {type(exc).__name__}: {exc})"]
    if not plots:
        return []
    lines = list(head)
    for plot in plots:
        lines += [f"![{plot.title}, against {plot.axis}](plots/{plot.file})", ""]
    return lines[:-1]


def _memory_lines(memory: dict[str, list]) -> list[str]:
    if not memory:
        return []
    line = "- peak resident memory per rank: " + ", ".join(
        f"{gb:.2f}" for gb in memory["peak_rss_gb"]) + " GB"
    if "allocator" in memory:  # summaries written before it have none
        line += " (malloc: " + ", ".join(memory["allocator"]) + ")"
    if "peak_cuda_gb" in memory:
        line += "; peak CUDA allocation: " + ", ".join(
            f"{gb:.2f}" for gb in memory["peak_cuda_gb"]) + " GB"
    return [line]


def _target_lines(cfg: RunConfig, summary: dict[str, Any]) -> list[str]:
    rows = target_report(cfg, summary["after"])
    if not rows:
        return []
    before = {r["metric"]: r["value"] for r in target_report(cfg, summary["before"])}
    lines = ["", "## Joint target", "", "| metric | bound | judged on | n | before | after "
             "| 95% interval | met after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        iv = "{:.3f}–{:.3f}".format(*r["interval"]) if r["interval"] else ""
        met = ("yes" if r["met"] else "no") + (" (interval crosses the bound)"
                                               if r["uncertain"] else "")
        lines.append(f"| {r['metric']} | {r['op']} {r['bound']:g} | {r['scope']} | "
                     f"{r['n'] or ''} | {_fmt(before.get(r['metric']))} | {_fmt(r['value'])} "
                     f"| {iv} | {met} |")
    table = source_table(summary["after"])
    if table:
        lines += ["", "## By evaluation source (after)", "", "```", *table, "```"]
    return lines


def _sample_lines(samples: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    before, after = samples.get("before", {}), samples.get("after", {})
    for kind in ("harmful", "harmless"):
        rows_b, rows_a = before.get(kind, []), after.get(kind, [])
        if not rows_b and not rows_a:
            continue
        lines += ["", f"## Sample generations: {kind} prompts (greedy, before → after)", ""]
        for i, row in enumerate(rows_a or rows_b):
            b = rows_b[i]["response"] if i < len(rows_b) else ""
            a = rows_a[i]["response"] if i < len(rows_a) else ""
            lines += [f"{i + 1}. **{_quote(row['prompt'])}**",
                      f"   - before: {_quote(b)}", f"   - after: {_quote(a)}"]
    return lines


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return (text[:limit] + " …") if len(text) > limit else text


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def run_rank_from_dir(run_dir: str, sink: Callable[[progress.Event], None] | None = None
                      ) -> int:
    """Entry point of one rank process: RANK/WORLD_SIZE/MASTER_* come from the environment.

    Rank 0's progress events go to ``sink`` (the `deepspeed` launcher's rank 0 draws them
    itself), else to stdout as ``[u2a:progress] {json}`` lines that the local launcher reads.
    """
    logging.basicConfig(level=os.environ.get("U2A_LOG_LEVEL", "WARNING"))
    rd = RunDir(run_dir)
    cfg = load_config(rd.path / "config.yaml")
    if int(os.environ.get("RANK", "0")) == 0:
        progress.set_sink(sink or _print_event)
    run_rank(cfg, rd)
    return 0


def _print_event(event: progress.Event) -> None:
    print(progress.LINE_PREFIX + json.dumps(event), flush=True)
