"""DPO, KTO and RLHF (RLOO) baselines with TRL, measured the way u2a runs are (issue 6).

    python -m benchmarks.trl_baselines dpo|dpo_sft|kto|rlhf --config FILE.yaml --out DIR
        [section.key=value ...]

One process on the CPU with the config's model, seed and ``unlearn`` optimiser settings,
stopped as a u2a run stops, evaluated by the product's ``RunEvaluation`` (training clock
stopped) into a u2a run directory, so ``summarise`` reads both alike. ``dpo``: DPOTrainer
(sigmoid, β = ``selector.dpo_beta``) on J's pairs as ``RunInputs`` tokenises them, reference
log-probs precomputed at set-up (as a u2a run caches its own); ``dpo_sft`` adds TRL's SFT loss
on the chosen answers (1:1, as RPO). ``kto``: KTOTrainer (β = ``selector.dpo_beta``) on
unpaired rows: each negative of ``data.forget`` undesirable, its ``data.mismatch`` answer (a
refusal on the same prompt) desirable, as many of each in every batch. ``rlhf``: RLOOTrainer (2
samples per prompt, KL β = 0.05 against θ0) on as many harmful as harmless training prompts,
rewarded by ``harm_help_reward`` (see there); it optimises the judge that scores the evaluation
(on other prompts), which favours RLHF. ``runtime.theta0_cache`` serves θ0's evaluation."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedModel, TrainerCallback

from u2a_dist.config import ConfigError, RunConfig, load_config
from u2a_dist.data.examples import Prompt, load_completions, load_pairs, load_prompts
from u2a_dist.data.tokenize import IGNORE, encode_prompt
from u2a_dist.device import model_device
from u2a_dist.evaluate import broken_floors, check_eval_inputs, prompt_key, target_holds
from u2a_dist.judges import is_degenerate, is_refusal
from u2a_dist.models import load_model
from u2a_dist.run_eval import RunEvaluation
from u2a_dist.run_inputs import RunInputs
from u2a_dist.rundir import RunDir
from u2a_dist.theta0_cache import for_run

#: RLOO samples per prompt (TRL's default; RLOO needs at least 2 for its baseline).
RLOO_GENERATIONS = 2


class TimeToTargetCallback(TrainerCallback):
    """Evaluates at θ0 and every ``eval.every`` optimiser steps with the training clock stopped
    (it runs through everything else the Trainer does: data, generation, reward, logging), stops
    training at the joint target, a broken floor or ``unlearn.time_budget_s``, and logs one
    metrics.jsonl record per step: ``step``, ``time_s`` (training time so far),
    ``timing/step_s``, TRL's step logs and the evaluation's metrics."""

    def __init__(self, evaluation: RunEvaluation) -> None:
        self.evaluation = evaluation
        self.cfg, self.run_dir = evaluation.cfg, evaluation.run_dir
        self.before: dict[str, float] = {}
        self.stopped: str | None = None
        self.step = 0
        self.train_time = 0.0
        self.eval_time = 0.0
        self._t0 = 0.0

    def evaluate(self, model: PreTrainedModel, step: int) -> dict[str, float]:
        """The evaluation at ``step`` (step 0 is θ0; a second call at a step is free)."""
        t0 = time.perf_counter()
        metrics = self.evaluation.evaluate(lambda: model, step, at_theta0=step == 0)
        dt = time.perf_counter() - t0
        self.eval_time += dt
        self._t0 += dt  # the training clock stops during evaluation
        self.evaluation.track_best(step, metrics)
        return metrics

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = self.evaluate(model, 0)
        self.run_dir.append("metrics.jsonl", {"step": 0, "time_s": 0.0, **self.before})
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # The Trainer logs every step (logging_steps=1), and at the end a summary whose
        # train_runtime counts the evaluations (left out); TRL's logs go under train/.
        if not logs or "train_runtime" in logs or state.global_step == self.step:
            return
        now, self.step = time.perf_counter() - self._t0, state.global_step
        names = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}
        record: dict[str, Any] = {
            "step": self.step, "time_s": round(now, 4), "timing/step_s": now - self.train_time,
            **{names.get(k, f"train/{k}"): v for k, v in logs.items()
               if isinstance(v, (int, float))}}
        self.train_time = now
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
            record.update(self.evaluate(model, self.step))
            if floors := broken_floors(self.cfg, record):  # then a target met does not count
                self.stopped = "floor"
                record["floors_broken"] = ", ".join(floors)
            elif target_holds(self.cfg, record):
                self.stopped = "target"
        budget = self.cfg.unlearn.time_budget_s
        if self.stopped is None and budget and now >= budget:
            self.stopped = "time_budget"
        control.should_training_stop |= self.stopped is not None
        self.run_dir.append("metrics.jsonl", record)
        return control


def dpo_dataset(inputs: RunInputs) -> list[dict[str, list[int]]]:
    """The pairs of J (``data.pa``, as ``RunInputs`` encodes them) as DPOTrainer's tokenised rows.
    ``encode`` cuts a long prompt from the left to fit each answer; the pair shares the shorter
    cut, so both sequences fit ``data.max_length``."""
    if inputs.pa is None:
        raise ConfigError("dpo needs data.pa: the preference pairs to train on")
    rows = []
    for c, r in zip(inputs.pa.chosen, inputs.pa.rejected):
        pc, pr = _prompt_len(c), _prompt_len(r)
        n = min(pc, pr)
        rows.append({"prompt_ids": c["input_ids"][pc - n:pc],
                     "chosen_ids": c["input_ids"][pc:], "rejected_ids": r["input_ids"][pr:]})
    return rows


def kto_dataset(inputs: RunInputs, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """KTOTrainer's tokenised rows: each negative of ``data.forget`` undesirable and its
    ``data.mismatch`` answer (a refusal on its prompt) desirable, side by side (in a seeded
    order of the negatives) so that every batch of ``batch_size`` rows holds as many of each
    under TRL's sequential sampling; and TRL's KL completions, each batch's completions rotated
    by one (what ``KTOTrainer._prepare_dataset`` adds to the rows it tokenises itself)."""
    import random

    forget = inputs.forget
    if forget.mismatch is None:
        raise ConfigError("kto needs data.mismatch: the desirable answers (refusals) on the "
                          "flagged prompts")
    order = list(range(len(forget.items)))
    random.Random(seed).shuffle(order)
    rows = []
    for i in order:
        for item, desirable in ((forget.items[i], False), (forget.mismatch[i], True)):
            n = _prompt_len(item)
            rows.append({"prompt_ids": item["input_ids"][:n],
                         "completion_ids": item["input_ids"][n:], "label": desirable})
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        for row, kl in zip(batch, [batch[-1], *batch[:-1]]):
            row["KL_completion_ids"] = kl["completion_ids"]
    return rows


def _prompt_len(item: dict[str, list[int]]) -> int:
    return next((i for i, lab in enumerate(item["labels"]) if lab != IGNORE),
                len(item["labels"]))


def rl_prompts(cfg: RunConfig) -> list[tuple[Prompt, str]]:
    """(prompt, kind) for RLHF: the distinct harmful prompts of ``data.forget`` and harmless
    ones of ``data.retain`` (else of the harmless / over-refusal pairs of ``data.pa``), as many
    of each: training data only, so the evaluation (which drops every training prompt) stays
    held out."""
    d = cfg.data
    harmless = [x for s in (d.retain if isinstance(d.retain, list) else [d.retain]) if s
                for x in (load_prompts(s) if s.schema == "prompts" else load_completions(s))]
    if not harmless and d.pa is not None:
        harmless = [p for p in load_pairs(d.pa)
                    if p.attrs.get("kind") in ("harmless", "over_refusal")]
    unique: dict[str, list[Prompt]] = {"harmful": [], "harmless": []}
    seen: set[str] = set()
    for kind, items in (("harmful", load_completions(d.forget)), ("harmless", harmless)):
        for x in items:
            if prompt_key(x.prompt) not in seen:  # a prompt in both keeps its harmful label
                seen.add(prompt_key(x.prompt))
                unique[kind].append(Prompt(x.id, x.prompt, x.history))
    if not all(unique.values()):
        raise ConfigError("rlhf needs harmful training prompts (data.forget) and harmless ones "
                          "(data.retain, a prompts spec, or over-refusal pairs in data.pa)")
    # Half harmful, half harmless (the smaller set repeated), as a u2a step draws as many
    # forget as retain examples: the joint target needs both behaviours.
    n = max(len(v) for v in unique.values())
    return [(ps[i % len(ps)], kind) for kind, ps in unique.items() for i in range(n)]


def harm_help_reward(judge=None) -> Callable[..., list[float]]:
    """RLOO's reward: −P(harm) by ``judge`` on a harmful prompt (no judge: 1 unless a refusal;
    −1 for degenerate text), on a harmless one 1 for an answer neither a refusal nor degenerate,
    else 0: degenerate text, which a judge may find harmless (GA's failure mode), never pays."""

    def reward(prompts: Sequence[str], completions: Sequence[str], kind: Sequence[str],
               **_: Any) -> list[float]:
        refused = [is_refusal(y) for y in completions]
        harm = [float(not r) for r in refused]  # P(harm) without a judge
        harmful = [i for i, k in enumerate(kind) if k == "harmful"]
        if judge is not None and harmful:
            probs = judge.predict_proba([(prompts[i], completions[i]) for i in harmful])
            for i, p in zip(harmful, probs):
                harm[i] = float(p)
        out = []
        for x, y, k, r, h in zip(prompts, completions, kind, refused, harm):
            junk = not r and is_degenerate(y, echo_of=x)
            out.append((-1.0 if junk else -h) if k == "harmful" else float(not (r or junk)))
        return out

    reward.__name__ = "harm_help"  # TRL logs rewards/<name>/mean
    return reward


def _trainer_args(cfg: RunConfig, out: Path, batch_size: int) -> dict[str, Any]:
    """TrainingArguments of every method: the unlearn section's optimiser, fp32 like the u2a
    runs (TRL's configs default to bf16 and gradient checkpointing), on the device a u2a run
    with the same ``runtime.device`` would use (auto: a GPU when there is one)."""
    import torch

    u = cfg.unlearn
    cpu = cfg.runtime.device == "cpu" or not torch.cuda.is_available()
    return dict(
        output_dir=str(out), max_steps=u.steps, per_device_train_batch_size=batch_size,
        learning_rate=u.lr, optim="adamw_torch" if u.optimizer == "adamw" else "sgd",
        lr_scheduler_type="constant_with_warmup" if u.warmup_steps else "constant",
        warmup_steps=u.warmup_steps, weight_decay=u.weight_decay, max_grad_norm=u.grad_clip,
        seed=cfg.runtime.seed, data_seed=cfg.runtime.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, bf16=False, gradient_checkpointing=False,
        use_cpu=cpu)


def _hooked(cls: type, hook: str, body: Callable) -> type:
    """``cls`` with u2a_dist's tokenisation as ``hook``; fails where TRL no longer has it."""
    if not callable(getattr(cls, hook, None)):
        raise RuntimeError(f"{cls.__name__}.{hook} is gone: written for trl 1.16")
    return type(cls.__name__, (cls,), {hook: body})


def build_trainer(method: str, cfg: RunConfig, inputs: RunInputs, model: PreTrainedModel,
                  out: Path, callback: TrainerCallback, judge=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer

    tokenizer = inputs.tokenizer
    if method in ("dpo", "dpo_sft"):
        # the reference model passed explicitly (docs/design.md §6); TRL puts it in eval mode
        reference = load_model(cfg.model, inputs.resolved, seed=cfg.runtime.seed)
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]} \
            if method == "dpo_sft" else {}
        args = DPOConfig(**_trainer_args(cfg, out, cfg.unlearn.batch_size),
                         beta=cfg.selector.dpo_beta, max_length=cfg.data.max_length,
                         precompute_ref_log_probs=True, **losses)
        cls = _hooked(DPOTrainer, "_prepare_dataset", lambda self, dataset, *_: dataset)
        return cls(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                   train_dataset=Dataset.from_list(dpo_dataset(inputs)), callbacks=[callback])
    if method == "kto":  # a u2a step's B negatives and their B refusals: 2B rows a batch
        rows = 2 * cfg.unlearn.batch_size
        reference = load_model(cfg.model, inputs.resolved, seed=cfg.runtime.seed)
        args = KTOConfig(**_trainer_args(cfg, out, rows), beta=cfg.selector.dpo_beta,
                         max_length=cfg.data.max_length, precompute_ref_log_probs=True,
                         train_sampling_strategy="sequential")
        cls = _hooked(KTOTrainer, "_prepare_dataset", lambda self, dataset, *_: dataset)
        return cls(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                   train_dataset=Dataset.from_list(kto_dataset(inputs, rows, cfg.runtime.seed)),
                   callbacks=[callback])
    prompts = rl_prompts(cfg)
    # Prompts are tokenised as the evaluation tokenises them (chat template, left cut).
    ids = {p.prompt: encode_prompt(tokenizer, p.prompt, p.history, cfg.data.max_length)
           for p, _ in prompts}
    cls = _hooked(RLOOTrainer, "_tokenize_prompts",
                  lambda self, texts: ([list(ids[t]) for t in texts], None, {}))
    # TRL builds RLOO's KL reference from the policy's config path: a model built from a
    # config (tiny-gpt2) has none, so θ0 is saved once into the run directory.
    reference = Path(inputs.resolved)
    if not reference.is_dir():
        reference = out / "reference_model"
        model.save_pretrained(reference)
    model.config._name_or_path = str(reference)
    args = RLOOConfig(**_trainer_args(cfg, out, cfg.unlearn.batch_size * RLOO_GENERATIONS),
                      num_generations=RLOO_GENERATIONS,
                      max_completion_length=cfg.eval.max_new_tokens)
    data = Dataset.from_list([{"prompt": p.prompt, "kind": kind} for p, kind in prompts])
    return cls(model=model, reward_funcs=harm_help_reward(judge), args=args,
               train_dataset=data, processing_class=tokenizer, callbacks=[callback])


