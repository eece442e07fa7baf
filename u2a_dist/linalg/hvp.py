"""Hessian-vector products: by central differences of gradients on local partitions (what real
runs use), and exact by double backward (verification on one unpartitioned process)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from u2a_dist.linalg.sharded import ShardedVector, sharded_rms

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

# The same for LoRA adapters (``model.lora``): there the loss bends far less per unit of parameter
# (B starts at 0, so the loss feels A only through B, and B only through A's small init), fp32
# rounding dominates down to steps ~10x larger, and the RMS of the adapters (A's init, B = 0) is no
# measure of the curvature's scale. Measured on tiny-gpt2 with adapters (rank 2 on c_attn, 1,024
# parameters, rms 0.038 / rank 8 on every linear layer, 16,384, rms 0.036), against float64
# exact references, relative error by ||eps*v|| (a): directional scores of 16 negatives along
# grad J  a = 7e-4: 3.5e-2 / 2.0e-3;  3e-3: 1.1e-2 / 4.6e-4;  1e-2: 3.2e-3 / 1.5e-4;
# 3e-2: 1.1e-3 / 2.9e-4;  1e-1: 2.7e-4 / 3.2e-3;  HVP of the data term along grad J  a = 1e-3:
# 1.3e-4 / 3.1e-4;  3e-3: 3.8e-5 / 1.1e-4;  1e-2: 1.3e-5 / 9.7e-5;  3e-2: 2.0e-5 / 8.2e-4.
# FD_REL_STEP gave a ~ 7e-4 there (the first row); 0.2 gives a ~ 7e-3, inside both optima.
FD_REL_STEP_ADAPTERS = 2e-1

# Smallest parameter RMS the automatic step is scaled by (a model with near-zero weights).
FD_RMS_FLOOR = 1e-2


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
    return like.with_parts(parts)


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
