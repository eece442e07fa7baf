"""Linear algebra of the U2A selector, on ZeRO-3 partitions (docs/design.md §2-3).

Everything here works on *local parts*: a list of fp32 tensors, one per parameter. On a ZeRO-3
rank the parts have the layout of each parameter's local partition ``p.ds_tensor`` (a flat slice
of ``ceil(numel / W)`` elements, the zero padding at the tail of the last partitions included);
on a single unpartitioned process they have the shapes of the parameters themselves. Inner
products are computed locally in float64 and then summed over the process group with ONE
``all_reduce`` per inner product, so that every rank sees the same value and every decision taken
from it (step sizes, stopping, divergence) is identical on every rank: a rank that decided
differently would deadlock the next collective.

Nothing in this package imports DeepSpeed: the engine plugs ZeRO-3 in through callables
(``grad_fn`` for the finite-difference HVP, ``matvec`` for power iteration and Neumann), which is
what lets the tests run the same code on one process and on real 2-process gloo groups.

Modules: ``sharded`` (:class:`ShardedVector`, the sharded reductions), ``hvp`` (finite-difference
and exact HVPs, the finite-difference step), ``spectrum`` (power iteration, Lanczos, damping and
step), ``ihvp`` (Neumann series, conjugate gradients, identity baseline). Every public name is
importable from ``u2a_dist.linalg`` itself.
"""

from __future__ import annotations

from u2a_dist.linalg.hvp import (
    FD_REL_STEP,
    FD_REL_STEP_ADAPTERS,
    FD_RMS_FLOOR,
    exact_hvp,
    fd_epsilon,
    finite_difference_hvp,
    trainable_parameters,
)
from u2a_dist.linalg.ihvp import (
    CG_STATE_VECTORS,
    NEUMANN_STATE_VECTORS,
    CGBreakdownError,
    IHVPResult,
    NeumannDivergenceError,
    cg_ihvp,
    identity_ihvp,
    neumann_ihvp,
)
from u2a_dist.linalg.sharded import ShardedVector, sharded_rms
from u2a_dist.linalg.spectrum import (
    DEFAULT_DAMPING_MARGIN,
    extreme_eigenvalues,
    lanczos_extreme_eigenvalues,
    power_iteration,
    resolve_damping_and_alpha,
)

__all__ = [
    "CG_STATE_VECTORS",
    "CGBreakdownError",
    "DEFAULT_DAMPING_MARGIN",
    "FD_REL_STEP",
    "FD_REL_STEP_ADAPTERS",
    "FD_RMS_FLOOR",
    "NEUMANN_STATE_VECTORS",
    "IHVPResult",
    "NeumannDivergenceError",
    "ShardedVector",
    "cg_ihvp",
    "exact_hvp",
    "extreme_eigenvalues",
    "fd_epsilon",
    "finite_difference_hvp",
    "identity_ihvp",
    "lanczos_extreme_eigenvalues",
    "neumann_ihvp",
    "power_iteration",
    "resolve_damping_and_alpha",
    "sharded_rms",
    "trainable_parameters",
]
