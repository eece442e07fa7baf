"""Tokens per second and peak memory of every pass the product runs, against a plain
``transformers`` forward(+backward) of the same tokens and against TRL DPO + SFT (issue 23).

    python benchmarks/throughput.py [--config configs/refusal_smollm2.yaml] [--world 1,2]
        [--devices cpu|gpu] [--steps 3] [--repeats 3] [--threads 2] [--builtin-data]
        [--profile] [--out DIR] [section.key=value ...]

One command, one run: one config (model, batch size, max_length, data), one thread count per
process, one machine. Each ``--world`` runs in its own rank processes (W = 1: ZeRO stage 0; W > 1:
ZeRO-3) that build the product's ``Trainer`` and the selector's ``TrainerProblem`` and time, each
after a warm-up, ``--steps`` recipe steps (``Trainer.train_step``) and ``--repeats`` of ∇J
(``outer_grad``), one finite-difference HVP and the two scoring forward passes
(``directional_scores`` over ``--score-n`` negatives). A hook on the model (and on the retain
KL's reference model) records every forward: its tokens (padded: what the model computes) and
whether it carried a graph. Then, in the W = 1 process, **the ceiling** replays exactly those
forwards (same ``input_ids`` and masks) on a plain ``transformers`` model loaded as transformers
loads it (its default attention): forward + backward of its own loss for those that carried a
graph, a no-grad forward for the others. ``vs_ceiling`` = the ceiling's seconds / the phase's
seconds: 1.0 is a phase that spends nothing beyond the model's own passes. TRL's ``DPOTrainer``
(sigmoid + SFT, as ``benchmarks/trl_baselines.py`` builds it, on the config's pairs and batch
size) runs ``--steps`` steps in one process and is replayed the same way. ``--profile`` writes a
torch.profiler table of one W = 1 recipe step (``throughput_profile.txt``).
Writes ``throughput.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import launch_ranks, stamp  # noqa: E402
from benchmarks.instruments import Phases  # noqa: E402

DEVICES = {"cpu": "cpu", "gpu": "cuda"}
TIMEOUT = 3600
U2A_PHASES = ("recipe_step", "grad_J", "hvp", "scores")
#: demo data for machines without ../shared (tests, a lent GPU): shapes, not content, matter
BUILTIN = {"data.forget": {"path": "builtin:harmful", "schema": "completions", "split": "train"},
           "data.mismatch": {"path": "builtin:refusal_templates", "schema": "completions"},
           "data.retain": {"path": "builtin:harmless", "schema": "prompts", "split": "train"},
           "data.pa": {"path": "builtin:all", "schema": "pairs", "split": "train"},
           "data.pa_eval": None}


def run_config(spec: dict[str, Any], out_dir: str, steps: int = 10**6):
    """The rank's RunConfig: the user's config and overrides, no evaluation, W ranks."""
    from u2a_dist.config import load_config

    world = spec["world"]
    fixed = {"eval.every": 0, "eval.target": None, "eval.judge": None, "eval.floors": {},
             "eval.harmful_prompts": None, "eval.harmless_prompts": None,
             "runtime.world_size": world, "runtime.zero_stage": 0 if world == 1 else 3,
             "runtime.device": DEVICES[spec["device"]], "runtime.checkpoint_every": 0,
             "unlearn.steps": steps, "selector.enabled": True, "out": out_dir,
             **(BUILTIN if spec["builtin_data"] else {})}
    return load_config(spec["config"], [*spec["overrides"],
                                        *(f"{k}={json.dumps(v)}" for k, v in fixed.items())])


class Forwards:
    """Every forward pass of the hooked models while ``recording``: (input_ids, real-token
    mask, carried a graph, position_ids), for the token counts and the ceiling's replay. A
    packed batch (position ids, no attention mask) gets its mask from ``packed_real_tokens``.
    Kept where they are: a copy to the host would synchronise a GPU inside the timed phase."""

    def __init__(self, models: list[Any], pad_id: int) -> None:
        import torch

        self.pad_id = pad_id
        self.calls: list[tuple[Any, Any, bool, Any]] = []
        self.on = False
        for m in models:
            if m is not None:
                m.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._grad = torch.is_grad_enabled

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        if self.on:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
            if mask is None and pos is not None:
                from u2a_dist.data.tokenize import packed_real_tokens
                mask = packed_real_tokens(ids, pos, self.pad_id)
            self.calls.append((ids.detach().clone(),
                               None if mask is None else mask.detach().clone(), self._grad(),
                               None if pos is None else pos.detach().clone()))

    @contextlib.contextmanager
    def recording(self):
        self.calls, self.on = [], True
        try:
            yield self.calls
        finally:
            self.on = False


def _real(ids: Any, mask: Any) -> int:
    return int(mask.sum()) if mask is not None else ids.numel()


def summarise(times: list[float], calls: list[tuple[Any, Any, bool, Any]],
              reps: int) -> dict[str, Any]:
    """A phase's record: times, and per step or pass its real tokens (the attention masks'),
    with and without a graph, and the padded tokens the model computed."""
    grad = sum(_real(ids, m) for ids, m, g, _ in calls if g) / reps
    nograd = sum(_real(ids, m) for ids, m, g, _ in calls if not g) / reps
    mean = sum(times) / len(times)
    return {"median_s": statistics.median(times), "mean_s": mean, "times_s": times,
            "forwards": len(calls) / reps, "tokens_grad": grad, "tokens_nograd": nograd,
            "padded_tokens": sum(ids.numel() for ids, *_ in calls) / reps,
            "tokens_per_s": (grad + nograd) / mean}


def u2a_rank(spec: dict[str, Any], out_path: str) -> None:
    """One rank: the four u2a phases, each with its forwards, memory and (W = 1) ceiling."""
    phases = Phases(gpu=spec["device"] == "gpu")
    import torch

    from u2a_dist.engine import init_distributed
    from u2a_dist.linalg import ShardedVector, finite_difference_hvp
    from u2a_dist.selector import directional_scores
    from u2a_dist.trainer import Trainer
    from u2a_dist.trainer_problem import TrainerProblem

    rank, world = init_distributed(timeout_s=TIMEOUT, device=DEVICES[spec["device"]])
    cfg = run_config(spec, str(Path(out_path).parent / "run"))
    trainer = Trainer(cfg, None)
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    fwd = Forwards([trainer.engine.module, trainer.reference], trainer.pad_id)
    v = ShardedVector.random_like(problem.zeros(), 7)
    v.scale_(1.0 / v.norm())
    lam, idx = problem.analytic_curvature(), list(range(min(spec["score_n"], len(trainer.forget))))
    fns = {"recipe_step": trainer.train_step, "grad_J": problem.outer_grad,
           "hvp": lambda: finite_difference_hvp(problem.parts(), problem.inner_grad, v,
                                                extra_diag=lam),
           "scores": lambda: directional_scores(problem, v, idx, cfg.selector.fd_eps)}
    rec: dict[str, Any] = {"rank": rank, "world": world, "threads": torch.get_num_threads(),
                           "phases": {}, "memory": {"setup": phases.memory_mark()}}
    replays = {}
    for name, fn in fns.items():
        fn()  # warm-up: first passes allocate what later ones reuse
        reps = spec["steps"] if name == "recipe_step" else spec["repeats"]
        with fwd.recording() as calls:
            _, t = phases.repeat(fn, reps)
        rec["phases"][name] = summarise(t["times_s"], calls, reps)
        rec["phases"][name]["cpu_per_wall"] = t["cpu_per_wall"]
        rec["memory"][name] = phases.memory_mark()
        replays[name] = (calls, reps)
    if spec["profile"]:  # a step is collective: every rank profiles, rank 0 writes
        profile(trainer.train_step,
                Path(spec["profile_out"].format(world=world)) if rank == 0 else None)
    if spec["ceiling"]:
        del problem, trainer
        rec["ceiling"] = ceiling(cfg, replays, phases, spec["repeats"])
    Path(out_path).write_text(json.dumps(rec, default=float) + "\n")


def profile(fn: Any, path: Path | None) -> None:
    """torch.profiler's operator table (self CPU time) of one call of ``fn``."""
    import torch.profiler

    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as prof:
        fn()
    if path is not None:
        path.write_text(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60) + "\n")


