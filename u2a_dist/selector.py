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
DeepSpeed trainer (:class:`u2a_dist.trainer_problem.TrainerProblem`) and on small problems
that tests can solve exactly. The loop that uses them is :mod:`u2a_dist.u2a_loop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from u2a_dist import progress
from u2a_dist.config import SelectorConfig
from u2a_dist.linalg import (
    FD_REL_STEP,
    FD_REL_STEP_ADAPTERS,
    CGBreakdownError,
    IHVPResult,
    ShardedVector,
    cg_ihvp,
    extreme_eigenvalues,
    fd_epsilon,
    finite_difference_hvp,
    identity_ihvp,
    neumann_ihvp,
    resolve_damping_and_alpha,
    sharded_rms,
)
from u2a_dist.losses import NonFiniteLossError


class HyperProblem(Protocol):
    """What the selector needs from a model + data, on this rank."""

    ids: list[str]
    #: the trainable parameters are LoRA adapters (B = 0 at θ0): a larger finite-difference step
    adapters_only: bool

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

    def example_losses(self, idx: list[int], part: str = "total"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, ℓ_i) for the examples idx, no grad, identical on every rank; ``part``
        ``forget`` | ``mismatch``: that term's part of f_i alone (c_f ℓ_i or c_m m_i, ℓ_i NaN
        for the latter), computed without the other term's forward passes."""

    def example_grad(self, i: int, term: str = "total") -> ShardedVector:
        """∇f_i, ∇ℓ_i (``term="forget"``) or ∇(f_i − c_f ℓ_i) (``"mismatch"``): one backward."""

    def example_grad_norms(self, idx: list[int], term: str = "total",
                           advance: Callable[[], Any] | None = None) -> torch.Tensor:
        """‖∇f_i‖ (or ‖∇ℓ_i‖) for the examples idx, identical on every rank (float64);
        ``advance()`` once per example. :func:`gradient_norms` is the reference."""


@dataclass
class Hypergradient:
    index: list[int]
    scores: torch.Tensor  # s_i = −g_i
    losses: torch.Tensor  # ℓ_i at the θ where it was scored
    stats: dict[str, float] = field(default_factory=dict)
    #: ⟨v, ∇ℓ_i⟩, the unlearning loss's own directional derivative (directional scoring only):
    #: s_i − c_f·loss_scores_i is the mismatch term's part of s_i
    loss_scores: torch.Tensor | None = None
    #: ``selector.normalize: cosine``: ‖∇f_i‖ (of the part with ``score_on``), what the
    #: ranking divides by
    grad_norms: torch.Tensor | None = None
    #: what ``scores`` holds: s_i (``total``), or the forget or mismatch part of it alone where
    #: only that part was scored (``selector.score_on``: the other term's passes skipped)
    part: str = "total"

    @property
    def grads(self) -> torch.Tensor:
        return -self.scores


def solve_ihvp(problem: HyperProblem, cfg: SelectorConfig, b: ShardedVector,
               seed: int = 0) -> tuple[ShardedVector, dict[str, float]]:
    """v = (H + δI)⁻¹ b by Neumann (auto α, δ from the spectrum), or b/γ for `identity`."""
    if cfg.ihvp == "identity":
        return identity_ihvp(b, cfg.identity_gamma), {"selector/ihvp_terms": 0}
    lam = problem.analytic_curvature()
    # CG needs the damping alone, Neumann its step α too
    auto = cfg.damping == "auto" or (cfg.ihvp == "neumann" and cfg.alpha == "auto")
    iters = cfg.cg_iters if cfg.ihvp == "cg" else cfg.neumann_terms
    # at most this many HVPs: the Lanczos spectrum estimate, then the solver's
    with progress.phase("inverse HVP", (cfg.lanczos_steps if auto else 0) + iters,
                        unit="HVP") as ph:
        return _solve(problem, cfg, b, seed, lam, auto, ph)


def _solve(problem: HyperProblem, cfg: SelectorConfig, b: ShardedVector, seed: int,
           lam: float, auto: bool, ph: progress.Phase
           ) -> tuple[ShardedVector, dict[str, float]]:
    cache: dict[str, Any] = {}

    def grad_fn() -> list[torch.Tensor]:
        return problem.inner_grad()

    def matvec(x: ShardedVector) -> ShardedVector:
        cache["hvps"] = cache.get("hvps", 0) + 1
        ph.advance()
        if cfg.hvp == "exact":
            return problem.exact_hvp(x).axpy(lam, x)
        return finite_difference_hvp(problem.parts(), grad_fn, x, eps=cfg.fd_eps,
                                     extra_diag=lam, rel_step=fd_rel_step(problem, cfg))

    stats: dict[str, float] = {}
    if auto:
        lam_min, lam_max = extreme_eigenvalues(matvec, b, iters=cfg.lanczos_steps, seed=seed)
        stats.update({"selector/lambda_min": lam_min, "selector/lambda_max": lam_max})
        delta, alpha = resolve_damping_and_alpha(lam_min, lam_max, cfg.damping,
                                                 "auto" if cfg.ihvp == "cg" else cfg.alpha)
    else:  # given: honoured as they are (a bad α shows up as a divergence error)
        delta, alpha = float(cfg.damping), cfg.alpha
    if cfg.ihvp == "cg":  # no step size
        result, delta = _cg(matvec, b, cfg, delta, stats, ph)
    else:
        result = neumann_ihvp(matvec, b, cfg.neumann_terms, float(alpha), delta,
                              tol=cfg.neumann_tol)
        stats["selector/alpha"] = float(alpha)
    stats.update({"selector/damping": delta,
                  "selector/ihvp_residual": result.residual,
                  "selector/ihvp_terms": result.terms_used, "selector/hvps": cache.get("hvps", 0),
                  # ‖(H+δI)v_k − ∇J‖/‖∇J‖ of the partial sums, from the recurrence (no HVPs)
                  "selector/ihvp_term_norms": [round(x, 6) for x in result.term_norms]})
    return result.v, stats


#: CG restarts with a larger damping after meeting negative curvature (``damping: auto``).
CG_RESTARTS = 3


def _cg(matvec, b: ShardedVector, cfg: SelectorConfig, delta: float,
        stats: dict[str, Any], ph: progress.Phase) -> tuple[IHVPResult, float]:
    """CG with ``damping: auto`` mended: Lanczos's λ_min errs inward, so H + δI can still be
    indefinite; the direction CG breaks down on is a Rayleigh quotient of H below it, which
    becomes the new λ_min estimate and damping, and CG restarts (at most CG_RESTARTS times)."""
    for restart in range(CG_RESTARTS + 1):
        try:
            result = cg_ihvp(matvec, b, cfg.cg_iters, delta, tol=cfg.cg_tol)
            stats["selector/cg_restarts"] = restart
            return result, delta
        except CGBreakdownError as exc:
            if cfg.damping != "auto" or restart == CG_RESTARTS:
                raise
            lam_min = min(stats["selector/lambda_min"], exc.rayleigh - delta)
            stats["selector/lambda_min"] = lam_min
            delta, _ = resolve_damping_and_alpha(lam_min, stats["selector/lambda_max"])
            if ph.total is not None:  # the restart's HVPs, so the bar does not pass 100 %
                ph.total = ph.done + cfg.cg_iters
    raise AssertionError("unreachable")


#: Forward passes over the N negatives that :func:`directional_scores` makes (θ ± εv).
SCORE_FORWARD_PASSES = 2


def fd_rel_step(problem: HyperProblem, cfg: SelectorConfig) -> float:
    """``selector.fd_rel_step``, its ``auto`` resolved for full parameters or adapters."""
    if cfg.fd_rel_step != "auto":
        return float(cfg.fd_rel_step)
    return FD_REL_STEP_ADAPTERS if problem.adapters_only else FD_REL_STEP


def directional_scores(problem: HyperProblem, v: ShardedVector, idx: list[int],
                       eps: float | str = "auto", terms: dict[str, torch.Tensor] | None = None,
                       rel_step: float = FD_REL_STEP, part: str = "total"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """s_i = ⟨v, ∇f_i⟩ = [f_i(θ+εv) − f_i(θ−εv)] / 2ε for all idx: two forward passes.

    ``terms``, when given, receives ``loss``: ⟨v, ∇ℓ_i⟩ from the same passes (f_i = c_f ℓ_i +
    c_m m_i, so the two terms' parts of s_i cost nothing more). ``part`` forget | mismatch:
    that term's part of s_i alone, from its own passes only (:meth:`HyperProblem.example_losses`).

    θ is restored bit-exactly from a saved copy. Also returns ℓ_i at θ for scores.jsonl, as the
    midpoint [ℓ_i(θ+εv) + ℓ_i(θ−εv)] / 2 = ℓ_i(θ) + (ε²/2)·vᵀ∇²ℓ_i v + O(ε⁴) of the same two
    passes: a third pass at θ itself cost a third of the scoring time (on SmolLM2, 2 CPU ranks,
    about 80 of round 0's 249 s of scoring) for a logged value.
    """
    params = problem.parts()
    v_norm = v.norm()
    if v_norm == 0:
        _, ell = problem.example_losses(idx, part)
        if terms is not None and part == "total":
            terms["loss"] = torch.zeros(len(idx), dtype=torch.float64)
        return torch.zeros(len(idx), dtype=torch.float64), ell
    if eps == "auto":
        step = fd_epsilon(sharded_rms([p.detach() for p in params], v.group, v.replicated,
                                      v.valid_numel), v_norm, rel_step)
    else:
        step = float(eps)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts):
                p.data.copy_(torch.add(s, q.to(p.dtype), alpha=step))
        f_plus, ell_plus = problem.example_losses(idx, part)
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts):
                p.data.copy_(torch.add(s, q.to(p.dtype), alpha=-step))
        f_minus, ell_minus = problem.example_losses(idx, part)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    ell = (ell_plus.double() + ell_minus.double()) / 2
    if terms is not None and part == "total":
        terms["loss"] = (ell_plus.double() - ell_minus.double()) / (2 * step)
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
    with progress.phase("∇J"):
        grad_j, j_value = problem.outer_grad()
    v, stats = solve_ihvp(problem, cfg, grad_j, seed=seed)
    stats["selector/J"] = j_value
    stats["selector/grad_J_norm"] = grad_j.norm()
    t1 = time.perf_counter()
    terms: dict[str, torch.Tensor] = {}
    # ranked by one term's part (score_on): only that term's forward passes (the mismatch
    # part: prompt + refusal, not the long negative); the per-example reference scores s_i
    part = cfg.score_on if cfg.score == "directional" else "total"
    with progress.phase("scores", what=f"{len(idx)} negatives"):
        if cfg.score == "directional":
            scores, ell = directional_scores(problem, v, idx, cfg.fd_eps, terms,
                                             fd_rel_step(problem, cfg), part)
        else:
            scores, ell = per_example_scores(problem, v, idx)
    bad = ~torch.isfinite(scores)
    if bad.any():
        names = [problem.ids[idx[k]] for k in bad.nonzero().flatten().tolist()]
        raise NonFiniteLossError(f"non-finite selector score for examples {names[:10]}"
                                 + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
    stats["timing/ihvp_s"] = t1 - t0
    stats["timing/score_s"] = time.perf_counter() - t1
    norms = None
    if cfg.normalize == "cosine":
        t2 = time.perf_counter()
        term = cfg.score_on  # the norm of the gradient the ranked part is taken against
        with progress.phase("gradient norms", len(idx), unit="negatives") as ph:
            norms = problem.example_grad_norms(idx, term, ph.advance)
        stats["timing/grad_norm_s"] = time.perf_counter() - t2
    return Hypergradient(list(idx), scores, ell, stats, terms.get("loss"), norms, part)


def gradient_norms(problem: HyperProblem, idx: list[int], term: str = "total",
                   advance: Callable[[], Any] | None = None) -> torch.Tensor:
    """‖∇f_i‖ (or ‖∇ℓ_i‖) for the examples idx from :meth:`HyperProblem.example_grad`: one
    backward pass each (a norm is not linear in the direction: no forward-only trick gives it)."""
    out = []
    for i in idx:
        out.append(problem.example_grad(i, term).norm())
        if advance is not None:
            advance()
    return torch.tensor(out, dtype=torch.float64)


def cosine(scores: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``scores / norms`` (‖v‖·cos(v, ∇f_i): LESS's cosine up to the common ‖v‖), 0 where the
    gradient is 0 (its score is 0 too)."""
    return torch.where(norms > 0, scores / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(scores))


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
