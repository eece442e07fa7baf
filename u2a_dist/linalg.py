"""Linear algebra of the U2A selector, on ZeRO-3 partitions (docs/design.md §2-3).

Everything here works on *local parts*: a list of fp32 tensors, one per parameter. On a ZeRO-3
rank the parts have the layout of each parameter's local partition ``p.ds_tensor`` (a flat slice
of ``ceil(numel / W)`` elements, the zero padding at the tail of the last partitions included);
on a single unpartitioned process they have the shapes of the parameters themselves. Inner
products are computed locally in float64 and then summed over the process group with ONE
``all_reduce`` per inner product, so that every rank sees the same value and every decision taken
from it (step sizes, stopping, divergence) is identical on every rank: a rank that decided
differently would deadlock the next collective.

Nothing in this module imports DeepSpeed: the engine plugs ZeRO-3 in through callables
(``grad_fn`` for the finite-difference HVP, ``matvec`` for power iteration and Neumann), which is
what lets the tests run the same code on one process and on real 2-process gloo groups.

Padding: every operation of :class:`ShardedVector` maps zeros to zeros elementwise (``axpy``,
``scale_``, ``add_``, ``sub_``, products by finite scalars), so padding that is zero in every input
stays zero. Vectors that know their layout (``valid_numel``) can also re-zero it explicitly with
:meth:`ShardedVector.zero_padding_`; :meth:`ShardedVector.random_like` and
:func:`finite_difference_hvp` do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DEFAULT_DAMPING_MARGIN",
    "FD_REL_STEP",
    "FD_RMS_FLOOR",
    "NEUMANN_STATE_VECTORS",
    "IHVPResult",
    "NeumannDivergenceError",
    "ShardedVector",
    "exact_hvp",
    "extreme_eigenvalues",
    "fd_epsilon",
    "finite_difference_hvp",
    "identity_ihvp",
    "lanczos_extreme_eigenvalues",
    "neumann_ihvp",
    "power_iteration",
    "resolve_damping_and_alpha",
    "sharded_norm",
    "sharded_rms",
    "trainable_parameters",
]

Matvec = Callable[["ShardedVector"], "ShardedVector"]

# Elements converted to float64 at a time by the local reductions: bounds the temporary memory
# of a dot product to 2 x 8 MiB whatever the size of a partition.
_CHUNK = 1 << 20

# Relative step of the automatic finite-difference epsilon: the perturbation eps*v has norm
# FD_REL_STEP * rms(theta), rms(theta) = ||theta|| / sqrt(P) (see fd_epsilon for why the RMS and
# not ||theta||). Measured: relative 2-norm error of the fp32 central difference against an exact
# reference, by the norm of the perturbation ||eps*v|| (a) and the resulting rel_step (a / rms):
# - HVP, 1-layer GPT-2 (P = 4080, rms 0.11), vs the float64 double-backward HVP, for a random
#   direction / for grad J:  a = 7e-2: 1.1e-2 / 2.2e-1;  2.1e-2: 1.0e-3 / 2.6e-2;
#   7e-3: 1.1e-4 / 3.0e-3;  2.1e-3: 4.4e-5 / 2.7e-4;  7e-4: 1.4e-4 / 4.4e-5.
# - directional scores <v, grad f_i> of 12 real negatives, SmolLM2-135M (P = 1.3e8, rms 0.18,
#   v = grad J), vs per-example backward passes:  a = 0.64: 0.42;  0.21: 0.11;  6.4e-2: 1.7e-2;
#   2.1e-2: 2.2e-3;  6.4e-3: 2.6e-4;  2.1e-3: 2.2e-4.
# Truncation (~a^2) dominates above a ~ 5e-3 and fp32 rounding (~1/a) below ~1e-3 in both, so
# a ~ 2-4e-3 fits both models: rel_step 2e-2 of an RMS of 0.1-0.2.
FD_REL_STEP = 2e-2

# Smallest parameter RMS the automatic step is scaled by (a model with near-zero weights).
FD_RMS_FLOOR = 1e-2

# Default damping margin of resolve_damping_and_alpha, relative to the spectral radius of H.
DEFAULT_DAMPING_MARGIN = 1e-2

# ShardedVectors of state that neumann_ihvp keeps alive: the running sum, the current term and
# one temporary (the operator's output). Memory per rank: NEUMANN_STATE_VECTORS * 4 bytes * P / W.
NEUMANN_STATE_VECTORS = 3


# --------------------------------------------------------------------------------------------
# process-group helpers
# --------------------------------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world(group: Any) -> int:
    return dist.get_world_size(group) if _dist_on() else 1


def _rank(group: Any) -> int:
    return dist.get_rank(group) if _dist_on() else 0


def _all_reduce_sum(local: Tensor, group: Any) -> Tensor:
    """Sum a small float64 tensor over ``group`` (no-op on one process). One collective."""
    if _dist_on() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "gloo" and local.device.type != "cpu":
            cpu = local.cpu()
            dist.all_reduce(cpu, op=dist.ReduceOp.SUM, group=group)
            return cpu
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    return local


def _local_dot(a: Tensor, b: Tensor) -> Tensor:
    """Float64 dot of two same-shaped tensors of any float dtype, chunked to bound memory."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, fa.numel(), _CHUNK):
        ca = fa[start : start + _CHUNK].to(torch.float64)
        cb = ca if b is a else fb[start : start + _CHUNK].to(torch.float64)
        acc += torch.dot(ca, cb)
    return acc