def ceiling(cfg: Any, replays: dict[str, tuple[list, int]], phases: Phases,
            repeats: int) -> dict[str, Any]:
    """Each phase's forwards replayed on a plain transformers model (module docstring),
    ``repeats`` times; per phase the median seconds per step or pass, with and without a graph."""
    import dataclasses

    import torch

    from u2a_dist.models import load_model, resolve_model_dir

    device = torch.device("cuda" if phases.gpu else "cpu")
    model = load_model(dataclasses.replace(cfg.model, attn_implementation="sdpa"),
                       resolve_model_dir(cfg.model)).to(device)

    def one(ids: Any, mask: Any, grad: bool, pos: Any) -> float:
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        # a packed batch as the product ran it: its position ids, no attention mask
        inputs = {"input_ids": ids, "attention_mask": mask} if pos is None else \
            {"input_ids": ids, "position_ids": pos.to(device), "use_cache": False}
        if phases.gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if grad:
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
            model(**inputs, labels=labels).loss.backward()
        else:
            with torch.no_grad():
                model(**inputs)
        if phases.gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    out = {}
    for name, (calls, reps) in replays.items():
        if calls:  # warm-up on the phase's first shape
            one(*calls[0])
        runs = []
        for _ in range(repeats):
            runs.append([sum(one(*c) for c in calls if c[2] == g) / reps for g in (True, False)])
            model.zero_grad(set_to_none=True)
        grad_s, nograd_s = (statistics.median(col) for col in zip(*runs))
        out[name] = {"seconds": grad_s + nograd_s, "grad_s": grad_s, "nograd_s": nograd_s}
    out["memory"] = phases.memory_mark()
    return out


