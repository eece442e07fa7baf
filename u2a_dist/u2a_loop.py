"""The U2A loop above the trainer: round 0 (score all, keep the top-k), then T steps, rescore,
reweight, until the target, the step or time budget, or a floor (docs/design.md §2).

The trainer exposes steps, the support and the weights and knows nothing of this loop; the
mathematics is :mod:`u2a_dist.selector`, the model side :mod:`u2a_dist.trainer_problem`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from u2a_dist import progress
from u2a_dist.sampling import candidate_indices
from u2a_dist.selection_labels import (
    grounded_shares,
    grounded_warning,
    label_stats,
    unscored_counts,
    weight_shares,
)
from u2a_dist.selector import (
    Hypergradient,
    cosine,
    effective_eta,
    exponentiated_gradient,
    hypergradients,
    select_top_k,
)
from u2a_dist.trainer_problem import TrainerProblem

log = logging.getLogger(__name__)


def term_scores(trainer, hg: Hypergradient) -> dict[str, torch.Tensor]:
    """s_i split by the inner objective's terms, ``forget`` (c_f·⟨v, ∇ℓ_i⟩) and ``mismatch``
    (the rest, c_m·⟨v, ∇m_i⟩), where both are on and the scoring measured ⟨v, ∇ℓ_i⟩: which term
    tells harmful from benign negatives apart (issue 22)."""
    objective = trainer.objective
    if hg.part != "total":  # only that part was scored (selector.score_on)
        return {hg.part: hg.scores}
    if hg.loss_scores is None or not objective.uses_mismatch or objective.forget_weight == 0:
        return {}  # one term: nothing to split
    forget = objective.forget_weight * hg.loss_scores
    return {"forget": forget, "mismatch": hg.scores - forget}


def ranking_scores(trainer, hg: Hypergradient) -> torch.Tensor:
    """What top-k and the reweighting use: s_i, or with ``selector.score_on: forget|mismatch``
    that term's part alone (the whole score where there is no other term to leave out), over
    ‖∇ of it‖ with ``selector.normalize: cosine``."""
    scores = hg.scores
    if trainer.cfg.selector.score_on != "total":
        scores = term_scores(trainer, hg).get(trainer.cfg.selector.score_on, hg.scores)
    return scores if hg.grad_norms is None else cosine(scores, hg.grad_norms)


def _log_scores(trainer, hg: Hypergradient, weights: torch.Tensor) -> None:
    if trainer.rank != 0 or trainer.run_dir is None:
        return
    examples = trainer.forget.examples
    terms = term_scores(trainer, hg)
    for k, i in enumerate(hg.index):
        label = examples[i].attrs.get("label")  # ground truth, for reports (DataSpec.label)
        trainer.run_dir.append("scores.jsonl", {
            "round": trainer.round, "index": i, "id": examples[i].id,
            "score": float(hg.scores[k]), "weight": float(weights[i]),
            **{f"score_{name}": float(t[k]) for name, t in terms.items()},
            **({"grad_norm": float(hg.grad_norms[k])} if hg.grad_norms is not None else {}),
            "loss": float(hg.losses[k]) if torch.isfinite(hg.losses[k]) else None,
            **({"label": label} if label is not None else {})})


def _random(idx: list[int], seed: int) -> Hypergradient:
    """random-k (``selector.score: random``): seeded uniform scores, the same on every rank,
    so that the top-k is a random support; no ∇J, no HVP, no loss (NaN)."""
    scores = torch.rand(len(idx), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    return Hypergradient(list(idx), scores, torch.full((len(idx),), float("nan")))


def select_round0(trainer, hessian_batch: int | None = None) -> Hypergradient:
    """Round 0: score all N (or ``selector.candidates`` of them, a seeded sample) with w
    uniform, keep the top-k as the support, w uniform on it."""
    cfg = trainer.cfg.selector
    seed = trainer.cfg.runtime.seed
    scored = candidate_indices(len(trainer.forget), cfg.candidates, seed)
    if cfg.score == "random":
        hg = _random(scored, seed)
    else:
        problem = TrainerProblem(trainer, hessian_batch or cfg.hessian_batch)
        hg = hypergradients(problem, cfg, scored, seed=seed)
    top = select_top_k(ranking_scores(trainer, hg), cfg.top_k)  # positions into `scored`
    support = [scored[p] for p in top]
    weights = torch.zeros(len(trainer.forget), dtype=torch.float64)
    weights[support] = 1.0 / len(support)
    trainer.set_support(support, weights)
    # a pool with ground-truth labels: how well the scores separate them (reports only)
    labels = [trainer.forget.examples[i].attrs.get("label") for i in scored]
    # AUC of the total only where the scores are the total (not one part of it alone)
    hg.stats.update({k: v for k, v in label_stats(hg.scores.tolist(), labels, top).items()
                     if hg.part == "total" or not k.startswith("selector/auc@")})
    hg.stats.update(unscored_counts(trainer.forget.examples, scored))
    hg.stats.update(weight_shares([float(weights[i]) for i in support],
                                  [labels[p] for p in top]))
    parts = term_scores(trainer, hg)
    if hg.grad_norms is not None or cfg.score_on != "total":  # and what the top-k ranked by
        parts["ranking"] = ranking_scores(trainer, hg)
    for name, part in parts.items():  # how well each term alone separates
        hg.stats.update({f"{k}/{name}": v for k, v in label_stats(part.tolist(), labels,
                                                                     top).items()
                         if k.startswith("selector/auc@")})
    if trainer.objective.uses_mismatch:  # a label leak through the targets, named
        grounded = trainer.forget.grounded
        hg.stats.update(grounded_shares(labels, grounded and [grounded[i] for i in scored]))
        if (warning := grounded_warning(hg.stats)) and trainer.rank == 0:
            log.warning("%s", warning)
    _log_scores(trainer, hg, weights)
    return hg


def reweight(trainer) -> Hypergradient:
    """A later round: rescore the support at the current θ and move w by exponentiated gradient."""
    cfg = trainer.cfg.selector
    if cfg.score == "random":  # random-k trains its support with uniform weights throughout
        return _random(list(trainer.sampler.support), trainer.cfg.runtime.seed + trainer.round)
    problem = TrainerProblem(trainer, cfg.hessian_batch)
    support = list(trainer.sampler.support)
    hg = hypergradients(problem, cfg, support, seed=trainer.cfg.runtime.seed + trainer.round)
    ranked = ranking_scores(trainer, hg)
    grads = -ranked
    eta = effective_eta(grads, cfg.eta, cfg.eta_scale)
    hg.stats["selector/eta"] = eta
    new = exponentiated_gradient(trainer.weights[support], grads, eta)
    weights = torch.zeros_like(trainer.weights)
    weights[support] = new
    trainer.set_support(support, weights)
    # a labelled pool: how the rescored support ranks the labels, where the mass moved
    labels = [trainer.forget.examples[i].attrs.get("label") for i in support]
    hg.stats.update({k: v for k, v in label_stats(ranked.tolist(), labels,
                                                  range(len(support))).items()
                     if k.startswith("selector/auc@")})
    hg.stats.update(weight_shares(new.tolist(), labels))
    _log_scores(trainer, hg, weights)
    return hg


def run_u2a(trainer, at_step=None) -> dict[str, Any]:
    """Round 0 selection, then T steps / rescore / reweight, until target, budget or floor.

    Resumable: the round, support and weights live in the trainer's checkpoints, so a restarted
    job continues the round it was in (a round's scoring is deterministic, so redoing it after a
    crash gives the same weights).
    """
    cfg = trainer.cfg
    sel = cfg.selector
    stats_log: list[dict[str, Any]] = []

    def timed(fn) -> Hypergradient:
        t0 = time.perf_counter()
        with progress.phase("selection", what=f"round {trainer.round}"):
            hg = fn(trainer)
        dt = time.perf_counter() - t0
        trainer.train_time += dt  # selection is part of the method's training cost
        record = {"step": trainer.step, "time_s": round(trainer.train_time, 4),
                  "round": trainer.round, "timing/select_s": dt, **hg.stats,
                  "selector/support": len(trainer.sampler.support),
                  "selector/weight_max": float(trainer.weights.max()),
                  "selector/weight_entropy": _entropy(trainer.weights)}
        trainer.log(record)
        stats_log.append(record)
        if at_step is not None:
            at_step(record)
        return hg

    if trainer.resumed_from is not None and trainer.rank == 0 and trainer.run_dir is not None:
        trainer.run_dir.drop_scores_from_round(trainer.round)
    if trainer.step == 0 and trainer.round == 0:
        timed(select_round0)
        trainer.round = 1
        if cfg.runtime.checkpoint_every and trainer.run_dir is not None:
            trainer.save_checkpoint()
    spr = sel.steps_per_round
    result: dict[str, Any] = {}
    while trainer.step < cfg.unlearn.steps:
        if trainer.over_time_budget():  # before a reweighting round, which costs many steps
            result = {}
            break
        # A round boundary whose reweighting has not happened yet (round r is done at step
        # r * T): reached just now, or restored from a checkpoint written at the boundary.
        if spr and trainer.step > 0 and trainer.step % spr == 0 \
                and trainer.round == trainer.step // spr and trainer.round <= sel.rounds:
            timed(reweight)
            trainer.round += 1
        boundary = (trainer.step // spr + 1) * spr if spr else cfg.unlearn.steps
        result = trainer.train(steps=boundary - trainer.step, at_step=at_step)
        if result["stopped"] != "budget":
            break
    if not result:
        stopped = "time_budget" if trainer.over_time_budget() else "budget"
        result = {"step": trainer.step, "stopped": stopped, "train_time_s": trainer.train_time,
                  "eval_time_s": trainer.eval_time}
    result["rounds"] = trainer.round
    return result


def _entropy(w: torch.Tensor) -> float:
    p = w[w > 0].double()
    return float(-(p * p.log()).sum())