def _partial_dot(
    xs: Sequence[Tensor], ys: Sequence[Tensor], replicated: Sequence[bool] | None, group: Any
) -> Tensor:
    """This rank's share of sum_i <xs_i, ys_i>: replicated parts count on group rank 0 only."""
    device = xs[0].device if len(xs) else torch.device("cpu")
    acc = torch.zeros((), dtype=torch.float64, device=device)
    first = _rank(group) == 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if replicated is not None and replicated[i] and not first:
            continue
        acc += _local_dot(x, y)
    return acc


def sharded_norm(
    tensors: Sequence[Tensor], group: Any = None, replicated: Sequence[bool] | None = None
) -> float:
    """Global 2-norm of local parts of any float dtype (e.g. the parameter partitions).

    Same reduction as :meth:`ShardedVector.norm` (float64, one all-reduce) for tensors that are
    not wrapped, so that the finite-difference epsilon is bit-identical on every rank.
    """
    local = _partial_dot(tensors, tensors, replicated, group)
    return math.sqrt(float(_all_reduce_sum(local, group).item()))


def sharded_rms(
    tensors: Sequence[Tensor],
    group: Any = None,
    replicated: Sequence[bool] | None = None,
    valid_numel: Sequence[int] | None = None,
) -> float:
    """Root mean square of the entries of local parts over the group (ZeRO-3 padding excluded
    when ``valid_numel`` is given). One all-reduce; bit-identical on every rank."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    first = _rank(group) == 0
    count = 0
    for i, t in enumerate(tensors):
        if replicated is not None and replicated[i] and not first:
            continue
        count += t.numel() if valid_numel is None else int(valid_numel[i])
    both = torch.stack([_partial_dot(tensors, tensors, replicated, group),
                        torch.tensor(float(count), dtype=torch.float64, device=device)])
    sq, n = _all_reduce_sum(both, group).tolist()
    return math.sqrt(sq / n) if n > 0 else 0.0


# --------------------------------------------------------------------------------------------
# ShardedVector
# --------------------------------------------------------------------------------------------


class ShardedVector:
    """A vector in parameter space, stored as this rank's fp32 local parts.

    ``parts[i]`` has the shape of parameter ``i``'s local partition (the parameter itself when
    nothing is partitioned). ``group`` is the ``torch.distributed`` process group the vector is
    sharded over (None: the default group, or a single process when torch.distributed is not
    initialised).

    Optional layout, shared by every vector derived from this one:

    - ``valid_numel[i]``: the number of leading real elements of ``parts[i].reshape(-1)``; the
      rest is ZeRO-3 padding: ``clamp(p.ds_numel - rank * n, 0, n)`` with
      ``n = p.ds_tensor.numel()``.
      Used by :meth:`zero_padding_` and :meth:`random_like`; None means no padding.
    - ``replicated[i]``: part ``i`` is a full copy held identically by every rank (a ZeRO-3
      parameter below ``stage3_param_persistence_threshold``). Inner products count it once (on
      group rank 0) instead of W times, and :meth:`random_like` draws it identically on all ranks.

    In-place methods (``axpy``, ``scale_``, ``add_``, ``sub_``, ``copy_``, ``zero_``) return
    ``self`` and allocate nothing; the operators ``+ - *`` allocate a new vector. Memory-bounded
    code (the Neumann iteration) uses the in-place forms only.
    """

    __slots__ = ("__weakref__", "group", "parts", "replicated", "valid_numel")

    def __init__(
        self,
        parts: Sequence[Tensor],
        group: Any = None,
        valid_numel: Sequence[int] | None = None,
        replicated: Sequence[bool] | None = None,
    ) -> None:
        parts = list(parts)
        for i, p in enumerate(parts):
            if not isinstance(p, Tensor):
                raise TypeError(f"ShardedVector part {i} is a {type(p).__name__}, not a Tensor")
            if p.dtype != torch.float32:
                raise TypeError(
                    f"ShardedVector part {i} has dtype {p.dtype}; the selector's linear algebra "
                    "runs in fp32 (use ShardedVector.from_tensors to convert)"
                )
        n = len(parts)
        if valid_numel is not None:
            valid_numel = tuple(int(k) for k in valid_numel)
            if len(valid_numel) != n:
                raise ValueError(f"valid_numel has {len(valid_numel)} entries for {n} parts")
            for i, (k, p) in enumerate(zip(valid_numel, parts, strict=True)):
                if not 0 <= k <= p.numel():
                    raise ValueError(f"valid_numel[{i}]={k} outside [0, {p.numel()}]")
        if replicated is not None:
            replicated = tuple(bool(r) for r in replicated)
            if len(replicated) != n:
                raise ValueError(f"replicated has {len(replicated)} entries for {n} parts")
        self.parts: list[Tensor] = parts
        self.group = group
        self.valid_numel: tuple[int, ...] | None = valid_numel
        self.replicated: tuple[bool, ...] | None = replicated

    # ---- construction ------------------------------------------------------------------------

    def _new(self, parts: list[Tensor]) -> ShardedVector:
        out = ShardedVector.__new__(ShardedVector)
        out.parts = parts
        out.group = self.group
        out.valid_numel = self.valid_numel
        out.replicated = self.replicated
        return out

    @classmethod
    def from_tensors(
        cls,
        tensors: Sequence[Tensor],
        group: Any = None,
        valid_numel: Sequence[int] | None = None,
        replicated: Sequence[bool] | None = None,
    ) -> ShardedVector:
        """Detached fp32 copies of ``tensors`` (never aliases them)."""
        parts = [t.detach().to(torch.float32, copy=True) for t in tensors]
        return cls(parts, group=group, valid_numel=valid_numel, replicated=replicated)

    @classmethod
    def zeros_like(cls, other: ShardedVector) -> ShardedVector:
        """A zero vector with ``other``'s shapes, devices, group and layout."""
        return other._new([torch.zeros_like(p) for p in other.parts])

    @classmethod
    def random_like(
        cls, other: ShardedVector, generator: torch.Generator | int = 0
    ) -> ShardedVector:
        """A standard-normal vector with ``other``'s layout, padding zeroed.

        ``generator`` an int (a seed): deterministic given the seed, the group rank and the
        world size. Partitioned parts are drawn from a per-rank stream (``seed`` mixed with the
        rank) so that ranks hold independent pieces; replicated parts are drawn from a stream
        that depends on the seed only, so they are identical on every rank, as they must be. The
        vector is NOT invariant to the number of ranks: 1 and 2 ranks give different (equally
        valid) random vectors. ``generator`` a ``torch.Generator``: used for every part as is;
        replicated parts are then consistent only if its state is the same on every rank.
        Values are drawn on the CPU and then moved, so they do not depend on the device.
        """
        if isinstance(generator, torch.Generator):
            local_gen = shared_gen = generator
        else:
            seed = int(generator)
            shared_gen = torch.Generator().manual_seed(seed)
            rank = _rank(other.group)
            local_gen = torch.Generator().manual_seed(
                (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63
            )
        parts = []
        for i, p in enumerate(other.parts):
            rep = other.replicated is not None and other.replicated[i]
            g = shared_gen if rep else local_gen
            parts.append(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device))
        return other._new(parts).zero_padding_()

    def clone(self) -> ShardedVector:
        return self._new([p.clone() for p in self.parts])

    # ---- in-place algebra --------------------------------------------------------------------

    def _check(self, other: ShardedVector) -> None:
        if len(other.parts) != len(self.parts):
            raise ValueError(f"vectors have {len(self.parts)} and {len(other.parts)} parts")
        for i, (a, b) in enumerate(zip(self.parts, other.parts, strict=True)):
            if a.shape != b.shape:
                raise ValueError(f"part {i}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")

    def axpy(self, a: float, x: ShardedVector) -> ShardedVector:
        """self += a * x, in place."""
        self._check(x)
        a = float(a)
        for p, q in zip(self.parts, x.parts, strict=True):
            p.add_(q, alpha=a)
        return self

    def add_(self, x: ShardedVector, alpha: float = 1.0) -> ShardedVector:
        """self += alpha * x, in place."""
        return self.axpy(alpha, x)

    def sub_(self, x: ShardedVector) -> ShardedVector:
        """self -= x, in place."""
        return self.axpy(-1.0, x)

    def scale_(self, a: float) -> ShardedVector:
        """self *= a, in place."""
        a = float(a)
        for p in self.parts:
            p.mul_(a)
        return self

    def copy_(self, x: ShardedVector) -> ShardedVector:
        """self = x (values), in place."""
        self._check(x)
        for p, q in zip(self.parts, x.parts, strict=True):
            p.copy_(q)
        return self

    def zero_(self) -> ShardedVector:
        for p in self.parts:
            p.zero_()
        return self

    def zero_padding_(self) -> ShardedVector:
        """Set the ZeRO-3 padding (elements past ``valid_numel``) to zero; no-op without layout."""
        if self.valid_numel is not None:
            for p, k in zip(self.parts, self.valid_numel, strict=True):
                if k < p.numel():
                    p.view(-1)[k:].zero_()
        return self

    # ---- allocating operators ----------------------------------------------------------------

    def __add__(self, x: ShardedVector) -> ShardedVector:
        return self.clone().axpy(1.0, x)

    def __sub__(self, x: ShardedVector) -> ShardedVector:
        return self.clone().axpy(-1.0, x)

    def __mul__(self, a: float) -> ShardedVector:
        return self.clone().scale_(a)

    __rmul__ = __mul__

    def __truediv__(self, a: float) -> ShardedVector:
        return self.clone().scale_(1.0 / float(a))

    def __neg__(self) -> ShardedVector:
        return self.clone().scale_(-1.0)

    # ---- reductions (one all_reduce each) ----------------------------------------------------

    def dot(self, other: ShardedVector) -> float:
        """Global inner product: float64 local sum over all parts, then one all_reduce(SUM)."""
        self._check(other)
        local = _partial_dot(self.parts, other.parts, self.replicated, self.group)
        return float(_all_reduce_sum(local, self.group).item())

    def norm(self) -> float:
        """Global 2-norm (one all_reduce). NaN/inf anywhere on any rank gives NaN/inf everywhere."""
        local = _partial_dot(self.parts, self.parts, self.replicated, self.group)
        return math.sqrt(float(_all_reduce_sum(local, self.group).item()))

    # ---- bookkeeping -------------------------------------------------------------------------

    def numel_local(self) -> int:
        """Elements held on this rank (padding included): about P / W on a ZeRO-3 rank."""
        return sum(p.numel() for p in self.parts)

    def nbytes_local(self) -> int:
        """Bytes held on this rank: 4 * numel_local()."""
        return sum(p.numel() * p.element_size() for p in self.parts)

    def to_flat(self) -> Tensor:
        """The local parts flattened and concatenated (a copy; for tests and debugging)."""
        if not self.parts:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat([p.reshape(-1) for p in self.parts])

    def copy_to(self, tensors: Sequence[Tensor]) -> None:
        """Write the values into ``tensors`` (same shapes; cast to their dtype), e.g. ``p.data``."""
        if len(tensors) != len(self.parts):
            raise ValueError(f"{len(tensors)} tensors for {len(self.parts)} parts")
        with torch.no_grad():
            for t, p in zip(tensors, self.parts, strict=True):
                if t.shape != p.shape:
                    raise ValueError(f"shape {tuple(t.shape)} != part shape {tuple(p.shape)}")
                t.copy_(p)

    def __len__(self) -> int:
        return len(self.parts)

    def __repr__(self) -> str:
        return (
            f"ShardedVector(parts={len(self.parts)}, numel_local={self.numel_local()}, "
            f"world={_world(self.group)})"
        )


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters HVPs are taken over, in the order vectors are laid out: requires_grad only."""
    return [p for p in model.parameters() if p.requires_grad]


def fd_epsilon(theta_rms: float, v_norm: float, rel_step: float = FD_REL_STEP) -> float:
    """Automatic central-difference step: ``eps = rel_step * max(rms(theta), floor) / ||v||``.

    Only the perturbation ``eps*v`` matters (the HVP is linear in v), and its size must sit
    between two errors: fp32 rounding of theta + eps*v and of the loss (~1/size), and the
    truncation of the central difference (~size^2, set by how fast the gradient or the loss
    bends). Fixing ``||eps*v||`` makes the step independent of ``||v||``, which changes by orders
    of magnitude over a Neumann series. Scaling it by the RMS of the parameters, not by their
    norm, keeps it the same across model sizes: ``||theta||`` grows like sqrt(P) (2120 for
    SmolLM2-135M against 7 for a 4080-parameter GPT-2) while the weights' typical size, and the
    curvature scale they set, do not (RMS 0.18 and 0.11). With ``||theta||`` the step was 300x too
    large on SmolLM2 and its directional scores were off by 40%; measurements at FD_REL_STEP.
    """
    if not (v_norm > 0 and math.isfinite(v_norm)):
        raise ValueError(f"finite-difference direction has norm {v_norm}; need finite and > 0")
    if not math.isfinite(theta_rms):
        raise ValueError(f"parameter RMS is {theta_rms}: the model has non-finite parameters")
    return rel_step * max(FD_RMS_FLOOR, theta_rms) / v_norm


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0


def finite_difference_hvp(
    params: Sequence[Tensor],
    grad_fn: Callable[[], Sequence[Tensor]],
    v: ShardedVector,
    eps: float | str = "auto",
    extra_diag: float = 0.0,
    rel_step: float = FD_REL_STEP,
) -> ShardedVector:
    """``(H + extra_diag*I) v`` by central differences of gradients, on local partitions.

    ``params``: this rank's local parameter tensors (``p.ds_tensor`` under ZeRO-3, the
    parameters themselves otherwise), aligned with ``v.parts``. ``grad_fn()``: runs forward and
    backward on the Hessian batch at the current ``params`` WITHOUT an optimiser step and returns
    this rank's local gradient parts as fp32 COPIES (it must reset accumulated gradients itself;
    under ZeRO-3 ``engine.optimizer.zero_grad()``; design.md §6). The model must be deterministic
    across the two calls (dropout off).

    Procedure: save an exact copy of ``params``; set ``theta + eps*v`` in place on ``.data``;
    ``g+ = grad_fn()``; set ``theta - eps*v``; ``g- = grad_fn()``; restore theta bit-exactly
    from the saved copy (also when ``grad_fn`` raises); return ``(g+ - g-)/(2 eps) +
    extra_diag*v``. ``extra_diag`` adds analytic curvature exactly instead of differencing it:
    the prox term (lambda/2)||theta - theta0||^2 (Hessian lambda*I) when ``grad_fn`` leaves it
    out, and/or a damping delta*I.

    ``eps="auto"``: :func:`fd_epsilon` with the sharded norms of theta and v (all-reduced, so eps
    is bit-identical on every rank). Cost: 2 gradient passes and 2 all-reduces. Extra memory
    per rank while it runs: the saved copy of the partitions (their dtype) and the two gradient
    copies (fp32; the second is freed before returning). A zero ``v`` returns zeros without
    running anything.
    """
    params = list(params)
    if len(params) != len(v.parts):
        raise ValueError(f"{len(params)} parameter tensors for a vector of {len(v.parts)} parts")
    for i, (p, q) in enumerate(zip(params, v.parts, strict=True)):
        if p.shape != q.shape:
            raise ValueError(
                f"parameter {i} has shape {tuple(p.shape)}, direction part {tuple(q.shape)}"
            )
        if p.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"parameter {i} is {p.dtype}: a finite difference in half precision loses the "
                "signal (u = 4e-3 for bf16); perturb the fp32 master partitions (docs/design.md §3)"
            )
    v_norm = v.norm()
    if v_norm == 0.0:
        return ShardedVector.zeros_like(v)
    if not math.isfinite(v_norm):
        raise ValueError("finite_difference_hvp: the direction v has non-finite entries")
    if eps == "auto":
        theta_rms = sharded_rms([p.detach() for p in params], v.group, v.replicated,
                                v.valid_numel)
        step = fd_epsilon(theta_rms, v_norm, rel_step)
    elif isinstance(eps, str):
        raise ValueError(f"eps must be a positive float or 'auto', got {eps!r}")
    else:
        step = float(eps)
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")

    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts, strict=True):
                p.data.copy_(torch.add(s, q, alpha=step))
        g_plus = _wrap_grads(grad_fn(), v, "first")
        with torch.no_grad():
            for p, s, q in zip(params, saved, v.parts, strict=True):
                p.data.copy_(torch.add(s, q, alpha=-step))
        g_minus = _wrap_grads(grad_fn(), v, "second")
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.data.copy_(s)
        del saved
    for i, (a, b) in enumerate(zip(g_plus.parts, g_minus.parts, strict=True)):
        if _shares_storage(a, b):
            raise RuntimeError(
                f"grad_fn returned the same storage twice (part {i}): it must return copies of "
                "the gradient shards, not views of buffers the next pass overwrites"
            )
    out = g_plus.sub_(g_minus).scale_(0.5 / step)
    del g_minus
    if extra_diag:
        out.axpy(float(extra_diag), v)
    return out.zero_padding_()


def _wrap_grads(grads: Sequence[Tensor], like: ShardedVector, which: str) -> ShardedVector:
    grads = list(grads)
    if len(grads) != len(like.parts):
        raise ValueError(
            f"grad_fn returned {len(grads)} tensors on its {which} call; expected {len(like.parts)}"
        )
    parts = []
    for i, (g, q) in enumerate(zip(grads, like.parts, strict=True)):
        if g is None:
            g = torch.zeros_like(q)
        if g.shape != q.shape:
            raise ValueError(
                f"grad_fn part {i} has shape {tuple(g.shape)}, expected {tuple(q.shape)}"
            )
        parts.append(g.detach().float())
    return like._new(parts)


def exact_hvp(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], v: Sequence[Tensor]
) -> list[Tensor]:
    """Exact ``H v`` by double backward, for verification on ONE unpartitioned process.

    ``v`` is aligned with :func:`trainable_parameters` (``model.parameters()`` with
    ``requires_grad``). Double backward does not work through ZeRO-3 (DeepSpeed issues #3539,
    #4528, #7352), hence :func:`finite_difference_hvp` for real runs; and CPU SDPA attention has
    no second-order autograd, so transformers must be built with ``attn_implementation="eager"``.
    Parameters the loss does not depend on get zero rows. Returns detached tensors in the
    parameters' dtype.
    """
    params = trainable_parameters(model)
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"{len(v)} direction tensors for {len(params)} trainable parameters")
    with torch.enable_grad():
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = None
        for g, d in zip(grads, v, strict=True):
            if g is None or not g.requires_grad:
                continue
            term = (g * d.to(g.dtype)).sum()
            dot = term if dot is None else dot + term
        if dot is None:
            return [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [
        torch.zeros_like(p).detach() if h is None else h.detach()
        for h, p in zip(hv, params, strict=True)
    ]


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
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    b_norm = b.norm()
    if not math.isfinite(b_norm):
        raise ValueError("neumann_ihvp: the right-hand side b has non-finite entries")
    if b_norm == 0.0:
        return IHVPResult(ShardedVector.zeros_like(b), 0.0, 0, [])

    def apply_a(x: ShardedVector) -> ShardedVector:
        w = matvec(x)
        if damping:
            w.axpy(damping, x)
        return w

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


def identity_ihvp(b: ShardedVector, gamma: float) -> ShardedVector:
    """``b / gamma``: the paper's public-code baseline (H taken as gamma*I); never the default."""
    gamma = float(gamma)
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"identity iHVP needs gamma > 0, got {gamma}")
    return b.clone().scale_(1.0 / gamma)
