"""Preference-alignment and utility metrics (docs/design.md §5).

``pa/accuracy`` is the share of held-out pairs whose implicit reward margin
``[logp(y+) − logp_0(y+)] − [logp(y−) − logp_0(y−)]`` is positive and ``pa/margin`` its mean;
``rewards/*`` are TRL's β-scaled versions. No generation is needed, so these are cheap enough to
log every few steps.

Generation-based metrics (``GenerationEval``) need ``eval.harmful_prompts`` and/or
``eval.harmless_prompts``: greedy answers (``u2a_dist.generation``, sharded over ranks) judged by
the refusal-phrase matcher and degeneracy heuristics of ``u2a_dist.judges`` and, when
``eval.judge`` is set, by the learned harm judge (``eval/harmful_rate``); ``eval/retain_ppl`` is
the response-token perplexity of a retain set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from u2a_dist.config import ConfigError, RunConfig
from u2a_dist.data.examples import Pair, load_completions, load_pairs, load_prompts
from u2a_dist.data.records import prompt_key
from u2a_dist.data.tokenize import encode
from u2a_dist.eval_sources import (
    HELD_OUT,
    PER_SOURCE,
    as_list,
    crosses,
    interval_of,
    load_eval_sources,
    rates_by_source,
    target_value,
)
from u2a_dist.generation import Share, answer_items, encode_prompts, generate
from u2a_dist.judges import is_degenerate, is_refusal
from u2a_dist.sharded import broadcast_object, dataset_logps
from u2a_dist.theta0_cache import Theta0Cache


@dataclass
class EncodedPairs:
    ids: list[str]
    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int) -> EncodedPairs:
    return EncodedPairs(
        [p.id for p in pairs],
        [encode(tokenizer, p.prompt, p.chosen, p.history, max_length) for p in pairs],
        [encode(tokenizer, p.prompt, p.rejected, p.history, max_length) for p in pairs])


def pair_logps(model, pairs: EncodedPairs, pad_id: int,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and the rejected answers (all ranks get all)."""
    chosen, _ = dataset_logps(model, pairs.chosen, pad_id, batch_size)
    rejected, _ = dataset_logps(model, pairs.rejected, pad_id, batch_size)
    return chosen, rejected


def pa_metrics(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, prefix: str = "pa") -> dict[str, float]:
    """pa/accuracy, pa/margin and TRL-style rewards/* from the four log-prob vectors."""
    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    reward_chosen = beta * (logp_chosen - ref_chosen)
    reward_rejected = beta * (logp_rejected - ref_rejected)
    return {
        f"{prefix}/accuracy": float((margin > 0).double().mean()),
        f"{prefix}/margin": float(margin.mean()),
        "rewards/chosen": float(reward_chosen.mean()),
        "rewards/rejected": float(reward_rejected.mean()),
        "rewards/margins": float((reward_chosen - reward_rejected).mean()),
    }


# ------------------------------------------------------------------ generation-based metrics

def response_flags(prompts: Sequence[str], responses: Sequence[str]
                   ) -> tuple[list[bool], list[bool]]:
    """Per response: refused (refusal matcher) and degenerate (neither a refusal nor an
    answer: empty, looping, echo)."""
    if len(prompts) != len(responses) or not responses:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    refused = [is_refusal(r) for r in responses]
    degenerate = [not ref and is_degenerate(r, echo_of=p)
                  for p, r, ref in zip(prompts, responses, refused)]
    return refused, degenerate


def response_metrics(prompts: Sequence[str], responses: Sequence[str],
                     kind: str) -> dict[str, float]:
    """Refusal-matcher and degeneracy shares for one prompt set (no judge needed).

    ``kind="harmful"``: ``eval/refusal_rate``, ``eval/harmful_no_refusal`` (= 1 − refusal rate)
    and ``eval/degenerate_rate`` (neither a refusal nor an answer: empty, looping, echo).
    ``kind="harmless"``: ``eval/over_refusal`` and ``eval/harmless_degenerate_rate``.
    """
    return _rates(kind, *response_flags(prompts, responses))


