"""ShardedVector: a vector in parameter space held as this rank's local parts, and the
sharded reductions (one ``all_reduce`` per inner product) every decision of the selector rests on.

Padding: every operation of :class:`ShardedVector` maps zeros to zeros elementwise (``axpy``,
``scale_``, ``add_``, ``sub_``, products by finite scalars), so padding that is zero in every input
stays zero. Vectors that know their layout (``valid_numel``) can also re-zero it explicitly with
:meth:`ShardedVector.zero_padding_`; :meth:`ShardedVector.random_like` and
:func:`~u2a_dist.linalg.hvp.finite_difference_hvp` do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Matvec = Callable[["ShardedVector"], "ShardedVector"]

# Elements converted to float64 at a time by the local reductions: bounds the temporary memory
# of a dot product to 2 x 8 MiB whatever the size of a partition.
_CHUNK = 1 << 20


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

    def with_parts(self, parts: list[Tensor]) -> ShardedVector:
        """``parts`` (this vector's shapes, fp32, not copied) as a vector with this one's group
        and layout (padding, replicated parts)."""
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
        return other.with_parts([torch.zeros_like(p) for p in other.parts])

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
        return other.with_parts(parts).zero_padding_()

    def clone(self) -> ShardedVector:
        return self.with_parts([p.clone() for p in self.parts])

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
