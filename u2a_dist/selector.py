"""The U2A selector: which negatives to unlearn and how hard (docs/design.md §2).

At the current θ, with inner weights w:

    v   = (H + δI)⁻¹ ∇J          H = ∇²_θ L_in(θ, w), J = DPO loss on the preference pairs
    s_i = ⟨v, ∇_θ f_i⟩            f_i = ℓ_i + c_m m_i   (score; higher = unlearning i lowers J more)
    g_i = −s_i = ∂J/∂w_i         (implicit function theorem)

The s_i of all N negatives come from one vector v as directional derivatives, by a central
difference of the per-example losses along v: two no-grad forward passes over the forget set,
instead of N backward passes (``score: per_example_grad`` keeps the N-backward reference).

Weights move by exponentiated gradient on the simplex, w_i ← w_i·exp(−η g_i)/Z: toward the
examples with high score (descent on J; the paper's public code has this sign backwards).

The maths talks to the model through :class:`HyperProblem`, so the same functions run on the
DeepSpeed trainer (:class:`TrainerProblem`) and on small problems that tests can solve exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from u2a_dist.config import SelectorConfig
from u2a_dist.linalg import (
    ShardedVector,
    extreme_eigenvalues,
    fd_epsilon,
    finite_difference_hvp,
    identity_ihvp,
    neumann_ihvp,
    resolve_damping_and_alpha,
    sharded_rms,
)
from u2a_dist.losses import NonFiniteLossError, check_finite


class HyperProblem(Protocol):
    """What the selector needs from a model + data, on this rank."""

    ids: list[str]

    def parts(self) -> list[torch.Tensor]:
        """Local parameter storage read by the forward pass (perturbed in place, restored)."""

    def zeros(self) -> ShardedVector:
        """A zero vector with the parameters' local layout and process group."""

    def outer_grad(self) -> tuple[ShardedVector, float]:
        """(∇J, J) at the current parameters."""

    def inner_grad(self) -> list[torch.Tensor]:
        """Local gradient of the data terms of L_in(·, w) on the Hessian batch (fp32 copies)."""

    def analytic_curvature(self) -> float:
        """Curvature added exactly (the prox λ): H = ∇²(data terms) + λI."""

    def example_losses(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, ℓ_i) for the examples idx, no grad, identical on every rank."""

    def example_grad(self, i: int) -> ShardedVector:
        """∇f_i (the reference path: one backward pass per example)."""


@dataclass
class Hypergradient:
    index: list[int]
    scores: torch.Tensor  # s_i = −g_i
    losses: torch.Tensor  # ℓ_i at the θ where it was scored
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def grads(self) -> torch.Tensor:
        return -self.scores


def solve_ihvp(problem: HyperProblem, cfg: SelectorConfig, b: ShardedVector,
               seed: int = 0) -> tuple[ShardedVector, dict[str, float]]:
    """v = (H + δI)⁻¹ b by Neumann (auto α, δ from the spectrum), or b/γ for `identity`."""
    if cfg.ihvp == "identity":
        return identity_ihvp(b, cfg.identity_gamma), {"selector/ihvp_terms": 0}
    lam = problem.analytic_curvature()
    cache: dict[str, Any] = {}

    def grad_fn() -> list[torch.Tensor]:
        return problem.inner_grad()

    def matvec(x: ShardedVector) -> ShardedVector:
        cache["hvps"] = cache.get("hvps", 0) + 1
        return finite_difference_hvp(problem.parts(), grad_fn, x, eps=cfg.fd_eps,
                                     extra_diag=lam)

    stats: dict[str, float] = {}
    if cfg.damping == "auto" or cfg.alpha == "auto":
        lam_min, lam_max = extreme_eigenvalues(matvec, b, iters=cfg.power_iters, seed=seed)
        stats.update({"selector/lambda_min": lam_min, "selector/lambda_max": lam_max})
        delta, alpha = resolve_damping_and_alpha(lam_min, lam_max, cfg.damping, cfg.alpha)
    else:  # both given: honoured as they are (a bad α shows up as a divergence error)
        delta, alpha = float(cfg.damping), float(cfg.alpha)
    result = neumann_ihvp(matvec, b, cfg.neumann_terms, alpha, delta, tol=cfg.neumann_tol)
    stats.update({"selector/damping": delta, "selector/alpha": alpha,
                  "selector/ihvp_residual": result.residual,
                  "selector/ihvp_terms": result.terms_used, "selector/hvps": cache.get("hvps", 0),
                  # ‖(H+δI)v_k − ∇J‖/‖∇J‖ of the partial sums, from the recurrence (no HVPs)
                  "selector/ihvp_term_norms": [round(x, 6) for x in result.term_norms]})
    return result.v, stats


#: Forward passes over the N negatives that :func:`directional_scores` makes (θ ± εv).
SCORE_FORWARD_PASSES = 2


def directional_scores(problem: HyperProblem, v: ShardedVector, idx: list[int],
                       eps: float | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """s_i = ⟨v, ∇f_i⟩ = [f_i(θ+εv) − f_i(θ−εv)] / 2ε for all idx: two forward passes.

    θ is restored bit-exactly from a saved copy. Also returns ℓ_i at θ for scores.jsonl, as the
    midpoint [ℓ_i(θ+εv) + ℓ_i(θ−εv)] / 2 = ℓ_i(θ) + (ε²/2)·vᵀ∇²ℓ_i v + O(ε⁴) of the same two
    passes: a third pass at θ itself cost a third of the scoring time (on SmolLM2, 2 CPU ranks,
    about 80 of round 0's 249 s of scoring) for a logged value.
    """
    params = problem.parts()
    v_norm = v.norm()
    if v_norm == 0:
        _, ell = problem.example_losses(idx)
        return torch.zeros(len(idx), dtype=torch.float64), ell
    if eps == "auto":
        step = fd_epsilon(sharded_rms([p.detach() for p in params], v.group, v.replicated,
                                      v.valid_numel), v_norm)
    else:
        step = float(eps)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts):
                p.data.copy_(torch.add(s, q.to(p.dtype), alpha=step))
        f_plus, ell_plus = problem.example_losses(idx)
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts):
                p.data.copy_(torch.add(s, q.to(p.dtype), alpha=-step))
        f_minus, ell_minus = problem.example_losses(idx)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    ell = (ell_plus.double() + ell_minus.double()) / 2
    return (f_plus.double() - f_minus.double()) / (2 * step), ell


def per_example_scores(problem: HyperProblem, v: ShardedVector,
                       idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: s_i = ⟨v, ∇f_i⟩ with one backward pass per example."""
    scores = torch.tensor([v.dot(problem.example_grad(i)) for i in idx], dtype=torch.float64)
    _, ell = problem.example_losses(idx)
    return scores, ell


def hypergradients(problem: HyperProblem, cfg: SelectorConfig, idx: list[int],
                   seed: int = 0) -> Hypergradient:
    """Scores s_i = −∂J/∂w_i for the examples idx at the current θ and weights."""
    t0 = time.perf_counter()
    grad_j, j_value = problem.outer_grad()
    v, stats = solve_ihvp(problem, cfg, grad_j, seed=seed)
    stats["selector/J"] = j_value
    stats["selector/grad_J_norm"] = grad_j.norm()
    t1 = time.perf_counter()
    if cfg.score == "directional":
        scores, ell = directional_scores(problem, v, idx, cfg.fd_eps)
    else:
        scores, ell = per_example_scores(problem, v, idx)
    bad = ~torch.isfinite(scores)
    if bad.any():
        names = [problem.ids[idx[k]] for k in bad.nonzero().flatten().tolist()]
        raise NonFiniteLossError(f"non-finite selector score for examples {names[:10]}"
                                 + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
    stats["timing/ihvp_s"] = t1 - t0
    stats["timing/score_s"] = time.perf_counter() - t1
    return Hypergradient(list(idx), scores, ell, stats)


def select_top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Positions of the k highest scores (ties broken by position, so ranks agree)."""
    k = min(k, len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def exponentiated_gradient(weights: torch.Tensor, grads: torch.Tensor,
                           eta: float) -> torch.Tensor:
    """w_i ← w_i exp(−η g_i) / Σ_j w_j exp(−η g_j), computed stably (max subtracted)."""
    logits = torch.log(weights.double().clamp(min=1e-300)) - eta * grads.double()
    logits = logits - logits.max()
    out = torch.exp(logits)
    return out / out.sum()


def effective_eta(grads: torch.Tensor, eta: float, scale: str = "raw") -> float:
    """The exponentiated-gradient step: ``eta`` (raw), or ``eta / max|g|`` (max_abs), which makes
    the update invariant to the hypergradients' scale (it moves with the damping δ)."""
    if scale == "raw":
        return eta
    top = float(grads.abs().max()) if grads.numel() else 0.0
    return eta / top if top > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The DeepSpeed trainer as a HyperProblem
# ---------------------------------------------------------------------------------------------


class TrainerProblem:
    """HyperProblem on a :class:`u2a_dist.trainer.Trainer` (any ZeRO stage, any world size).

    Every method is collective: all ranks call it with the same arguments, and ZeRO-3 forward
    passes are padded so every rank makes the same number of them. The passes run on
    ``trainer.selector_engine()``: the run's engine, or in a bf16/fp16 run an fp32 twin loaded
    with the optimizer's master weights when the problem is made (docs/design.md §3).
    """

    def __init__(self, trainer, hessian_batch: int) -> None:
        self.t = trainer
        self.engine = trainer.selector_engine()
        self.cfg = trainer.cfg
        self.ids = trainer.forget.ids
        self.hessian_batch = hessian_batch

    # ---- layout

    def parts(self) -> list[torch.Tensor]:
        return self.engine.local_parts()

    def zeros(self) -> ShardedVector:
        engine = self.engine
        parts = [torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                 for t in engine.local_parts()]
        valid = None
        if engine.stage == 3:
            rank = self.t.rank
            valid = [max(0, min(p.ds_numel - rank * p.ds_tensor.numel(), p.ds_tensor.numel()))
                     for p in engine.params]
        return ShardedVector(parts, group=engine.partition_group(), valid_numel=valid)

    def _as_vector(self, grads: list[torch.Tensor]) -> ShardedVector:
        like = self.zeros()
        return ShardedVector([g.reshape(q.shape).float().to(q.device)
                              for g, q in zip(grads, like.parts)],
                             group=like.group, valid_numel=like.valid_numel)

    # ---- gradients

    def _accumulated_grad(self, batches) -> list[torch.Tensor]:
        """Σ over `batches` of local gradients; each item is a loss closure on the engine."""
        engine = self.engine
        acc: list[torch.Tensor] | None = None
        engine.release_gathered()  # θ may have just been written (finite differences)
        engine.zero_grad()
        for closure in batches:
            loss = closure()
            engine.backward(loss)
            grads = engine.local_grads()
            acc = grads if acc is None else [a.add_(g) for a, g in zip(acc, grads)]
            engine.zero_grad()
        assert acc is not None
        return acc

    def _padded(self, n: int, batch: int) -> list[list[int]]:
        """This rank's share of range(n) in batches; -1 marks padding (weight 0)."""
        from u2a_dist.passes import padded_shares

        share = padded_shares(n, self.t.world_size, batch)[self.t.rank]
        return [share[i:i + batch] for i in range(0, len(share), batch)]

    def outer_grad(self) -> tuple[ShardedVector, float]:
        from u2a_dist.data.tokenize import collate
        from u2a_dist.device import to_device
        from u2a_dist.losses import dpo_loss, sequence_logps

        t, pairs = self.t, self.t.pa
        if pairs is None:
            raise ValueError("the selector needs data.pa (the preference pairs of J)")
        sample = self.outer_indices()
        n, beta, world = len(sample), self.cfg.selector.dpo_beta, t.world_size
        ref_c, ref_r = t.ref_cache["pa/chosen"], t.ref_cache["pa/rejected"]
        total = [0.0]

        def closure_for(chunk: list[int]):
            def closure() -> torch.Tensor:
                real = [sample[i] if i >= 0 else sample[0] for i in chunk]
                mask = torch.tensor([1.0 if i >= 0 else 0.0 for i in chunk], device=t.device)
                batch = to_device(collate([pairs.chosen[i] for i in real]
                                          + [pairs.rejected[i] for i in real], t.pad_id),
                                  t.device)
                logp, _ = sequence_logps(self.engine.ds, batch)
                lc, lr = logp[:len(real)], logp[len(real):]
                loss, _, _ = dpo_loss(lc, lr, ref_c[real].float().to(t.device),
                                      ref_r[real].float().to(t.device), beta)
                total[0] += float((loss.detach() * mask).sum())
                # DeepSpeed averages gradients over ranks: scale by W so the sum is ∇J.
                return world * (loss * mask).sum() / n
            return closure

        # Pairs per pass: unlearn.batch_size (2 sequences each), about a training step's
        # activations; eval.batch_size (16 in the recipe) held ~4 GB of them per rank on SmolLM2.
        grads = self._accumulated_grad(closure_for(c) for c in
                                       self._padded(n, self.cfg.unlearn.batch_size))
        from u2a_dist.trainer import all_reduce_sum

        j_value = all_reduce_sum(total[0]) / n
        vec = self._as_vector(grads)
        return vec, j_value

    def outer_indices(self) -> list[int]:
        """The pairs of J this round: all of data.pa, or a seeded sample of selector.outer_sample
        (the same on every rank, a fresh one each round)."""
        return outer_sample_indices(len(self.t.pa), self.cfg.selector.outer_sample,
                                    self.cfg.runtime.seed, self.t.round)

    def _hessian_indices(self) -> list[int]:
        """The Hessian batch: the whole support when it fits, else a seeded weighted subset."""
        support = self.t.sampler.support
        if self.hessian_batch >= len(support):
            return list(support)
        g = torch.Generator().manual_seed(self.cfg.runtime.seed * 7919 + self.t.round)
        pick = torch.randperm(len(support), generator=g)[: self.hessian_batch]
        return sorted(support[int(i)] for i in pick)

    def inner_grad(self) -> list[torch.Tensor]:
        t = self.t
        idx = self._hessian_indices()
        support_size = len(t.sampler.support)
        scale = support_size / len(idx)
        world = t.world_size
        chunks = self._padded(len(idx), max(1, self.cfg.unlearn.batch_size // world))

        def closure_for(chunk: list[int]):
            def closure() -> torch.Tensor:
                real = [idx[i] if i >= 0 else idx[0] for i in chunk]
                mask = torch.tensor([1.0 if i >= 0 else 0.0 for i in chunk], device=t.device)
                total = t.per_example_inner(self.engine.ds, real)[0]
                w = t.weights[real].float().to(t.device) * mask
                return world * scale * (w * total).sum()
            return closure

        closures = [closure_for(c) for c in chunks]
        if self.cfg.unlearn.retain_kl_weight > 0 and t.retain:
            closures.append(self._retain_closure())
        return self._accumulated_grad(closures)

    def _retain_closure(self):
        """Retain-KL term on a fixed retain batch, an equal share per rank."""
        from u2a_dist.data.tokenize import shard

        t = self.t
        n = min(len(t.retain), self.hessian_batch)
        n -= n % t.world_size
        local = shard(list(range(max(n, t.world_size))), t.rank, t.world_size)

        def closure() -> torch.Tensor:
            kl_sum, count = t.retain_kl_term(local, self.engine)
            return self.cfg.unlearn.retain_kl_weight * t.world_size * kl_sum / max(count, 1.0)
        return closure

    def analytic_curvature(self) -> float:
        return float(self.cfg.unlearn.prox_lambda)

    # ---- per-example losses

    def example_losses(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from u2a_dist.losses import unlearn_loss
        from u2a_dist.passes import dataset_logps

        t = self.t
        self.engine.release_gathered()  # θ may have just been written (finite differences)
        model = self.engine.module
        was_training = model.training
        model.eval()
        bs = self.cfg.eval.batch_size
        logp, ntok = dataset_logps(model, [t.forget.items[i] for i in idx], t.pad_id, bs)
        ref = t.ref_cache["forget"][idx] if "forget" in t.ref_cache else None
        ell = unlearn_loss(self.cfg.unlearn.loss, logp, ntok, ref, self.cfg.unlearn.npo_beta)
        f = self.cfg.unlearn.forget_weight * ell
        if self.cfg.unlearn.mismatch_weight > 0 and t.forget.mismatch is not None:
            m_logp, m_ntok = dataset_logps(model, [t.forget.mismatch[i] for i in idx],
                                           t.pad_id, bs)
            f = f + self.cfg.unlearn.mismatch_weight * (-m_logp / m_ntok.clamp(min=1))
        model.train(was_training)
        check_finite(f, "per-example inner loss", [self.ids[i] for i in idx])
        return f, ell

    def example_grad(self, i: int) -> ShardedVector:
        t = self.t

        def closure() -> torch.Tensor:
            total = t.per_example_inner(self.engine.ds, [i])[0]
            return total.sum()  # same example on every rank: the rank average is ∇f_i

        return self._as_vector(self._accumulated_grad([closure]))


# ---------------------------------------------------------------------------------------------
# The U2A loop
# ---------------------------------------------------------------------------------------------


def _log_scores(trainer, hg: Hypergradient, weights: torch.Tensor) -> None:
    if trainer.rank != 0 or trainer.run_dir is None:
        return
    for k, i in enumerate(hg.index):
        trainer.run_dir.append("scores.jsonl", {
            "round": trainer.round, "index": i, "id": trainer.forget.ids[i],
            "score": float(hg.scores[k]), "weight": float(weights[i]),
            "loss": float(hg.losses[k])})


def outer_sample_indices(n: int, m: int, seed: int, round_: int) -> list[int]:
    """Round ``round_``'s pairs of J: all n when m is 0 or ≥ n, else a seeded sample of m."""
    if m == 0 or m >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 104729 + 31 * round_ + 1)
    return sorted(int(i) for i in torch.randperm(n, generator=g)[:m])


def outer_pairs_used(n: int, cfg) -> list[int]:
    """Every pair some round's J can draw (rounds 0..selector.rounds): the only ones whose
    reference log-probs the selector needs."""
    sel = cfg.selector
    return sorted({i for r in range(sel.rounds + 1)
                   for i in outer_sample_indices(n, sel.outer_sample, cfg.runtime.seed, r)})


def select_round0(trainer, hessian_batch: int | None = None) -> Hypergradient:
    """Round 0: score all N with w uniform, keep the top-k as the support, w uniform on it."""
    cfg = trainer.cfg.selector
    problem = TrainerProblem(trainer, hessian_batch or cfg.hessian_batch)
    everything = list(range(len(trainer.forget)))
    hg = hypergradients(problem, cfg, everything, seed=trainer.cfg.runtime.seed)
    support = select_top_k(hg.scores, cfg.top_k)
    weights = torch.zeros(len(trainer.forget), dtype=torch.float64)
    weights[support] = 1.0 / len(support)
    trainer.set_support(support, weights)
    _log_scores(trainer, hg, weights)
    return hg


def reweight(trainer) -> Hypergradient:
    """A later round: rescore the support at the current θ and move w by exponentiated gradient."""
    cfg = trainer.cfg.selector
    problem = TrainerProblem(trainer, cfg.hessian_batch)
    support = list(trainer.sampler.support)
    hg = hypergradients(problem, cfg, support, seed=trainer.cfg.runtime.seed + trainer.round)
    eta = effective_eta(hg.grads, cfg.eta, cfg.eta_scale)
    hg.stats["selector/eta"] = eta
    new = exponentiated_gradient(trainer.weights[support], hg.grads, eta)
    weights = torch.zeros_like(trainer.weights)
    weights[support] = new
    trainer.set_support(support, weights)
    _log_scores(trainer, hg, weights)
    return hg


def run_u2a(trainer, progress=None) -> dict[str, Any]:
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
        if progress is not None:
            progress(record)
        return hg

    if trainer.resumed_from is not None:
        _drop_scores_from_round(trainer, trainer.round)
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
        result = trainer.train(steps=boundary - trainer.step, progress=progress)
        if result["stopped"] != "budget":
            break
    if not result:
        stopped = "time_budget" if trainer.over_time_budget() else "budget"
        result = {"step": trainer.step, "stopped": stopped, "train_time_s": trainer.train_time,
                  "eval_time_s": trainer.eval_time}
    result["rounds"] = trainer.round
    return result


def _drop_scores_from_round(trainer, first_round: int) -> None:
    """On resume: forget scores.jsonl rows of rounds the restored state has not reached."""
    if trainer.rank != 0 or trainer.run_dir is None:
        return
    path = trainer.run_dir.path / "scores.jsonl"
    if not path.is_file():
        return
    import json

    from u2a_dist.rundir import atomic_write

    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["round"] < first_round]
    atomic_write(path, "".join(line + "\n" for line in kept))


def _entropy(w: torch.Tensor) -> float:
    p = w[w > 0].double()
    return float(-(p * p.log()).sum())