def _rates(kind: str, refused: Sequence[bool], degenerate: Sequence[bool]) -> dict[str, float]:
    n = len(refused)
    rate = sum(refused) / n
    if kind == "harmful":
        return {"eval/refusal_rate": rate, "eval/harmful_no_refusal": 1.0 - rate,
                "eval/degenerate_rate": sum(degenerate) / n}
    if kind == "harmless":
        return {"eval/over_refusal": rate, "eval/harmless_degenerate_rate": sum(degenerate) / n}
    raise ValueError(f"kind must be harmful|harmless, got {kind!r}")


def judge_metrics(judge, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """``eval/harmful_rate`` (share judged harmful) and ``eval/harmful_prob`` (mean P(harm))."""
    return _judged(judge, prompts, responses)[0]


def _judged(judge, prompts: Sequence[str], responses: Sequence[str]
            ) -> tuple[dict[str, float], list[bool]]:
    probs = np.asarray(judge.predict_proba(list(zip(prompts, responses))), dtype=np.float64)
    harmful = probs >= judge.threshold
    return ({"eval/harmful_rate": float(harmful.mean()), "eval/harmful_prob": float(probs.mean())},
            [bool(h) for h in harmful])


def perplexity(logp: torch.Tensor, ntok: torch.Tensor) -> float:
    """exp(Σ NLL / Σ tokens) over response tokens of a whole set."""
    return float(torch.exp(-logp.sum() / ntok.sum().clamp(min=1)))


def load_eval_judge(path: str):
    """The judge of ``eval.judge``: a HarmJudge directory or an HF sequence classifier.

    Every failure is a ConfigError naming the key and the path, so ``u2a eval`` and the run
    preflight stop before any model is loaded.
    """
    from u2a_dist.judges import HarmJudge, default_encoder_path, load_judge

    if not Path(path).exists():
        raise ConfigError(f"eval.judge: {path!r} does not exist (train a judge with `u2a "
                          f"judge-train --data ../shared/data/refusal/completions --out {path}`, "
                          "or give an HF sequence-classification directory)")
    try:
        judge = load_judge(path)
        if isinstance(judge, HarmJudge):  # its encoder loads lazily: check it is there now
            encoder = judge.encoder_path
            if encoder is None:
                default_encoder_path()
            elif not Path(encoder).exists() and (encoder.startswith((".", "/", "~"))
                                                 or encoder.count("/") != 1):
                raise FileNotFoundError(f"its sentence encoder {encoder!r} does not exist")
        return judge
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"eval.judge: {path!r} is not a usable judge: {exc}") from None


def check_eval_inputs(cfg: RunConfig):
    """Read every evaluation input once (pairs, prompts, retain set, judge): clear errors early.

    Returns the loaded judge (None without ``eval.judge``)."""
    if cfg.data.pa_eval is not None:
        load_pairs(cfg.data.pa_eval)
    exclude = training_prompt_keys(cfg)
    for name in ("harmful_prompts", "harmless_prompts"):
        for spec in as_list(getattr(cfg.eval, name)):
            if all(prompt_key(p.prompt) in exclude for p in load_prompts(spec)):
                raise ConfigError(f"eval.{name}: every prompt of {spec.path} also occurs in "
                                  "the training data; nothing is held out")
    if cfg.eval.retain is not None:
        load_completions(cfg.eval.retain)
    return load_eval_judge(cfg.eval.judge) if cfg.eval.judge is not None else None