def trl_rank(spec: dict[str, Any], out_path: str) -> None:
    """TRL DPOTrainer (sigmoid + SFT) steps on the config's pairs, its forwards replayed."""
    phases = Phases(gpu=spec["device"] == "gpu")
    import torch
    from transformers import TrainerCallback

    from benchmarks.trl_baselines import build_trainer
    from u2a_dist.models import load_model
    from u2a_dist.run_inputs import RunInputs

    cfg = run_config(spec, str(Path(out_path).parent / "trl"), steps=spec["steps"] + 1)
    inputs = RunInputs(cfg)
    model = load_model(cfg.model, inputs.resolved, seed=cfg.runtime.seed)
    fwd = Forwards([model], inputs.pad_id)
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if phases.gpu:
                torch.cuda.synchronize()
            fwd.on = state.global_step >= 1
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if phases.gpu:
                torch.cuda.synchronize()
            if state.global_step >= 2:
                times.append(time.perf_counter() - self.t0)
            fwd.on = False

    trainer = build_trainer("dpo_sft", cfg, inputs, model, Path(cfg.out), StepClock())
    setup = phases.memory_mark()
    trainer.train()
    rec = {"phases": {"trl_dpo_sft_step": summarise(times, fwd.calls, len(times))},
           "memory": {"setup": setup, "trl_dpo_sft_step": phases.memory_mark()},
           "threads": torch.get_num_threads()}
    rec["ceiling"] = ceiling(cfg, {"trl_dpo_sft_step": (fwd.calls, len(times))}, phases,
                            spec["repeats"])
    Path(out_path).write_text(json.dumps(rec, default=float) + "\n")