class TrlRun(NamedTuple):
    summary: dict[str, Any]
    model: PreTrainedModel


def run_trl(method: str, cfg: RunConfig) -> TrlRun:
    """Train ``method`` (dpo | dpo_sft | kto | rlhf) into the run directory ``cfg.out`` (a u2a run
    directory there is replaced) until the target, a floor, ``unlearn.steps`` or
    ``unlearn.time_budget_s``."""
    t_setup = time.perf_counter()
    judge = check_eval_inputs(cfg)  # every input read once; a missing judge names eval.judge
    run_dir = RunDir(out := Path(cfg.out))
    run_dir.prepare(cfg, overwrite=True)  # as --overwrite: a run dir's own entries, never a user's
    inputs = RunInputs(cfg)
    model = load_model(cfg.model, inputs.resolved, seed=cfg.runtime.seed)
    cache = for_run(cfg, inputs.resolved, 1, model_device(model))  # as `u2a eval` keeps θ0's
    evaluation = RunEvaluation(cfg, inputs.tokenizer, inputs.pad_id, 0, run_dir, inputs.pa_eval,
                               inputs.reference_logps(model, False, cache), theta0_cache=cache)
    callback = TimeToTargetCallback(evaluation)
    trainer = build_trainer(method, cfg, inputs, model, out, callback, judge)
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    step = trainer.state.global_step
    after = callback.evaluate(trainer.model, step)  # the last step's, or the final model's
    unit = {"rlhf": f"prompts (x{RLOO_GENERATIONS} samples)",
            "kto": "negatives (+ as many refusals)"}.get(method, "pairs")
    summary = {
        "method": method, "step": step, "stopped": callback.stopped or "budget",
        "train_time_s": callback.train_time, "eval_time_s": callback.eval_time,
        "setup_s": setup_s, "best": evaluation.best, "theta0_cached": cache.hits,
        "examples_used": step * cfg.unlearn.batch_size, "example_unit": unit,
        "before": callback.before, "after": after}
    run_dir.write_json("summary.json", summary)
    return TrlRun(summary, trainer.model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=("dpo", "dpo_sft", "kto", "rlhf"))
    ap.add_argument("--config", default="configs/refusal_smollm2.yaml")
    ap.add_argument("--out", required=True, help="run directory (replaced)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_intermixed_args(argv)  # overrides may follow --config/--out
    run_trl(args.method, load_config(args.config, [*args.overrides, f"out={args.out}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