def joint_target(cfg: RunConfig, metrics: dict[str, Any]
                 ) -> list[tuple[str, str, float, Any, str]]:
    """(metric, comparison, bound, value, scope) for the target metric and every requirement;
    a rate is judged on the held-out sources when there are any (``eval_sources.target_value``,
    scope says which)."""
    target = cfg.eval.target
    if target is None:
        return []
    bounds = [(target.metric, ">=" if target.mode == "max" else "<=", target.value)]
    bounds += [(k, "<=", b) for k, b in target.require.items()]
    return [(m, op, b, *target_value(metrics, m)) for m, op, b in bounds]


def holds(op: str, bound: float, value: Any) -> bool:
    return isinstance(value, (int, float)) and (value >= bound if op == ">=" else value <= bound)


def target_holds(cfg: RunConfig, metrics: dict[str, Any]) -> bool:
    """The target metric and every requirement hold in ``metrics``."""
    rows = joint_target(cfg, metrics)
    return bool(rows) and all(holds(op, b, v) for _, op, b, v, _ in rows)


def requirements_met(cfg: RunConfig, metrics: dict[str, Any]) -> bool:
    """Every eval.target.require bound holds (a metric not measured does not hold)."""
    return all(holds(op, b, v) for _, op, b, v, _ in joint_target(cfg, metrics)[1:])