def rank_main(spec: dict[str, Any], out_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    (trl_rank if spec["role"] == "trl" else u2a_rank)(spec, out_path)


def merge(spec: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per launch: times from the slowest rank, tokens summed over the ranks,
    memory per rank, the ceiling's ratios (W = 1)."""
    r0, out = ranks[0], {"role": spec["role"], "world": spec["world"],
                         "threads": ranks[0]["threads"], "phases": {}}
    for name, ph in r0["phases"].items():
        mean = max(r["phases"][name]["mean_s"] for r in ranks)
        per = [r["phases"][name] for r in ranks]
        tokens = {k: sum(p[k] for p in per) for k in ("tokens_grad", "tokens_nograd",
                                                      "padded_tokens")}
        real = tokens["tokens_grad"] + tokens["tokens_nograd"]
        row = {**ph, **tokens, "mean_s": mean, "median_s": max(p["median_s"] for p in per),
               "tokens": real, "tokens_per_s": real / mean,
               "padding": 1 - real / tokens["padded_tokens"]}
        if "ceiling" in r0:
            c = r0["ceiling"][name]
            row.update(ceiling_s=c["seconds"], vs_ceiling=c["seconds"] / mean,
                       ceiling_grad_s=c["grad_s"], ceiling_nograd_s=c["nograd_s"])
        out["phases"][name] = row
    out["peak_rss_gb"] = [round(max(m["hwm_bytes"] for m in r["memory"].values()) / 1e9, 3)
                          for r in ranks]
    if spec["device"] == "gpu":
        out["peak_cuda_gb"] = [round(max(m.get("cuda_peak_bytes", 0) for m in
                                         r["memory"].values()) / 1e9, 3) for r in ranks]
    if "ceiling" in r0:  # the plain model's own rates: what the ceiling's passes sustain
        phases = r0["phases"]
        grad_tok = sum(p["tokens_grad"] for p in phases.values())
        nograd_tok = sum(p["tokens_nograd"] for p in phases.values())
        grad_s = sum(r0["ceiling"][n]["grad_s"] for n in phases)
        nograd_s = sum(r0["ceiling"][n]["nograd_s"] for n in phases)
        out["ceiling"] = {"fwd_bwd_tokens_per_s": grad_tok / grad_s if grad_s else None,
                          "fwd_tokens_per_s": nograd_tok / nograd_s if nograd_s else None}
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = [f"# Throughput ({record['date_utc']})", "", f"Command: `{record['command']}`", "",
             "Tokens: real (the attention masks'), per step or pass, all ranks; padding: the "
             "share of computed tokens that were padding; `vs ceiling`: a plain transformers "
             "forward(+backward) of the same batches, its seconds over the phase's (1.0: no "
             "overhead).", "",
             "| run | W | threads | phase | s (mean) | tokens grad / no-grad | padding | "
             "tokens/s | ceiling s | vs ceiling | peak RSS GB per rank |", "|---" * 11 + "|"]
    for run in record["runs"]:
        for name, p in run["phases"].items():
            ceil = (f"{p['ceiling_s']:.3f} | {p['vs_ceiling']:.2f}" if "vs_ceiling" in p
                    else "– | –")
            lines.append(f"| {run['role']} | {run['world']} | {run['threads']} | {name} | "
                         f"{p['mean_s']:.3f} | {p['tokens_grad']:.0f} / {p['tokens_nograd']:.0f}"
                         f" | {p['padding']:.0%} | {p['tokens_per_s']:.0f} | {ceil} | "
                         f"{' / '.join(map(str, run['peak_rss_gb']))} |")
        if "ceiling" in run:
            c = run["ceiling"]
            lines.append(f"| ceiling ({run['role']}) | 1 | {run['threads']} | plain fwd+bwd / "
                         f"fwd tokens/s | | | | {c['fwd_bwd_tokens_per_s'] or 0:.0f} / "
                         f"{c['fwd_tokens_per_s'] or 0:.0f} | | | |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--config", default=str(REPO / "configs" / "refusal_smollm2.yaml"))
    add("--world", default="1,2", help="world sizes (W = 1: stage 0 and the ceiling; else ZeRO-3)")
    add("--devices", choices=tuple(DEVICES), default="cpu")
    add("--steps", type=int, default=3, help="timed recipe (and TRL) steps after a warm-up")
    add("--repeats", type=int, default=3, help="timed ∇J, HVP and scoring passes")
    add("--score-n", type=int, default=32, help="negatives scored per scoring pass")
    add("--threads", type=int, default=0, help="torch threads per process; 0: cores / max W")
    add("--builtin-data", action="store_true", help="the demo's built-in data (no ../shared)")
    add("--no-trl", action="store_true", help="skip TRL DPO + SFT")
    add("--profile", action="store_true", help="torch.profiler table of one W = 1 step")
    add("--out", default=str(REPO / "benchmarks" / "results"))
    add("overrides", nargs="*", help="section.key=value")
    add("--rank-spec", help=argparse.SUPPRESS)
    add("--rank-out", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_intermixed_args(argv)
    if args.rank_spec:
        rank_main(json.loads(args.rank_spec), args.rank_out)
        from u2a_dist.runtime.worker import exit_rank

        exit_rank(0)
    worlds = [int(w) for w in args.world.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(worlds))
    base = {"config": args.config, "overrides": args.overrides, "device": args.devices,
            "steps": args.steps, "repeats": args.repeats, "score_n": args.score_n,
            "builtin_data": args.builtin_data, "profile": args.profile,
            "profile_out": str(Path(args.out) / "throughput_profile_w{world}.txt")}
    specs = [{**base, "role": "u2a", "world": w, "ceiling": w == 1} for w in worlds]
    if not args.no_trl:
        specs.append({**base, "role": "trl", "world": 1, "ceiling": True})
    out, runs, t0 = Path(args.out), [], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        print(f"[throughput] {spec['role']} W={spec['world']} ...", flush=True)
        ranks, error = launch_ranks("benchmarks.throughput", spec, spec["world"], TIMEOUT,
                                    {"OMP_NUM_THREADS": str(threads)}, cpu=args.devices == "cpu")
        if ranks is None:
            raise SystemExit(f"[throughput] {spec['role']} W={spec['world']} failed: {error}")
        runs.append(merge(spec, ranks))
        for name, p in runs[-1]["phases"].items():
            print(f"[throughput]   {name}: {p['mean_s']:.3f} s, {p['tokens_per_s']:.0f} tokens/s"
                  + (f", {p['vs_ceiling']:.2f} of the ceiling" if "vs_ceiling" in p else ""),
                  flush=True)
    record = {"benchmark": "throughput", **stamp(), "threads_per_process": threads,
              "settings": dict(base),
              "wall_seconds": round(time.perf_counter() - t0, 1), "runs": runs}
    (out / "throughput.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    (out / "throughput.md").write_text(markdown(record))
    print(f"-> {out / 'throughput.json'}, .md")
    return record


if __name__ == "__main__":
    main()
