"""Spectrum estimates of a symmetric operator (power iteration, Lanczos) and the damping and
Neumann step they set (docs/design.md §2)."""

from __future__ import annotations

import math
import warnings

import torch

from u2a_dist.linalg.sharded import Matvec, ShardedVector

# Default damping margin of resolve_damping_and_alpha, relative to the spectral radius of H.
DEFAULT_DAMPING_MARGIN = 1e-2


# --------------------------------------------------------------------------------------------
# spectrum estimates
# --------------------------------------------------------------------------------------------


def _finite_or_raise(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise FloatingPointError(
            f"{what} is {x}: the Hessian-vector product returned non-finite values"
        )
    return x


def power_iteration(
    matvec: Matvec,
    like: ShardedVector,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, ShardedVector]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its (unit) eigenvector.

    Iterates ``x <- A x / ||A x||`` from a random start (:meth:`ShardedVector.random_like` with
    ``seed``) and reports the Rayleigh quotient ``x^T A x``, signed; stops when it changes by
    less than ``tol`` relative to its magnitude, or after ``iters`` steps. Cost: at most
    ``iters`` matvecs (2 gradient passes each with the FD HVP) and 2 all-reduces per step;
    memory: 2 vectors. Convergence rate: ``(|lambda_2| / |lambda_1|)^2`` per step for the
    eigenvalue; when the two ends of an indefinite spectrum have nearly equal magnitude the
    iterate mixes them and the estimate lies between; :func:`lanczos_extreme_eigenvalues` has
    no such failure.
    """
    if iters < 1:
        raise ValueError(f"power_iteration needs iters >= 1, got {iters}")
    x = ShardedVector.random_like(like, seed)
    x.scale_(1.0 / x.norm())
    rq = 0.0
    prev: float | None = None
    for _ in range(iters):
        y = matvec(x)
        rq = _finite_or_raise(x.dot(y), "power iteration: Rayleigh quotient")
        ynorm = _finite_or_raise(y.norm(), "power iteration: ||A x||")
        if ynorm == 0.0:
            return 0.0, x
        x = y.scale_(1.0 / ynorm)
        if prev is not None and abs(rq - prev) <= tol * abs(rq):
            break
        prev = rq
    return rq, x


class _Shifted:
    """``x -> A x - sigma x`` for a black-box ``A``."""

    def __init__(self, matvec: Matvec, sigma: float) -> None:
        self.matvec, self.sigma = matvec, sigma

    def __call__(self, x: ShardedVector) -> ShardedVector:
        return self.matvec(x).axpy(-self.sigma, x)


def lanczos_extreme_eigenvalues(
    matvec: Matvec,
    like: ShardedVector,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, float]:
    """Both ends ``(lambda_min, lambda_max)`` of a symmetric operator's spectrum by Lanczos.

    Plain Lanczos without reorthogonalisation (3 vectors of memory): loss of orthogonality only
    creates duplicate copies of converged Ritz values, which do not move the extreme ones, and
    the extreme Ritz values converge at the Chebyshev (Kaniel-Paige) rate, far faster than power
    iteration, from ONE run for both ends. Ritz values are always inside the spectrum, so both
    estimates err inward. Stops when both extreme Ritz values change by less than ``tol`` times
    the spectral-radius estimate, on an invariant subspace, or after ``iters`` matvecs.
    Cost: at most ``iters`` matvecs and 2 all-reduces per step.
    """
    if iters < 1:
        raise ValueError(f"lanczos needs iters >= 1, got {iters}")
    q = ShardedVector.random_like(like, seed)
    q.scale_(1.0 / q.norm())
    q_prev: ShardedVector | None = None
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    lo = hi = 0.0
    prev: tuple[float, float] | None = None
    for j in range(iters):
        w = matvec(q)
        a = _finite_or_raise(q.dot(w), "Lanczos: q^T A q")
        w.axpy(-a, q)
        if q_prev is not None:
            w.axpy(-beta, q_prev)
        alphas.append(a)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        ritz = torch.linalg.eigvalsh(t)
        lo, hi = float(ritz[0]), float(ritz[-1])
        beta = _finite_or_raise(w.norm(), "Lanczos: beta")
        scale = max(abs(lo), abs(hi))
        if beta <= 1e-10 * max(scale, 1e-30):
            break  # invariant subspace: the Ritz values are exact eigenvalues
        if prev is not None and max(abs(lo - prev[0]), abs(hi - prev[1])) <= tol * scale:
            break
        prev = (lo, hi)
        if j + 1 < iters:
            betas.append(beta)
            q_prev, q = q, w.scale_(1.0 / beta)
        del w
    return lo, hi


def extreme_eigenvalues(
    matvec: Matvec,
    like: ShardedVector,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "lanczos",
) -> tuple[float, float]:
    """``(lambda_min, lambda_max)`` of an indefinite symmetric operator (e.g. H of a GA loss).

    ``method="power"``: power iteration gives the eigenvalue of largest magnitude lambda_1;
    a second power iteration on ``A - lambda_1 I`` (whose spectrum lies on one side of zero when
    lambda_1 is an end) gives ``mu`` and the other end ``lambda_1 + mu``. Cost: at most
    ``2*iters`` matvecs. Slow when the ends have small gaps, and it mixes the two ends when they
    have equal magnitude.

    ``method="lanczos"`` (default): :func:`lanczos_extreme_eigenvalues`, both ends from one run
    of at most ``iters`` matvecs, and much more accurate for the same cost (measured in
    tests/test_linalg.py).
    Both methods err inward (estimates inside the true spectrum): the damping margin of
    :func:`resolve_damping_and_alpha` is what covers that.
    """
    if method == "lanczos":
        return lanczos_extreme_eigenvalues(matvec, like, iters=iters, tol=tol, seed=seed)
    if method != "power":
        raise ValueError(
            f"extreme_eigenvalues: method must be 'lanczos' or 'power', got {method!r}"
        )
    lam1, _ = power_iteration(matvec, like, iters=iters, tol=tol, seed=seed)
    if lam1 == 0.0:
        return 0.0, 0.0
    mu, _ = power_iteration(_Shifted(matvec, lam1), like, iters=iters, tol=tol, seed=seed + 1)
    other = lam1 + mu
    return (min(lam1, other), max(lam1, other))


def resolve_damping_and_alpha(
    lam_min: float,
    lam_max: float,
    damping: float | str = "auto",
    alpha: float | str = "auto",
    margin: float = DEFAULT_DAMPING_MARGIN,
) -> tuple[float, float]:
    """Damping ``delta`` and Neumann step ``alpha`` from the ends of the spectrum of H (§2).

    ``damping="auto"``: ``delta = max(0, -lam_min) + margin * rho`` with
    ``rho = max(|lam_min|, |lam_max|)`` the spectral radius. The margin is relative to rho (not
    absolute) because the eigenvalue estimates err inward by an amount that scales with rho, and
    because it bounds the condition number whatever the spectrum looks like:
    ``kappa(H + delta I) <= 1 + 2/margin`` (201 for the default 1e-2), so the Neumann series
    contracts by at least ``1 - 1/kappa`` per term on every eigendirection.
    ``alpha="auto"``: ``alpha = 1 / lambda_max(H + delta I) = 1 / (lam_max + delta)``.

    Given values are honoured as they are, even when they make the series diverge (tests need
    to provoke divergence; :func:`neumann_ihvp` detects it at run time); a warning says so when
    ``H + delta I`` is not positive definite or ``alpha >= 2 / lambda_max(H + delta I)``.
    """
    lam_min, lam_max = float(lam_min), float(lam_max)
    if not (math.isfinite(lam_min) and math.isfinite(lam_max)):
        raise ValueError(f"non-finite eigenvalue estimates: lam_min={lam_min}, lam_max={lam_max}")
    if lam_min > lam_max:
        raise ValueError(f"lam_min={lam_min:.6g} > lam_max={lam_max:.6g}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"damping margin must be finite and >= 0, got {margin}")
    rho = max(abs(lam_min), abs(lam_max))
    if damping == "auto":
        if rho == 0.0:
            raise ValueError(
                "the Hessian estimate is zero (lam_min = lam_max = 0): there is no curvature "
                "scale to set the damping from; give selector.damping explicitly"
            )
        delta = max(0.0, -lam_min) + margin * rho
    elif isinstance(damping, str):
        raise ValueError(f"damping must be a float >= 0 or 'auto', got {damping!r}")
    else:
        delta = float(damping)
        if not (delta >= 0 and math.isfinite(delta)):
            raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
    top = lam_max + delta
    if lam_min + delta <= 0:
        warnings.warn(
            f"damping={delta:.6g} leaves H + damping*I indefinite (lambda_min(H) ~ {lam_min:.6g}): "
            "the Neumann series will diverge along the negative directions; raise "
            "selector.damping or use 'auto'",
            RuntimeWarning,
            stacklevel=2,
        )
    if alpha == "auto":
        if top <= 0:
            raise ValueError(
                f"lambda_max(H + damping*I) = {top:.6g} <= 0: no positive step alpha exists; "
                "raise selector.damping"
            )
        step = 1.0 / top
    elif isinstance(alpha, str):
        raise ValueError(f"alpha must be a positive float or 'auto', got {alpha!r}")
    else:
        step = float(alpha)
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(f"alpha must be finite and > 0, got {alpha!r}")
        if top > 0 and step >= 2.0 / top:
            warnings.warn(
                f"alpha={step:.6g} >= 2/lambda_max(H + damping*I) = {2.0 / top:.6g}: the Neumann "
                "series will diverge; lower selector.alpha or use 'auto'",
                RuntimeWarning,
                stacklevel=2,
            )
    return delta, step
