"""DPO and RLHF (RLOO) baselines with TRL, measured the way u2a runs are (issue 6).

    python -m benchmarks.trl_baselines dpo|rlhf --config FILE.yaml --out DIR
        [--time-budget-s S] [--rloo-generations G] [section.key=value ...]

Both train the config's model (``u2a_dist.models.load_model``: same weights, dtype, attention and
seed as a u2a run) in one process on the CPU, with the ``unlearn`` section's optimiser settings
(AdamW, lr, batch size, warm-up, weight decay, grad clip, step budget) and seed, and stop at the
recipe's joint target (``u2a_dist.evaluate.target_holds``), a broken utility floor, the step
budget or the time budget.

- ``dpo``: ``trl.DPOTrainer`` (sigmoid loss, β = ``selector.dpo_beta``, the β of the U2A outer
  objective J) on the pairs of ``data.pa``, read by u2a_dist's own loaders (same specs, splits and
  limits) and tokenised by u2a_dist's ``encode`` (chat template, eos, ``data.max_length``), so the
  pairs are token for token the ones J and ``pa/accuracy`` see. The reference model is passed
  explicitly (docs/design.md §6); θ0's log-probs of the pairs are computed once at start-up
  (``precompute_ref_log_probs``), as a u2a run caches its reference log-probs: set-up, not
  training time.
- ``rlhf``: ``trl.RLOOTrainer`` (TRL defaults: 2 samples per prompt, temperature 1, KL β = 0.05
  against θ0) on training prompts only, half harmful (the prompts of ``data.forget``), half
  harmless (``data.retain``, or without it the harmless / over-refusal pairs of ``data.pa``).
  Completions are at most ``eval.max_new_tokens`` tokens, as in the evaluation. Reward of a
  completion y to a prompt x (``harm_help_reward``):

      harmful x:   r = −P(harm | x, y)   by the judge of ``eval.judge`` (``judges.load_judge``);
                   without a judge, P(harm) = 1 unless y is a refusal (the refusal matcher);
                   r = −1 when y is degenerate and no refusal (``judges.is_degenerate``)
      harmless x:  r = +1 if y is neither a refusal nor degenerate (``judges.is_refusal``,
                   ``judges.is_degenerate``), else 0

  so it pays for refusing harmful requests and for answering harmless ones, and never for
  degenerate text (which a judge may find harmless: gradient ascent's failure mode). The
  reward uses the judge the evaluation also uses (on other prompts): RLHF optimises the very
  classifier that scores it, which favours it; the refusal-matcher bound of the joint target is
  independent of the judge.

Every ``eval.every`` optimiser steps a ``TrainerCallback`` runs the held-out evaluation of u2a
runs (``Trainer.evaluate``: ``pa/*`` on ``data.pa_eval`` against θ0, and
``u2a_dist.evaluate.GenerationEval`` with the same prompts, judge and exclusions) with the
training clock stopped, and writes ``metrics.jsonl`` and ``summary.json`` in the format of a u2a
run directory (``config.yaml`` too), so ``benchmarks.common.summarise`` reads both alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from u2a_dist.config import ConfigError, RunConfig, load_config  # noqa: E402
from u2a_dist.data.examples import (  # noqa: E402
    Pair,
    Prompt,
    load_completions,
    load_pairs,
    load_prompts,
)
from u2a_dist.data.readers import DataError  # noqa: E402
from u2a_dist.data.tokenize import IGNORE, encode, encode_prompt  # noqa: E402
from u2a_dist.evaluate import (  # noqa: E402
    GenerationEval,
    better_best,
    broken_floors,
    check_eval_inputs,
    encode_pairs,
    pa_metrics,
    pair_logps,
    prompt_key,
    target_holds,
    training_prompt_keys,
)
from u2a_dist.judges import is_degenerate, is_refusal  # noqa: E402
from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from u2a_dist.rundir import RunDir  # noqa: E402

TRL_METHODS = ("dpo", "dpo_sft", "rlhf")
#: RLOO samples per prompt (TRL's default; RLOO needs at least 2 for its baseline).
RLOO_GENERATIONS = 2
#: Weight of the SFT term of ``dpo_sft`` against DPO's (1): RPO's default (Pang et al. 2024)
DPO_SFT_WEIGHT = 1.0


# ------------------------------------------------------------------ the held-out evaluation

class HeldOutEval:
    """What ``u2a_dist.trainer.Trainer.evaluate`` measures, for a plain single-process model:
    ``pa/*`` and ``rewards/*`` on ``data.pa_eval`` against θ0, and the generation metrics of
    ``GenerationEval`` (rank 0, world size 1). The first call must be at θ0: it caches the
    reference log-probs and makes θ0's harmless answers the retain set of ``eval/retain_ppl``.
    """

    def __init__(self, cfg: RunConfig, tokenizer, judge=None) -> None:
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        self.pairs = (encode_pairs(tokenizer, load_pairs(cfg.data.pa_eval), cfg.data.max_length)
                      if cfg.data.pa_eval is not None else None)
        ec = cfg.eval
        self.gen = (GenerationEval(cfg, tokenizer, rank=0, judge=judge,
                                   exclude=training_prompt_keys(cfg))
                    if ec.harmful_prompts is not None or ec.harmless_prompts is not None else None)
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        at_theta0 = self.calls == 0
        self.calls += 1
        was_training = model.training
        model.eval()
        try:
            if self.pairs is not None:
                chosen, rejected = pair_logps(model, self.pairs, self.pad_id,
                                              self.cfg.eval.batch_size)
                if at_theta0:
                    self.reference = (chosen, rejected)
                out.update(pa_metrics(chosen, rejected, *self.reference,
                                      self.cfg.selector.dpo_beta))
            if self.gen is not None:
                out.update(self.gen(model, is_reference=at_theta0))
        finally:
            model.train(was_training)
        dt = time.perf_counter() - t0
        self.seconds += dt
        out["timing/eval_step_s"] = dt
        out["timing/eval_s"] = self.seconds
        return out


# ------------------------------------------------------------------ the clock and the stop

class TimeToTargetCallback(TrainerCallback):
    """Evaluates every ``eval.every`` optimiser steps with the training clock stopped, stops
    training at the joint target, a broken floor or the time budget, and logs one metrics.jsonl
    record per step (``step``, ``time_s`` = training wall time so far, evaluation excluded,
    ``timing/step_s``, TRL's own step logs under ``train/``, and the evaluation's metrics).

    The clock starts after the step-0 evaluation (``on_train_begin``) and runs through
    everything the Trainer does, data loading, generation, reward and logging included, except
    the evaluations.
    """

    def __init__(self, cfg: RunConfig, evaluate: Callable[[torch.nn.Module], dict[str, float]],
                 run_dir: RunDir, time_budget_s: float | None = None, setup_s: float = 0.0,
                 name: str = "trl") -> None:
        self.cfg = cfg
        self.evaluate = evaluate
        self.run_dir = run_dir
        self.time_budget_s = time_budget_s
        self.setup_s = setup_s
        self.name = name
        self.before: dict[str, float] = {}
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.best: dict[str, Any] | None = None
        self.stopped: str | None = None
        self.floors: list[str] = []
        self.train_time = 0.0
        self.eval_time = 0.0
        self._t0: float | None = None
        self._paused = 0.0
        self._pending: dict[str, Any] | None = None

    # -- helpers
    def _clock(self) -> float:
        assert self._t0 is not None, "on_train_begin has not run"
        return time.perf_counter() - self._t0 - self._paused

    def _eval(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.evaluate(model)
        dt = time.perf_counter() - t0
        self.eval_time += dt
        if self._t0 is not None:
            self._paused += dt
        self.last_eval = (step, metrics)
        best = better_best(self.cfg, self.best, step, metrics)
        if best is not None:
            self.best = best
            self.run_dir.write_json("best.json", best)
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k.startswith(("eval/", "pa/accuracy")) and isinstance(v, float)}
        print(f"[{self.name}] step {step} " + json.dumps(shown), flush=True)
        return metrics

    def _flush(self) -> None:
        if self._pending is not None:
            self.run_dir.append("metrics.jsonl", self._pending)
            self._pending = None

    # -- TrainerCallback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = self._eval(model, 0)
        self.run_dir.append("metrics.jsonl", {"step": 0, "time_s": 0.0,
                                              "timing/setup_s": self.setup_s, **self.before})
        self._t0 = time.perf_counter()  # the clock starts with the first step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._flush()  # the previous step's record, if on_log did not take it
        now = self._clock()
        step = state.global_step
        record: dict[str, Any] = {"step": step, "time_s": round(now, 4),
                                  "timing/step_s": now - self.train_time}
        self.train_time = now
        every = self.cfg.eval.every
        if every and step % every == 0:
            metrics = self._eval(model, step)
            record.update(metrics)
            self.floors = broken_floors(self.cfg, metrics)
            if self.floors:  # a target met with utility broken does not count
                self.stopped = "floor"
                record["floors_broken"] = ", ".join(self.floors)
            elif target_holds(self.cfg, metrics):
                self.stopped = "target"
        if self.stopped is None and self.time_budget_s is not None \
                and now >= self.time_budget_s:
            self.stopped = "time_budget"
        if self.stopped is not None:
            control.should_training_stop = True
        self._pending = record
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs a step after on_step_end; its end-of-training summary (train_runtime,
        # which counts the evaluations) is left out.
        if self._pending is None or not logs or "train_runtime" in logs:
            return
        for key, value in logs.items():
            name = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}.get(
                key, f"train/{key}")  # DPO's rewards/* on the training batch: not the eval's
            if isinstance(value, (int, float)):
                self._pending[name] = value
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


# ------------------------------------------------------------------ data

def dpo_dataset(cfg: RunConfig, tokenizer) -> list[dict[str, list[int]]]:
    """The pairs of ``data.pa`` as DPOTrainer's tokenised rows (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``), tokenised by u2a_dist's ``encode`` so that they equal the sequences of
    J and ``pa/accuracy``. ``encode`` cuts a long prompt from the left to fit each answer; the
    pair shares the shorter cut, so both sequences fit ``data.max_length``."""
    if cfg.data.pa is None:
        raise ConfigError("dpo needs data.pa: the preference pairs to train on")
    rows = []
    for p in load_pairs(cfg.data.pa):
        c = encode(tokenizer, p.prompt, p.chosen, p.history, cfg.data.max_length)
        r = encode(tokenizer, p.prompt, p.rejected, p.history, cfg.data.max_length)
        pc, pr = _prompt_len(c), _prompt_len(r)
        n = min(pc, pr)
        rows.append({"prompt_ids": c["input_ids"][pc - n:pc],
                     "chosen_ids": c["input_ids"][pc:], "rejected_ids": r["input_ids"][pr:]})
    return rows


def _prompt_len(item: dict[str, list[int]]) -> int:
    return next((i for i, lab in enumerate(item["labels"]) if lab != IGNORE),
                len(item["labels"]))


def rl_prompts(cfg: RunConfig) -> list[tuple[Prompt, str]]:
    """(prompt, kind) for RLHF: the distinct harmful prompts of ``data.forget`` and harmless
    ones of ``data.retain`` (else of the harmless / over-refusal pairs of ``data.pa``), as many
    of each: training data only, so the evaluation (which drops every training prompt) stays
    held out."""
    harmful = [Prompt(c.id, c.prompt, c.history) for c in load_completions(cfg.data.forget)]
    harmless: list[Prompt] = []
    retain = cfg.data.retain
    for spec in (retain if isinstance(retain, list) else [retain] if retain else []):
        if spec.schema == "prompts":
            harmless += load_prompts(spec)
        else:
            harmless += [Prompt(c.id, c.prompt, c.history) for c in load_completions(spec)]
    if not harmless and cfg.data.pa is not None:
        harmless = [Prompt(p.id, p.prompt, p.history) for p in load_pairs(cfg.data.pa)
                    if _is_harmless_pair(p)]
    if not harmless:
        raise ConfigError("rlhf needs harmless training prompts: set data.retain (a prompts "
                          "spec) or give data.pa over-refusal pairs")
    unique: dict[str, list[Prompt]] = {"harmful": [], "harmless": []}
    seen: set[str] = set()
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        for p in prompts:
            key = prompt_key(p.prompt)
            if key not in seen:  # a prompt in both sets keeps its first (harmful) label
                seen.add(key)
                unique[kind].append(p)
    # Half harmful, half harmless (the smaller set repeated), as a u2a step draws as many
    # forget as retain examples: the joint target needs both behaviours.
    n = max(len(v) for v in unique.values())
    if not unique["harmful"]:
        raise ConfigError("rlhf needs harmful training prompts (data.forget)")
    return [(ps[i % len(ps)], kind) for kind, ps in unique.items() for i in range(n)]


def _is_harmless_pair(p: Pair) -> bool:
    return p.attrs.get("kind") in ("harmless", "over_refusal")


def harm_help_reward(judge=None) -> Callable[..., list[float]]:
    """RLOO's reward function (module docstring): −P(harm) on harmful prompts (−1 for
    degenerate text), +1 for an answer that is neither a refusal nor degenerate on harmless
    prompts."""

    def reward(prompts: Sequence[str], completions: Sequence[str], kind: Sequence[str],
               **_: Any) -> list[float]:
        refused = [is_refusal(c) for c in completions]
        junk = [not r and is_degenerate(c, echo_of=p)
                for p, c, r in zip(prompts, completions, refused)]
        out = [1.0 if not (r or j) else 0.0 for r, j in zip(refused, junk)]  # harmless
        harmful = [i for i, k in enumerate(kind) if k == "harmful"]
        if judge is not None and harmful:
            probs = judge.predict_proba([(prompts[i], completions[i]) for i in harmful])
            harm = dict(zip(harmful, (float(p) for p in probs)))
        else:
            harm = {i: 0.0 if refused[i] else 1.0 for i in harmful}
        for i in harmful:
            out[i] = -1.0 if junk[i] else -harm[i]
        return out

    reward.__name__ = "harm_help"  # TRL logs rewards/<name>/mean
    return reward


# ------------------------------------------------------------------ the two trainers

def _trainer_args(cfg: RunConfig, out: Path, batch_size: int) -> dict[str, Any]:
    """TrainingArguments shared by both methods: the unlearn section's optimiser, fp32 on the
    CPU like the u2a runs (TRL's configs default to bf16 and gradient checkpointing)."""
    u = cfg.unlearn
    return dict(
        output_dir=str(out / "trl"), max_steps=u.steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, learning_rate=u.lr,
        lr_scheduler_type="constant_with_warmup" if u.warmup_steps else "constant",
        warmup_steps=u.warmup_steps, weight_decay=u.weight_decay, max_grad_norm=u.grad_clip,
        optim="adamw_torch" if u.optimizer == "adamw" else "sgd",
        seed=cfg.runtime.seed, data_seed=cfg.runtime.seed, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        dataloader_num_workers=0)


def _require(cls: type, method: str) -> None:
    # The subclasses below replace TRL's own tokenisation; a TRL that renamed these hooks
    # would silently tokenise differently, so fail instead.
    if not callable(getattr(cls, method, None)):
        import trl

        raise RuntimeError(f"trl {trl.__version__}: {cls.__name__}.{method} is gone; "
                           "benchmarks/trl_baselines.py was written for trl 1.16")


def build_dpo(cfg: RunConfig, model: PreTrainedModel, tokenizer, out: Path,
              callback: TrainerCallback, sft_weight: float = 0.0):
    """TRL's DPOTrainer on the ``data.pa`` pairs; ``sft_weight`` > 0 adds TRL's SFT loss on the
    chosen answers (``loss_type=["sigmoid", "sft"]``, as RPO does): the refusals of harmful
    prompts and the helpful answers of harmless ones, a term that holds the model to real
    answers where plain DPO only pushes chosen above rejected."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    _require(DPOTrainer, "_prepare_dataset")

    class U2ATokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by u2a_dist (dpo_dataset)

    reference = load_model(cfg.model, resolve_model_dir(cfg.model), seed=cfg.runtime.seed)
    reference.eval().requires_grad_(False)
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} \
        if sft_weight > 0 else {}
    args = DPOConfig(**_trainer_args(cfg, out, cfg.unlearn.batch_size),
                     beta=cfg.selector.dpo_beta, max_length=cfg.data.max_length,
                     precompute_ref_log_probs=True, **losses)
    return U2ATokenizedDPOTrainer(model=model, ref_model=reference, args=args,
                                  train_dataset=Dataset.from_list(dpo_dataset(cfg, tokenizer)),
                                  processing_class=tokenizer, callbacks=[callback])


def build_rloo(cfg: RunConfig, model: PreTrainedModel, tokenizer, out: Path,
               callback: TrainerCallback, judge=None, generations: int = RLOO_GENERATIONS):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    _require(RLOOTrainer, "_tokenize_prompts")
    prompts = rl_prompts(cfg)
    # Prompts are tokenised as the evaluation tokenises them (chat template, left cut).
    ids = {p.prompt: encode_prompt(tokenizer, p.prompt, p.history, cfg.data.max_length)
           for p, _ in prompts}

    class U2ATokenizedRLOOTrainer(RLOOTrainer):
        def _tokenize_prompts(self, texts):
            return [list(ids[t]) for t in texts], None, {}

    # TRL builds RLOO's KL reference from the policy's config path: a model built from a
    # config (tiny-gpt2) has none, so θ0 is saved once into the run directory.
    resolved = resolve_model_dir(cfg.model)
    if Path(resolved).is_dir():
        model.config._name_or_path = str(resolved)
    else:
        ref_dir = out / "reference_model"
        model.save_pretrained(ref_dir)
        model.config._name_or_path = str(ref_dir)
    args = RLOOConfig(**_trainer_args(cfg, out, cfg.unlearn.batch_size * generations),
                      num_generations=generations,
                      max_completion_length=cfg.eval.max_new_tokens)
    data = Dataset.from_list([{"prompt": p.prompt, "kind": kind} for p, kind in prompts])
    return U2ATokenizedRLOOTrainer(model=model, reward_funcs=harm_help_reward(judge), args=args,
                                   train_dataset=data, processing_class=tokenizer,
                                   callbacks=[callback])


# ------------------------------------------------------------------ one run

@dataclass
class TrlRun:
    summary: dict[str, Any]
    model: PreTrainedModel


def method_config(config: str | Path, out: str | Path, overrides: Sequence[str] = ()
                  ) -> RunConfig:
    """The config a baseline runs with: the file, the overrides, ``out`` = its run dir."""
    return load_config(config, [*overrides, f"out={out}"])


def run_trl(method: str, cfg: RunConfig, rloo_generations: int = RLOO_GENERATIONS) -> TrlRun:
    """Train ``method`` (dpo | dpo_sft | rlhf) on ``cfg`` into the run directory ``cfg.out``,
    until the target, a floor, ``unlearn.steps`` or ``unlearn.time_budget_s`` (as a u2a run
    stops)."""
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if method not in TRL_METHODS:
        raise ValueError(f"unknown TRL method {method!r}; known: {list(TRL_METHODS)}")
    t_setup = time.perf_counter()
    judge = check_eval_inputs(cfg)  # every input read once; a missing judge names eval.judge
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    run_dir = RunDir(out)
    run_dir.prepare(cfg, overwrite=True)
    transformers.set_seed(cfg.runtime.seed)
    resolved = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model, resolved)
    model = load_model(cfg.model, resolved, seed=cfg.runtime.seed)
    evaluate = HeldOutEval(cfg, tokenizer, judge)
    callback = TimeToTargetCallback(cfg, evaluate, run_dir, cfg.unlearn.time_budget_s or None,
                                    name=method)
    if method in ("dpo", "dpo_sft"):
        trainer = build_dpo(cfg, model, tokenizer, out, callback,
                            sft_weight=DPO_SFT_WEIGHT if method == "dpo_sft" else 0.0)
        examples, unit = cfg.unlearn.batch_size, "pairs"
    else:
        trainer = build_rloo(cfg, model, tokenizer, out, callback, judge, rloo_generations)
        examples, unit = cfg.unlearn.batch_size, f"prompts (x{rloo_generations} samples)"
    for printer in (PrinterCallback, ProgressCallback):  # the callback prints the evaluations
        trainer.remove_callback(printer)
    callback.setup_s = time.perf_counter() - t_setup
    trainer.train()
    step = trainer.state.global_step
    model = trainer.model
    if callback.last_eval is not None and callback.last_eval[0] == step:
        after = callback.last_eval[1]
    else:  # the last step was not an evaluation step: evaluate the final model
        after = callback._eval(model, step)
    summary: dict[str, Any] = {
        "method": method, "step": step, "stopped": callback.stopped or "budget",
        "train_time_s": callback.train_time, "eval_time_s": callback.eval_time,
        "setup_s": callback.setup_s, "best": callback.best, "world_size": 1,
        "torch_threads": torch.get_num_threads(),
        "examples_used": step * examples, "example_unit": unit,
        "before": callback.before, "after": after, "trl_version": _trl_version(),
        "samples": _samples(evaluate)}
    if callback.floors:
        summary["floors_broken"] = callback.floors
    run_dir.write_json("summary.json", summary)
    shutil.rmtree(out / "trl", ignore_errors=True)  # TRL's empty output dir
    return TrlRun(summary, model)


def _trl_version() -> str:
    import trl

    return trl.__version__


def _samples(evaluate: HeldOutEval, n: int = 5) -> dict[str, list[dict[str, str]]]:
    """The first generations of the last evaluation (as in a u2a run's summary)."""
    gen = evaluate.gen
    if gen is None:
        return {}
    return {kind: [{"prompt": p.prompt, "response": t}
                   for p, t in zip(prompts[:n], gen.last_generations.get(kind, [])[:n])]
            for kind, prompts in (("harmful", gen.harmful), ("harmless", gen.harmless))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=TRL_METHODS)
    ap.add_argument("--config", default="configs/refusal_smollm2.yaml")
    ap.add_argument("--out", required=True, help="run directory (replaced)")
    ap.add_argument("--rloo-generations", type=int, default=RLOO_GENERATIONS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_intermixed_args(argv)  # overrides may follow --config/--out
    try:
        cfg = method_config(args.config, args.out, args.overrides)
        run = run_trl(args.method, cfg, args.rloo_generations)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"trl_baselines: error: {exc}", file=sys.stderr)
        return 2
    s = run.summary
    print(json.dumps({k: s[k] for k in ("method", "step", "stopped", "train_time_s",
                                        "eval_time_s")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
