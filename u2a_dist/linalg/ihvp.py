"""Inverse-Hessian-vector products: the truncated Neumann series with its divergence check,
conjugate gradients, and the identity baseline (docs/design.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from u2a_dist.linalg.sharded import Matvec, ShardedVector

# ShardedVectors of state that neumann_ihvp keeps alive: the running sum, the current term and
# one temporary (the operator's output). Memory per rank: NEUMANN_STATE_VECTORS * 4 bytes * P / W.
NEUMANN_STATE_VECTORS = 3
# cg_ihvp's: the iterate, the residual, the search direction and the operator's output.
CG_STATE_VECTORS = 4


# --------------------------------------------------------------------------------------------
# inverse-Hessian-vector products
# --------------------------------------------------------------------------------------------


class NeumannDivergenceError(RuntimeError):
    """The Neumann series for ``(H + damping I)^-1 b`` diverged (or went non-finite)."""

    def __init__(
        self, alpha: float, damping: float, term_index: int, growth: float, limit: float
    ) -> None:
        self.alpha, self.damping = alpha, damping
        self.term_index, self.growth, self.limit = term_index, growth, limit
        if math.isfinite(growth):
            what = (
                f"||(I - alpha(H + damping I))^k b|| / ||b|| reached {growth:.4g} at term "
                f"k={term_index} (limit {limit:.4g})"
            )
        else:
            what = (
                f"the series became non-finite ({growth}) at term k={term_index} "
                "(the Hessian-vector product returned inf/NaN, or the terms overflowed)"
            )
        super().__init__(
            f"Neumann series diverged: {what}, with alpha={alpha:.6g}, damping={damping:.6g}. "
            "It converges only when H + damping*I is positive definite and "
            "alpha < 2/lambda_max(H + damping*I): lower selector.alpha or raise "
            "selector.damping (or set both to 'auto')."
        )


@dataclass
class IHVPResult:
    """Output of :func:`neumann_ihvp`.

    ``v``: the estimate of ``(H + damping I)^-1 b``. ``residual``: ``||(H + damping I) v - b|| /
    ||b||`` from one extra matvec (NaN when not computed). ``terms_used``: terms summed (K or
    fewer after an early stop). ``term_norms[k] = ||(I - alpha(H + damping I))^k b|| / ||b||``,
    the size of term k relative to the first: in exact arithmetic it is also the relative
    residual of the partial sum of the first k terms, so a tolerance on it is a tolerance on the
    residual. ``state_vectors``: ShardedVectors held while iterating.
    """

    v: ShardedVector
    residual: float
    terms_used: int
    term_norms: list[float] = field(default_factory=list)
    state_vectors: int = NEUMANN_STATE_VECTORS


def _rhs_norm(name: str, b: ShardedVector, damping: float) -> float:
    """``||b||``, after the checks both solvers make on damping and b."""
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    b_norm = b.norm()
    if not math.isfinite(b_norm):
        raise ValueError(f"{name}: the right-hand side b has non-finite entries")
    return b_norm


def _damped(matvec: Matvec, damping: float) -> Matvec:
    """x -> (H + damping I) x, the damping added exactly."""
    def apply_a(x: ShardedVector) -> ShardedVector:
        w = matvec(x)
        if damping:
            w.axpy(damping, x)
        return w

    return apply_a


def neumann_ihvp(
    matvec: Matvec,
    b: ShardedVector,
    terms: int,
    alpha: float,
    damping: float,
    tol: float = 0.0,
    divergence_factor: float = 1e3,
    compute_residual: bool = True,
) -> IHVPResult:
    """``v ~ (H + damping I)^-1 b`` by the truncated Neumann series (docs/design.md §2).

    ``v = alpha * sum_{k<K} (I - alpha A)^k b`` with ``A = H + damping I`` and ``matvec(x) = H x``
    (damping is added here, exactly). Recurrence: ``t_0 = alpha b``, ``t_k = t_{k-1} - alpha A
    t_{k-1}``, ``v = sum_k t_k``: K-1 matvecs, plus one for the residual. State: the running sum
    ``v``, the current term ``t`` and the operator's output ``w`` -- three ShardedVectors
    (:data:`NEUMANN_STATE_VECTORS`), i.e. ``3 x 4 bytes x P / W`` per rank, besides ``b`` (the
    caller's) and whatever the matvec itself allocates.

    Stops early when the relative term norm ``term_norms[k]`` falls to ``tol`` or below (the
    term is still added). Raises :class:`NeumannDivergenceError` when a term norm exceeds
    ``divergence_factor`` (relative to ``||b||``) or is non-finite, naming alpha, damping, the
    term and the growth. Slow divergence (an eigenvalue of ``I - alpha A`` just outside [-1, 1])
    may not reach the factor within K terms: it shows as a residual above 1, which the caller
    should report. All decisions use all-reduced norms, so every rank stops at the same term.
    """
    if terms < 1:
        raise ValueError(f"neumann_ihvp needs terms >= 1, got {terms}")
    alpha, damping = float(alpha), float(damping)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    b_norm = _rhs_norm("neumann_ihvp", b, damping)
    if b_norm == 0.0:
        return IHVPResult(ShardedVector.zeros_like(b), 0.0, 0, [])
    apply_a = _damped(matvec, damping)

    t = b.clone().scale_(alpha)
    v = t.clone()
    term_norms = [1.0]
    used = 1
    for k in range(1, terms if tol < 1.0 else 1):
        w = apply_a(t)
        t.axpy(-alpha, w)
        del w
        rel = t.norm() / (alpha * b_norm)
        if not math.isfinite(rel) or rel > divergence_factor:
            raise NeumannDivergenceError(alpha, damping, k, rel, divergence_factor)
        term_norms.append(rel)
        v.add_(t)
        used = k + 1
        if rel <= tol:
            break
    del t
    residual = math.nan
    if compute_residual:
        w = apply_a(v)
        w.sub_(b)
        residual = w.norm() / b_norm
        del w
        if not math.isfinite(residual):
            raise NeumannDivergenceError(alpha, damping, used, residual, divergence_factor)
    return IHVPResult(v, residual, used, term_norms)


class CGBreakdownError(RuntimeError):
    """Conjugate gradients met a direction of non-positive curvature: H + damping I is not
    positive definite (or the Hessian-vector products are too noisy to tell)."""

    def __init__(self, damping: float, iteration: int, curvature: float,
                 rayleigh: float = math.nan) -> None:
        self.damping, self.iteration, self.curvature = damping, iteration, curvature
        #: p^T (H + damping I) p / p^T p of the direction found: rayleigh - damping is a
        #: Rayleigh quotient of H, so an upper bound on its smallest eigenvalue
        self.rayleigh = rayleigh
        super().__init__(
            f"conjugate gradients broke down at iteration {iteration}: p^T (H + damping I) p = "
            f"{curvature:.4g} <= 0 with damping={damping:.6g}, so H + damping I is not positive "
            "definite; raise selector.damping (with damping 'auto': more selector.lanczos_steps)."
        )


def cg_ihvp(
    matvec: Matvec,
    b: ShardedVector,
    iters: int,
    damping: float,
    tol: float = 0.0,
    compute_residual: bool = True,
) -> IHVPResult:
    """``v ~ (H + damping I)^-1 b`` by conjugate gradients from ``v = 0``, at most ``iters``
    matvecs (plus one for the residual).

    Neumann's error falls like ``(1 - 1/kappa)^K``, CG's like ``((sqrt(kappa) - 1) /
    (sqrt(kappa) + 1))^K`` (and faster on a clustered spectrum), with no step size to choose;
    it needs H + damping I positive definite as Neumann does, and raises
    :class:`CGBreakdownError` on a direction of non-positive curvature instead of diverging.
    ``term_norms[k]``: the recurrence's relative residual ``||r_k|| / ||b||`` after k
    iterations; it stops when that falls to ``tol``. State: :data:`CG_STATE_VECTORS`
    ShardedVectors. Every decision uses all-reduced inner products: every rank stops alike.
    """
    if iters < 1:
        raise ValueError(f"cg_ihvp needs iters >= 1, got {iters}")
    damping = float(damping)
    b_norm = _rhs_norm("cg_ihvp", b, damping)
    if b_norm == 0.0:
        return IHVPResult(ShardedVector.zeros_like(b), 0.0, 0, [], CG_STATE_VECTORS)
    apply_a = _damped(matvec, damping)

    v = ShardedVector.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = b_norm * b_norm
    term_norms = [1.0]
    used = 0
    for k in range(1, iters + 1):
        w = apply_a(p)
        curvature = p.dot(w)
        if not (curvature > 0 and math.isfinite(curvature)):
            p_norm = p.norm()
            raise CGBreakdownError(damping, k, curvature, curvature / (p_norm * p_norm))
        step = rr / curvature
        v.axpy(step, p)
        r.axpy(-step, w)
        del w
        rr_new = r.dot(r)
        rel = math.sqrt(rr_new) / b_norm
        term_norms.append(rel)
        used = k
        if rel <= tol or k == iters:
            break
        p.scale_(rr_new / rr).add_(r)
        rr = rr_new
    del r, p
    residual = math.nan
    if compute_residual:
        w = apply_a(v)
        w.sub_(b)
        residual = w.norm() / b_norm
        del w
    return IHVPResult(v, residual, used, term_norms, CG_STATE_VECTORS)


def identity_ihvp(b: ShardedVector, gamma: float) -> ShardedVector:
    """``b / gamma``: the paper's public-code baseline (H taken as gamma*I); never the default."""
    gamma = float(gamma)
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"identity iHVP needs gamma > 0, got {gamma}")
    return b.clone().scale_(1.0 / gamma)