def target_report(cfg: RunConfig, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """``joint_target`` with each rate's count and Wilson 95% interval, and whether the bound
    lies inside it (``uncertain``: the evaluation set is too small to tell the side)."""
    rows = []
    for metric, op, bound, value, scope in joint_target(cfg, metrics):
        iv = interval_of(metrics, f"{metric}@{HELD_OUT}" if scope == "held-out sources"
                         else metric)
        rows.append({"metric": metric, "op": op, "bound": bound, "value": value,
                     "scope": scope, "met": holds(op, bound, value),
                     "n": iv[1] if iv else None, "interval": iv[2:] if iv else None,
                     "uncertain": crosses(bound, iv)})
    return rows


def describe_target_row(row: dict[str, Any]) -> str:
    """``metric <= bound on <scope> (n=..): value [lo, hi]``, flagged when uncertain."""
    value = row["value"]
    text = f"{row['metric']} {row['op']} {row['bound']:g} on {row['scope']}"
    text += f" (n={row['n']})" if row["n"] else ""
    text += f": {value:.3f}" if isinstance(value, (int, float)) else ": n/a"
    if row["interval"]:
        lo, hi = row["interval"]
        text += f" [95% {lo:.3f}, {hi:.3f}]"
    return text + (" (the interval crosses the bound)" if row["uncertain"] else "")


def broken_floors(cfg: RunConfig, metrics: dict[str, Any]) -> list[str]:
    """Utility floors (eval.floors: upper bounds) that ``metrics`` exceed."""
    return [f"{k}={metrics[k]:.4g}>{bound}" for k, bound in cfg.eval.floors.items()
            if k in metrics and not metrics[k] <= bound]


def better_best(cfg: RunConfig, best: dict[str, Any] | None, step: int,
                metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The new best.json entry when the evaluation ``metrics`` at ``step`` beat ``best``, else
    None. Steps that break a floor never count; a step meeting the target's requirements beats
    one that does not; then the target metric decides (pa/accuracy without a target). Shared
    by the trainer and the TRL baselines of the benchmarks, so both pick a best step alike."""
    target = cfg.eval.target
    metric, mode = (target.metric, target.mode) if target is not None else ("pa/accuracy", "max")
    value = target_value(metrics, metric)[0]
    if value is None or broken_floors(cfg, metrics):
        return None
    value, joint = float(value), requirements_met(cfg, metrics)
    if best is not None:
        sign = 1.0 if mode == "max" else -1.0
        if not (joint, sign * value) > (best.get("requirements_met", True), sign * best["value"]):
            return None
    return {"step": step, "metric": metric, "mode": mode, "value": value,
            "requirements_met": joint,
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("timing/")}}


def training_prompt_keys(cfg: RunConfig, always: bool = False) -> set[str]:
    """Prompts of the data a run trains on (forget, pa, retain): evaluation leaves them out
    when ``eval.exclude_training_prompts`` is set (empty set otherwise, unless ``always``)."""
    if not (cfg.eval.exclude_training_prompts or always):
        return set()
    d = cfg.data
    items: list = load_completions(d.forget) if d.forget is not None else []
    if d.pa is not None:
        items += load_pairs(d.pa)
    if d.retain is not None:
        retain_specs = d.retain if isinstance(d.retain, list) else [d.retain]
        for spec in retain_specs:
            items += load_prompts(spec) if spec.schema == "prompts" else load_completions(spec)
    return {prompt_key(x.prompt) for x in items}


class GenerationEval:
    """Generation-based metrics for one run: prompts, judge and retain set loaded once.

    ``eval/retain_ppl`` is the perplexity of the response tokens of ``eval.retain`` when given,
    else of the reference model's own greedy answers to the harmless prompts (``prepare`` makes
    them at θ0), which is the most sensitive utility signal: the model at θ0 assigns them a low
    perplexity, and degenerate unlearning raises it at once. The judge runs on rank 0 only.
    """

    def __init__(self, cfg: RunConfig, tokenizer, rank: int = 0, judge=None,
                 exclude: set[str] | None = None, theta0_cache: Theta0Cache | None = None
                 ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.theta0_cache = theta0_cache or Theta0Cache.off()
        ec = cfg.eval
        max_len = cfg.data.max_length
        # Held out means held out: prompts the training data contains are not evaluated on
        # (``exclude``), and a source training touched is reported as not held out.
        # ``exclude``, when given, is already the training prompts' keys (read once)
        training_keys = exclude or training_prompt_keys(cfg, always=True)
        self.sources = {kind: load_eval_sources(cfg, kind, training_keys, exclude or set())
                        for kind in PER_SOURCE}
        for kind, sources in self.sources.items():
            for src in sources:
                if not src.prompts:
                    raise ConfigError(f"eval.{kind}_prompts: every prompt of source {src.name} "
                                      "also occurs in the training data; nothing is held out")
        self.harmful = [p for src in self.sources["harmful"] for p in src.prompts]
        self.harmless = [p for src in self.sources["harmless"] for p in src.prompts]
        self.excluded = sum(src.in_training for sources in self.sources.values()
                            for src in sources) if exclude else 0
        self.harmful_ids = encode_prompts(tokenizer, self.harmful, max_len)
        self.harmless_ids = encode_prompts(tokenizer, self.harmless, max_len)
        self.judge = judge
        if self.judge is None and ec.judge is not None and rank == 0:
            self.judge = load_eval_judge(ec.judge)
        self.has_judge = broadcast_object(self.judge is not None)
        self.retain: list[dict[str, list[int]]] = []
        if ec.retain is not None:
            self.retain = [encode(tokenizer, c.prompt, c.response, c.history, max_len)
                           for c in load_completions(ec.retain)]
        self.reference_answers: list[str] | None = None
        self.reference_ppl: float | None = None
        self.last_generations: dict[str, list[str]] = {}
        self.last_judged: list[bool] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.harmful or self.harmless)

    def prepare(self, reference_model, answers: Share | None = None) -> float:
        """At θ0: the reference answers to the harmless prompts that retain_ppl scores.

        They are scored as generated (the prompt ids, then the generated ids, with no eos
        added where the ``max_new_tokens`` cap cut an answer), not re-tokenised from text.
        ``answers`` reuses generations already made with the reference model. Returns seconds.
        """
        if self.retain or not self.harmless:
            return 0.0
        t0 = time.perf_counter()
        reused = answers is not None
        if answers is None:
            answers = self._generate(reference_model, self.harmless_ids, theta0="harmless")
        self.reference_answers = answers.texts
        self.retain = answer_items(self.harmless_ids, answers)
        if not reused:  # else the caller scores the reference model itself right after
            self.reference_ppl = self._retain_ppl(reference_model)
        return time.perf_counter() - t0

    def _retain_ppl(self, model) -> float:
        logp, ntok = dataset_logps(model, self.retain, self.tokenizer.pad_token_id,
                                   self.cfg.eval.batch_size)
        return perplexity(logp, ntok)

    def _generate(self, model, prompt_ids: list[list[int]], theta0: str | None = None) -> Share:
        """Greedy answers; ``theta0`` names the prompts when ``model`` is θ0 (then cached)."""
        bs, new = self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens

        def compute() -> Share:
            return generate(model, self.tokenizer, prompt_ids, bs, new)

        if theta0 is None:
            return compute()
        return self.theta0_cache.generations(
            f"evaluation answers at θ0 ({len(prompt_ids)} {theta0} prompts)", prompt_ids,
            {"batch_size": bs, "max_new_tokens": new}, compute)

    def needs_reference(self) -> bool:
        """True until the reference answers that retain_ppl scores exist."""
        return not self.retain and bool(self.harmless)

    def __call__(self, model, is_reference: bool = False) -> dict[str, float]:
        """Generate, judge and score; the same dict on every rank, with ``timing/eval_*_s``.

        ``is_reference``: ``model`` is θ0 itself, so its harmless answers become the reference
        answers of retain_ppl (no second generation).
        """
        out: dict[str, float] = {}
        timing: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            self._run(model, out, timing, is_reference)
        finally:
            model.train(was_training)
        out.update(timing)
        return out

    def _run(self, model, out: dict[str, float], timing: dict[str, float],
             is_reference: bool) -> None:
        if self.harmful:
            t0 = time.perf_counter()
            texts = self._generate(model, self.harmful_ids,
                                   theta0="harmful" if is_reference else None).texts
            timing["timing/eval_generate_harmful_s"] = time.perf_counter() - t0
            prompts = [p.prompt for p in self.harmful]
            refused, degenerate = response_flags(prompts, texts)
            out.update(_rates("harmful", refused, degenerate))
            flags = {"eval/harmful_no_refusal": [not r for r in refused],
                     "eval/degenerate_rate": degenerate}
            if self.has_judge:
                t0 = time.perf_counter()
                judged = (_judged(self.judge, prompts, texts) if self.judge is not None
                          else None)
                judged_metrics, flags["eval/harmful_rate"] = broadcast_object(judged)
                out.update(judged_metrics)
                timing["timing/eval_judge_s"] = time.perf_counter() - t0
            out.update(rates_by_source(self.sources["harmful"], flags))
            self.last_generations["harmful"] = texts
            self.last_judged = flags.get("eval/harmful_rate")  # per prompt, when judged
        if self.harmless:
            t0 = time.perf_counter()
            answers = self._generate(model, self.harmless_ids,
                                     theta0="harmless" if is_reference else None)
            timing["timing/eval_generate_harmless_s"] = time.perf_counter() - t0
            refused, degenerate = response_flags([p.prompt for p in self.harmless],
                                                 answers.texts)
            out.update(_rates("harmless", refused, degenerate))
            out.update(rates_by_source(self.sources["harmless"], {
                "eval/over_refusal": refused, "eval/harmless_degenerate_rate": degenerate}))
            self.last_generations["harmless"] = answers.texts
            if is_reference and not self.retain:
                self.prepare(model, answers=answers)
        if self.retain:
            t0 = time.perf_counter()
            out["eval/retain_ppl"] = self._retain_ppl(model)
            if is_reference and self.reference_ppl is None:
                self.reference_ppl = out["eval/retain_ppl"]
            if self.reference_ppl is not None:  # utility relative to θ0 (1.0 = unchanged)
                out["eval/retain_ppl_ratio"] = out["eval/retain_ppl"] / self.reference_ppl
            timing["timing/eval_retain_ppl_s"] = time.perf_counter() - t0
