"""Tests of u2a_dist.linalg: every numerical result against an independent exact computation.

References: flat torch ops, float64 dense Hessians from ``torch.autograd.functional.hessian``,
``torch.linalg.eigvalsh`` / ``eigh`` / ``solve``, double-backward HVPs, and real 2-process gloo
groups for the sharded reductions and the sharded finite-difference HVP.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import socket
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from u2a_dist.linalg import (
    CG_STATE_VECTORS,
    FD_RMS_FLOOR,
    NEUMANN_STATE_VECTORS,
    CGBreakdownError,
    IHVPResult,
    NeumannDivergenceError,
    ShardedVector,
    cg_ihvp,
    exact_hvp,
    extreme_eigenvalues,
    fd_epsilon,
    finite_difference_hvp,
    identity_ihvp,
    neumann_ihvp,
    power_iteration,
    resolve_damping_and_alpha,
    sharded_rms,
    trainable_parameters,
)

F64 = torch.float64
CE = nn.functional.cross_entropy


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(F64) for t in tensors])


def _dense_matvec(mat: Tensor) -> Callable[[ShardedVector], ShardedVector]:
    """x -> mat @ x for a one-part vector (fp32 operator, like the real HVP)."""
    m32 = mat.to(torch.float32)
    return lambda x: ShardedVector([m32 @ x.parts[0]])


class TinyMLP(nn.Module):
    """8 -> 12 (tanh) -> 5 classes: 173 parameters, small enough for a dense float64 Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 12)
        self.l2 = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _mlp_data(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "xr": torch.randn(64, 8, generator=g),
        "yr": torch.randint(0, 5, (64,), generator=g),
        "xf": torch.randn(16, 8, generator=g),
        "yf": torch.randint(0, 5, (16,), generator=g),
        "xj": torch.randn(16, 8, generator=g),
        "yj": torch.randint(0, 5, (16,), generator=g),
    }


def _dtype_of(mod: nn.Module) -> torch.dtype:
    return next(mod.parameters()).dtype


def _mlp_inner(mod: nn.Module, d: dict[str, Tensor], rows: slice = slice(None)) -> Tensor:
    """GA-style (indefinite) inner loss, as U2A's L_in with gradient ascent: CE on retain data
    minus 0.6 x CE on forget data. ``rows`` selects a share of every batch (a rank's half)."""
    dt = _dtype_of(mod)
    return CE(mod(d["xr"][rows].to(dt)), d["yr"][rows]) - 0.6 * CE(
        mod(d["xf"][rows].to(dt)), d["yf"][rows]
    )


def _mlp_outer(mod: nn.Module, d: dict[str, Tensor], rows: slice = slice(None)) -> Tensor:
    """Stand-in for the outer objective J: its gradient is the Neumann right-hand side."""
    return CE(mod(d["xj"][rows].to(_dtype_of(mod))), d["yj"][rows])


def _mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMLP()
    d = _mlp_data(seed)
    return model, (lambda m: _mlp_inner(m, d)), (lambda m: _mlp_outer(m, d))


def _dense_hessian(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> Tensor:
    """Float64 Hessian of loss_fn over the flattened trainable parameters (independent of
    linalg: torch.autograd.functional.hessian through torch.func.functional_call)."""
    m64 = copy.deepcopy(model).to(F64)
    names = [n for n, p in m64.named_parameters() if p.requires_grad]
    params = trainable_parameters(m64)
    flat0 = _flat(params)

    class Bound(nn.Module):
        def __init__(self, flat: Tensor) -> None:
            super().__init__()
            self.flat = flat

        def parameters(self, recurse: bool = True):  # dtype probe used by the loss functions
            yield self.flat

        def forward(self, *args, **kwargs):
            d, o = {}, 0
            for n, p in zip(names, params, strict=True):
                d[n] = self.flat[o : o + p.numel()].view_as(p)
                o += p.numel()
            return torch.func.functional_call(m64, d, args, kwargs)

    def f(flat: Tensor) -> Tensor:
        return loss_fn(Bound(flat))

    h = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    return (h + h.T) / 2


def _grad_fn_for(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]):
    params = trainable_parameters(model)

    def grad_fn() -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        return [p.grad.detach().float().clone() for p in params]

    return grad_fn


def _count_live_vectors() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is ShardedVector)


def _peak_counting(matvec: Callable[[ShardedVector], ShardedVector]
                   ) -> tuple[Callable[[ShardedVector], ShardedVector], dict[str, int]]:
    """``matvec`` that records in ``peak["n"]`` the most ShardedVectors alive beyond those
    alive now (the caller's b) at any of its calls: a solver's state."""
    gc.collect()
    baseline = _count_live_vectors()
    peak = {"n": 0}

    def counting(x: ShardedVector) -> ShardedVector:
        out = matvec(x)
        peak["n"] = max(peak["n"], _count_live_vectors() - baseline)
        return out

    return counting, peak


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"  # CPU SDPA has no second-order autograd (docs/design.md §6)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()  # eval: no dropout, deterministic passes
    g = torch.Generator().manual_seed(1)
    ids_r = torch.randint(0, 32, (4, 12), generator=g)
    ids_f = torch.randint(0, 32, (4, 12), generator=g)
    ids_j = torch.randint(0, 32, (4, 12), generator=g)

    def lm_loss(mod: nn.Module, ids: Tensor) -> Tensor:
        # next-token CE computed in the model's dtype (the `labels=` path upcasts logits to
        # fp32, which would put fp32 rounding inside the float64 references)
        logits = mod(input_ids=ids).logits[:, :-1]
        return CE(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def loss_fn(mod: nn.Module) -> Tensor:  # GA-style inner loss
        return lm_loss(mod, ids_r) - 0.5 * lm_loss(mod, ids_f)

    def outer_fn(mod: nn.Module) -> Tensor:
        return lm_loss(mod, ids_j)

    return model, loss_fn, outer_fn


# ---------------------------------------------------------------------------------------------
# ShardedVector
# ---------------------------------------------------------------------------------------------


def _random_parts(seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(3, 4), (7,), (2, 3, 5), (1,)]]


def test_sharded_vector_ops_match_flat_torch_ops() -> None:
    xs, ys = _random_parts(0), _random_parts(1)
    x, y = ShardedVector.from_tensors(xs), ShardedVector.from_tensors(ys)
    fx, fy = _flat(xs), _flat(ys)
    assert x.numel_local() == fx.numel() == 3 * 4 + 7 + 30 + 1
    assert x.nbytes_local() == 4 * fx.numel()
    assert torch.equal(x.to_flat(), fx.float())

    assert x.dot(y) == pytest.approx(float(fx @ fy), rel=1e-12)
    assert x.norm() == pytest.approx(float(fx.norm()), rel=1e-12)
    assert _rel((x + y).to_flat(), fx + fy) < 1e-7
    assert _rel((x - y).to_flat(), fx - fy) < 1e-7
    assert _rel((x * 2.5).to_flat(), 2.5 * fx) < 1e-7
    assert _rel((0.5 * x).to_flat(), 0.5 * fx) < 1e-7
    assert _rel((x / 4.0).to_flat(), fx / 4.0) < 1e-7
    assert _rel((-x).to_flat(), -fx) < 1e-7

    z = x.clone()
    assert z.axpy(-0.3, y) is z
    assert _rel(z.to_flat(), fx - 0.3 * fy) < 1e-6
    assert torch.equal(x.to_flat(), fx.float())  # clone does not alias
    z.scale_(3.0).add_(y, alpha=2.0).sub_(x)
    assert _rel(z.to_flat(), 3 * (fx - 0.3 * fy) + 2 * fy - fx) < 1e-6
    zero = ShardedVector.zeros_like(x)
    assert zero.norm() == 0.0 and [p.shape for p in zero.parts] == [p.shape for p in xs]

    out = [torch.empty_like(t) for t in xs]
    y.copy_to(out)
    assert all(torch.equal(a, b) for a, b in zip(out, ys, strict=True))
    xs[0].add_(1.0)  # from_tensors copied: the vector does not see later changes
    assert torch.equal(x.to_flat(), _flat(_random_parts(0)).float())


def test_sharded_vector_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="fp32"):
        ShardedVector([torch.zeros(3, dtype=torch.bfloat16)])
    v16 = ShardedVector.from_tensors([torch.ones(3, dtype=torch.float16)])
    assert v16.parts[0].dtype == torch.float32
    a = ShardedVector([torch.zeros(3)])
    with pytest.raises(ValueError, match="shapes"):
        a.axpy(1.0, ShardedVector([torch.zeros(4)]))
    with pytest.raises(ValueError, match="parts"):
        a.dot(ShardedVector([torch.zeros(3), torch.zeros(1)]))
    with pytest.raises(ValueError, match="valid_numel"):
        ShardedVector([torch.zeros(3)], valid_numel=[4])


def test_padding_stays_zero() -> None:
    parts = [torch.zeros(6), torch.zeros(2, 3), torch.zeros(4)]
    like = ShardedVector(parts, valid_numel=[4, 6, 0])
    r = ShardedVector.random_like(like, 3)
    assert torch.all(r.parts[0][4:] == 0) and torch.all(r.parts[0][:4] != 0)
    assert torch.all(r.parts[2] == 0)
    s = ShardedVector.random_like(like, 4)
    w = r.clone().axpy(0.7, s).scale_(-2.0).add_(s).sub_(r * 3.0)
    assert torch.all(w.parts[0][4:] == 0) and torch.all(w.parts[2] == 0)
    assert w.valid_numel == (4, 6, 0)
    # deterministic given the seed, different for another seed
    assert torch.equal(ShardedVector.random_like(like, 3).to_flat(), r.to_flat())
    assert not torch.equal(s.to_flat(), r.to_flat())
    gen = torch.Generator().manual_seed(5)
    assert ShardedVector.random_like(like, gen).norm() > 0


# ---------------------------------------------------------------------------------------------
# two real processes (gloo): sharded reductions, sharded FD-HVP, sharded Neumann
# ---------------------------------------------------------------------------------------------


def _partition(t: Tensor, rank: int, world: int) -> tuple[Tensor, int]:
    """ZeRO-3 layout: a flat slice of ceil(n/W) elements, zero padding at the tail."""
    flat = t.detach().reshape(-1)
    n = -(-flat.numel() // world)
    padded = torch.cat([flat, flat.new_zeros(n * world - flat.numel())])
    valid = max(0, min(n, flat.numel() - rank * n))
    return padded[rank * n : (rank + 1) * n].clone(), valid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROX = 0.05  # analytic prox curvature added through extra_diag in the sharded test


def _gloo_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out: dict = {}
        # 1. reductions over padded partitions of several "parameters" + one replicated part
        g = torch.Generator().manual_seed(0)  # identical full data on every rank
        sizes = [7, 1001, 64]
        fx = [torch.randn(n, generator=g) for n in sizes]
        fy = [torch.randn(n, generator=g) for n in sizes]
        rep_x, rep_y = torch.randn(5, generator=g), torch.randn(5, generator=g)
        px = [_partition(t, rank, world) for t in fx]
        py = [_partition(t, rank, world) for t in fy]
        x = ShardedVector(
            [p for p, _ in px] + [rep_x],
            valid_numel=[k for _, k in px] + [5],
            replicated=[False] * 3 + [True],
        )
        y = ShardedVector(
            [p for p, _ in py] + [rep_y], valid_numel=x.valid_numel, replicated=x.replicated
        )
        out["dot"], out["norm"] = x.dot(y), x.norm()
        out["numel_local"], out["nbytes_local"] = x.numel_local(), x.nbytes_local()
        r = ShardedVector.random_like(x, 11)
        out["random_rep"] = r.parts[3].clone()
        out["random_local"] = r.parts[1].clone()
        out["random_pad_zero"] = all(
            bool(torch.all(p.reshape(-1)[k:] == 0))
            for p, k in zip(r.parts, r.valid_numel, strict=True)
        )

        # 2. emulated ZeRO-3 on the tiny MLP: each rank owns 1/W of every parameter, gathers
        #    them for forward/backward on ITS half of the batch, averages gradients and keeps
        #    its slice -- the data flow of DeepSpeed stage 3, without DeepSpeed
        model, _, _ = _mlp_problem(0)
        params = trainable_parameters(model)
        parts = [_partition(p, rank, world) for p in params]
        local = [p for p, _ in parts]
        valid = [k for _, k in parts]

        def gather_into_model() -> None:  # one all_gather of all partitions
            mine = torch.cat(local)
            pieces = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(pieces, mine)
            for i, p in enumerate(params):
                o = sum(t.numel() for t in local[:i])
                n = local[i].numel()
                full = torch.cat([piece[o : o + n] for piece in pieces])
                p.data.copy_(full[: p.numel()].view_as(p))

        def grad_fn_of(fn) -> Callable[[], list[Tensor]]:
            def grad_fn() -> list[Tensor]:
                gather_into_model()
                model.zero_grad(set_to_none=True)
                fn(model).backward()
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)  # data-parallel mean of the two halves' gradients
                flat /= world
                res, o = [], 0
                for p in params:
                    res.append(_partition(flat[o : o + p.numel()], rank, world)[0])
                    o += p.numel()
                return res

            return grad_fn

        data = _mlp_data(0)
        half = slice(rank, None, world)  # this rank's rows of every batch

        def half_loss(mod: nn.Module) -> Tensor:
            return _mlp_inner(mod, data, half)

        def half_outer(mod: nn.Module) -> Tensor:
            return _mlp_outer(mod, data, half)

        grad_fn = grad_fn_of(half_loss)
        before = [t.clone() for t in local]
        b = ShardedVector(grad_fn_of(half_outer)(), valid_numel=valid)
        v = ShardedVector.random_like(b, 5)
        out["eps"] = fd_epsilon(sharded_rms(local, valid_numel=valid), v.norm())
        hv = finite_difference_hvp(local, grad_fn, v, extra_diag=PROX)
        out["restored"] = all(torch.equal(a, c) for a, c in zip(before, local, strict=True))
        out["v_parts"], out["hv_parts"] = [t.clone() for t in v.parts], hv.parts
        out["b_parts"] = b.parts

        def matvec(z: ShardedVector) -> ShardedVector:
            return finite_difference_hvp(local, grad_fn, z, extra_diag=PROX)

        lam_min, lam_max = extreme_eigenvalues(matvec, b, iters=40, tol=1e-6)
        delta, alpha = resolve_damping_and_alpha(lam_min, lam_max)
        res = neumann_ihvp(matvec, b, terms=25, alpha=alpha, damping=delta)
        out.update(
            lam_min=lam_min,
            lam_max=lam_max,
            delta=delta,
            alpha=alpha,
            residual=res.residual,
            term_norms=res.term_norms,
            terms_used=res.terms_used,
        )
        out["ihvp_parts"] = res.v.parts
        out["ihvp_pad_zero"] = all(
            bool(torch.all(p.reshape(-1)[k:] == 0)) for p, k in zip(res.v.parts, valid, strict=True)
        )
        out["state_bytes"] = res.state_vectors * res.v.nbytes_local()
        cg = cg_ihvp(matvec, b, iters=25, damping=delta, tol=1e-4)
        out.update(cg_parts=cg.v.parts, cg_norms=cg.term_norms, cg_residual=cg.residual,
                   cg_state_bytes=cg.state_vectors * cg.v.nbytes_local())
        out["restored_after_all"] = all(
            torch.equal(a, c) for a, c in zip(before, local, strict=True)
        )
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_reductions_fd_hvp_and_neumann(tmp_path) -> None:
    world = 2
    mp.spawn(_gloo_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    o0, o1 = outs

    # reductions: the all-reduced dot/norm equal the full ones, identically on both ranks
    g = torch.Generator().manual_seed(0)
    sizes = [7, 1001, 64]
    fx = [torch.randn(n, generator=g) for n in sizes]
    fy = [torch.randn(n, generator=g) for n in sizes]
    rep_x, rep_y = torch.randn(5, generator=g), torch.randn(5, generator=g)
    full_x, full_y = _flat([*fx, rep_x]), _flat([*fy, rep_y])
    assert o0["dot"] == o1["dot"] and o0["norm"] == o1["norm"]
    assert o0["dot"] == pytest.approx(float(full_x @ full_y), rel=1e-12)
    assert o0["norm"] == pytest.approx(float(full_x.norm()), rel=1e-12)
    # O(P/W) state: each rank holds half of every partitioned parameter (rounded up)
    half = sum(-(-n // world) for n in sizes)
    assert o0["numel_local"] == o1["numel_local"] == half + 5
    assert o0["nbytes_local"] == 4 * (half + 5)
    assert torch.equal(o0["random_rep"], o1["random_rep"])  # replicated: same on every rank
    assert not torch.equal(o0["random_local"], o1["random_local"])  # partitions: independent
    assert o0["random_pad_zero"] and o1["random_pad_zero"]

    # sharded FD-HVP vs exact HVP of the gathered single-process model (float64)
    model, loss_fn, _ = _mlp_problem(0)
    params = trainable_parameters(model)
    sizes_p = [p.numel() for p in params]

    def gather(key: str) -> list[Tensor]:
        return [torch.cat([o[key][i].reshape(-1) for o in outs])[:n] for i, n in enumerate(sizes_p)]

    assert o0["eps"] == o1["eps"]  # all-reduced norms: identical step on every rank
    assert o0["restored"] and o1["restored"] and o0["restored_after_all"]
    ref_model = copy.deepcopy(model).to(F64)

    def ref_loss(mod: nn.Module) -> Tensor:  # the full batch = the mean of the equal halves
        return loss_fn(mod)

    v_full = gather("v_parts")
    exact = exact_hvp(
        ref_model, ref_loss, [t.view_as(p).to(F64) for t, p in zip(v_full, params, strict=True)]
    )
    exact_flat = _flat(exact) + PROX * _flat(v_full)
    err = _rel(_flat(gather("hv_parts")), exact_flat)
    assert err < 1e-3, f"2-rank FD-HVP relative error {err:.2e}"

    # sharded spectrum + Neumann vs dense float64 references on the same problem
    h = _dense_hessian(model, ref_loss) + PROX * torch.eye(sum(sizes_p), dtype=F64)
    ev = torch.linalg.eigvalsh(h)
    rho = float(ev.abs().max())
    assert o0["lam_min"] == o1["lam_min"] and o0["alpha"] == o1["alpha"]
    assert abs(o0["lam_min"] - float(ev[0])) <= 1e-2 * rho
    assert abs(o0["lam_max"] - float(ev[-1])) <= 1e-2 * rho
    assert o0["term_norms"] == o1["term_norms"] and o0["residual"] == o1["residual"]
    b = _flat(gather("b_parts"))
    k, alpha, delta = o0["terms_used"], o0["alpha"], o0["delta"]
    expected = _truncated_neumann(h, b, alpha, delta, k)
    err = _rel(_flat(gather("ihvp_parts")), expected)
    assert err < 5e-3, f"2-rank Neumann vs closed form: {err:.2e}"
    assert o0["ihvp_pad_zero"] and o1["ihvp_pad_zero"]
    # three ShardedVectors of Neumann state: 3 x 4 bytes x P/W per rank
    p_local = sum(-(-n // world) for n in sizes_p)
    assert o0["state_bytes"] == o1["state_bytes"] == NEUMANN_STATE_VECTORS * 4 * p_local
    # sharded conjugate gradients (same FD HVPs) vs a dense float64 solve: every rank took the
    # same steps, and 25 iterations solve what Neumann's 25 terms only approach
    assert o0["cg_norms"] == o1["cg_norms"] and o0["cg_residual"] == o1["cg_residual"]
    solved = torch.linalg.solve(h + delta * torch.eye(h.shape[0], dtype=F64), b)
    err_cg = _rel(_flat(gather("cg_parts")), solved)
    assert err_cg < 1e-2 < _rel(expected, solved), (err_cg, _rel(expected, solved))
    assert o0["cg_state_bytes"] == CG_STATE_VECTORS * 4 * p_local


def _truncated_neumann(h: Tensor, b: Tensor, alpha: float, delta: float, k: int) -> Tensor:
    """alpha sum_{j<k} (I - alpha A)^j b, A = h + delta I, by eigendecomposition (float64):
    on eigenvalue a the series sums to (1 - (1 - alpha a)^k) / a."""
    lam, q = torch.linalg.eigh(h.to(F64))
    a = lam + delta
    coef = (1 - (1 - alpha * a) ** k) / a
    return q @ (coef * (q.T @ b.to(F64)))


# ---------------------------------------------------------------------------------------------
# spectrum
# ---------------------------------------------------------------------------------------------


def _random_symmetric(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return (a + a.T) / math.sqrt(2 * n)


def test_power_iteration_dominant_eigenpair() -> None:
    # random orthogonal eigenvectors, an indefinite spectrum whose largest magnitude is the
    # negative end (-4) with a gap to the next (|3|): what power iteration can resolve
    n = 120
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.empty(n, dtype=F64).uniform_(-2.5, 2.5, generator=g)
    lam[0], lam[1] = -4.0, 3.0
    a = q @ torch.diag(lam) @ q.T
    like = ShardedVector([torch.zeros(n)])
    val, vec = power_iteration(_dense_matvec(a), like, iters=100, tol=1e-7, seed=0)
    ref = torch.linalg.eigvalsh(a)
    assert abs(val - float(ref[0])) <= 1e-2 * abs(float(ref[0]))
    assert vec.norm() == pytest.approx(1.0, rel=1e-6)
    assert abs(float(vec.parts[0].to(F64) @ q[:, 0])) > 0.99  # the right eigenvector


@pytest.mark.parametrize("method,iters", [("lanczos", 60), ("power", 200)])
def test_extreme_eigenvalues_random_indefinite(method: str, iters: int) -> None:
    if method == "lanczos":  # a dense GOE matrix: semicircle spectrum, both ends ~ +-2
        a = _random_symmetric(300, 1)
    else:  # power iteration needs gaps at the ends; ends of unequal magnitude
        n = 150
        g = torch.Generator().manual_seed(3)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        lam = torch.empty(n, dtype=F64).uniform_(-1.0, 2.0, generator=g)
        lam[0], lam[1] = -1.6, 2.8
        a = q @ torch.diag(lam) @ q.T
    ref = torch.linalg.eigvalsh(a)
    lo, hi = extreme_eigenvalues(
        _dense_matvec(a),
        ShardedVector([torch.zeros(a.shape[0])]),
        iters=iters,
        tol=1e-7,
        method=method,
    )
    assert ref[0] < 0 < ref[-1]
    assert abs(lo - float(ref[0])) <= 1e-2 * abs(float(ref[0])), (lo, float(ref[0]))
    assert abs(hi - float(ref[-1])) <= 1e-2 * abs(float(ref[-1])), (hi, float(ref[-1]))


@pytest.fixture(scope="module")
def mlp_hessian() -> tuple[Tensor, Tensor]:
    model, loss_fn, outer_fn = _mlp_problem(0)
    h = _dense_hessian(model, loss_fn)
    params = trainable_parameters(model)
    b = _flat(torch.autograd.grad(outer_fn(model), params))
    return h, b


@pytest.mark.parametrize("method,iters", [("lanczos", 50), ("power", 100)])
def test_extreme_eigenvalues_of_mlp_hessian(mlp_hessian, method: str, iters: int) -> None:
    h, _ = mlp_hessian
    ref = torch.linalg.eigvalsh(h)
    assert ref[0] < 0 < ref[-1]  # the GA term makes the Hessian indefinite
    lo, hi = extreme_eigenvalues(
        _dense_matvec(h),
        ShardedVector([torch.zeros(h.shape[0])]),
        iters=iters,
        tol=1e-7,
        method=method,
    )
    assert abs(lo - float(ref[0])) <= 1e-2 * abs(float(ref[0])), (lo, float(ref[0]))
    assert abs(hi - float(ref[-1])) <= 1e-2 * abs(float(ref[-1])), (hi, float(ref[-1]))


def test_extreme_eigenvalues_rejects_unknown_method() -> None:
    like = ShardedVector([torch.zeros(3)])
    with pytest.raises(ValueError, match="lanczos"):
        extreme_eigenvalues(lambda x: x.clone(), like, method="qr")


# ---------------------------------------------------------------------------------------------
# HVPs
# ---------------------------------------------------------------------------------------------


def test_exact_hvp_matches_dense_hessian(mlp_hessian) -> None:
    h, _ = mlp_hessian
    model, loss_fn, _ = _mlp_problem(0)
    m64 = copy.deepcopy(model).to(F64)
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=F64) for p in trainable_parameters(m64)]
    hv = exact_hvp(m64, loss_fn, v)
    assert _rel(_flat(hv), h @ _flat(v)) < 1e-10


@pytest.fixture(scope="module")
def gpt2_problem():
    return _tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_hessian(gpt2_problem) -> tuple[Tensor, Tensor]:
    """Dense float64 Hessian of tiny GPT-2's GA-style loss and ∇J: computed once (4080 HVPs)."""
    model, loss_fn, outer_fn = gpt2_problem
    h = _dense_hessian(model, loss_fn)
    return h, _flat(torch.autograd.grad(outer_fn(model), trainable_parameters(model)))


def test_fd_hvp_matches_exact_on_tiny_gpt2(gpt2_problem) -> None:
    model, loss_fn, outer_fn = gpt2_problem
    params = trainable_parameters(model)
    assert sum(p.numel() for p in params) == 4080
    saved = [p.detach().clone() for p in params]
    m64 = copy.deepcopy(model).to(F64)
    grad_fn = _grad_fn_for(model, loss_fn)
    g = torch.Generator().manual_seed(0)
    directions = {
        "random": [torch.randn(p.shape, generator=g) for p in params],
        # the Neumann right-hand side: a gradient of the outer loss (a high-curvature direction)
        "grad_J": [t.detach() for t in torch.autograd.grad(outer_fn(model), params)],
    }
    for name, v in directions.items():
        ref = _flat(exact_hvp(m64, loss_fn, [t.to(F64) for t in v]))
        hv = finite_difference_hvp(params, grad_fn, ShardedVector.from_tensors(v))
        err = _rel(hv.to_flat(), ref)
        assert err < 1e-3, f"{name}: FD-HVP relative error {err:.2e}"
        # theta restored bit-exactly
        assert all(torch.equal(p.detach(), s) for p, s in zip(params, saved, strict=True))
    # analytic diagonal (prox lambda I + damping delta I) added exactly
    v = ShardedVector.from_tensors(directions["random"])
    plain = finite_difference_hvp(params, grad_fn, v, eps=1e-3)
    shifted = finite_difference_hvp(params, grad_fn, v, eps=1e-3, extra_diag=0.25)
    assert torch.allclose(shifted.to_flat(), plain.to_flat() + 0.25 * v.to_flat(), atol=1e-6)
    # an explicit absolute eps is honoured: a huge step gives a visibly worse difference
    ref = _flat(exact_hvp(m64, loss_fn, [t.to(F64) for t in directions["random"]]))
    assert _rel(finite_difference_hvp(params, grad_fn, v, eps=1e-1).to_flat(), ref) > 1e-2


def test_fd_hvp_restores_params_when_grad_fn_raises() -> None:
    model, loss_fn, _ = _mlp_problem(0)
    params = trainable_parameters(model)
    saved = [p.detach().clone() for p in params]
    calls = {"n": 0}
    real = _grad_fn_for(model, loss_fn)

    def failing() -> list[Tensor]:
        calls["n"] += 1
        if calls["n"] == 2:  # fails while theta - eps v is set
            raise RuntimeError("boom")
        return real()

    v = ShardedVector.random_like(ShardedVector.from_tensors(params), 0)
    with pytest.raises(RuntimeError, match="boom"):
        finite_difference_hvp(params, failing, v)
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, saved, strict=True))


def test_fd_hvp_rejects_aliased_gradients_and_zero_direction() -> None:
    model, loss_fn, _ = _mlp_problem(0)
    params = trainable_parameters(model)
    buffers = [torch.zeros_like(p) for p in params]

    def aliased() -> list[Tensor]:  # a buggy engine returning its live gradient buffers
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        for buf, p in zip(buffers, params, strict=True):
            buf.copy_(p.grad)
        return buffers

    v = ShardedVector.random_like(ShardedVector.from_tensors(params), 0)
    with pytest.raises(RuntimeError, match="copies"):
        finite_difference_hvp(params, aliased, v)

    def never() -> list[Tensor]:
        raise AssertionError("a zero direction must not run any pass")

    zero = finite_difference_hvp(params, never, ShardedVector.zeros_like(v))
    assert zero.norm() == 0.0
    with pytest.raises(ValueError, match="eps"):
        finite_difference_hvp(params, never, v, eps="tiny")


def test_fd_epsilon_rule() -> None:
    # ||eps v|| = rel_step * max(floor, rms(theta)): fixed perturbation size, whatever ||v||
    assert fd_epsilon(0.2, 4.0, rel_step=1e-3) == pytest.approx(1e-3 * 0.2 / 4.0)
    assert fd_epsilon(1e-5, 2.0, rel_step=1e-3) == pytest.approx(1e-3 * FD_RMS_FLOOR / 2.0)
    # the RMS over ranks excludes ZeRO-3 padding and counts replicated parts once
    parts = [torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([1.0])]
    assert sharded_rms(parts, valid_numel=[2, 1]) == pytest.approx(math.sqrt(26.0 / 3.0))
    with pytest.raises(ValueError):
        fd_epsilon(1.0, 0.0)
    with pytest.raises(ValueError):
        fd_epsilon(math.inf, 1.0)


# ---------------------------------------------------------------------------------------------
# Neumann iHVP
# ---------------------------------------------------------------------------------------------


def test_neumann_matches_truncated_series_closed_form(mlp_hessian) -> None:
    h, b = mlp_hessian
    ev = torch.linalg.eigvalsh(h)
    delta, alpha = resolve_damping_and_alpha(float(ev[0]), float(ev[-1]))
    bv = ShardedVector([b.float()])
    res = neumann_ihvp(_dense_matvec(h), bv, terms=20, alpha=alpha, damping=delta)
    assert isinstance(res, IHVPResult) and res.terms_used == 20
    assert _rel(res.v.parts[0], _truncated_neumann(h, b, alpha, delta, 20)) < 1e-5
    a = h + delta * torch.eye(h.shape[0], dtype=F64)
    m = torch.eye(h.shape[0], dtype=F64) - alpha * a
    expected_terms = [
        float((torch.linalg.matrix_power(m, k) @ b).norm() / b.norm()) for k in range(20)
    ]
    assert res.term_norms == pytest.approx(expected_terms, rel=1e-4)
    true_res = float((a @ res.v.parts[0].to(F64) - b).norm() / b.norm())
    assert res.residual == pytest.approx(true_res, rel=1e-3)
    # the residual of a K-term sum is the norm of the next term: ||(I - alpha A)^K b|| / ||b||
    assert res.residual == pytest.approx(
        float((torch.linalg.matrix_power(m, 20) @ b).norm() / b.norm()), rel=1e-3
    )


def test_neumann_auto_pipeline_matches_solve_on_mlp(mlp_hessian) -> None:
    """Spectrum by Lanczos -> auto damping/alpha -> Neumann vs a direct solve. With the default
    margin kappa(H + delta I) ~ 180 here, so the series needs K ~ 1000 terms for 1e-2 (K = 20
    gives ~0.8 relative error with residual ~0.08: the residual understates the error by up to
    kappa)."""
    h, b = mlp_hessian
    mv = _dense_matvec(h)
    bv = ShardedVector([b.float()])
    lo, hi = extreme_eigenvalues(mv, bv, iters=50, tol=1e-6)
    delta, alpha = resolve_damping_and_alpha(lo, hi)
    n = h.shape[0]
    x = torch.linalg.solve(h + delta * torch.eye(n, dtype=F64), b)
    res = neumann_ihvp(mv, bv, terms=1000, alpha=alpha, damping=delta)
    err = _rel(res.v.parts[0], x)
    assert err <= 1e-2, f"K=1000: relative error {err:.2e}"
    assert res.residual < 1e-3
    short = neumann_ihvp(mv, bv, terms=20, alpha=alpha, damping=delta)
    assert _rel(short.v.parts[0], x) > 0.1  # the truncation is real: K matters


def test_neumann_auto_pipeline_matches_solve_on_tiny_gpt2(gpt2_hessian) -> None:
    """Tiny GPT-2 (4080 params): dense float64 Hessian of the GA-style loss, spectrum by
    Lanczos on it, auto damping/alpha, Neumann with early stop vs torch.linalg.solve."""
    h, b = gpt2_hessian
    mv = _dense_matvec(h)
    bv = ShardedVector([b.float()])
    lo, hi = extreme_eigenvalues(mv, bv, iters=80, tol=1e-6)
    assert lo < 0 < hi
    delta, alpha = resolve_damping_and_alpha(lo, hi)
    x = torch.linalg.solve(h + delta * torch.eye(h.shape[0], dtype=F64), b)
    res = neumann_ihvp(mv, bv, terms=GPT2_TERMS, alpha=alpha, damping=delta, tol=1e-4)
    err = _rel(res.v.parts[0], x)
    assert err <= 1e-2, f"K={res.terms_used}: relative error {err:.2e}"


GPT2_TERMS = 3000


def test_cg_auto_pipeline_matches_solve_on_mlp_and_tiny_gpt2(mlp_hessian, gpt2_hessian) -> None:
    """Conjugate gradients on the problems Neumann needs ~1000 and 3000 terms for (condition
    number ~180 and more after auto damping): a 1e-3 solve in under 60 matvecs."""
    for h, b in (mlp_hessian, gpt2_hessian):
        mv, bv = _dense_matvec(h), ShardedVector([b.float()])
        lo, hi = extreme_eigenvalues(mv, bv, iters=50, tol=1e-6)
        delta, _ = resolve_damping_and_alpha(lo, hi)
        x = torch.linalg.solve(h + delta * torch.eye(h.shape[0], dtype=F64), b)
        res = cg_ihvp(mv, bv, iters=200, damping=delta, tol=1e-4)
        assert res.terms_used < 60 and res.residual < 1e-3, (res.terms_used, res.residual)
        assert _rel(res.v.parts[0], x) <= 1e-3
        # the recurrence's residuals are the true ones (up to fp32 drift)
        assert res.term_norms[-1] == pytest.approx(res.residual, rel=0.2, abs=1e-5)
        assert len(res.term_norms) == res.terms_used + 1


def test_cg_keeps_four_vectors_stops_on_tolerance_and_breaks_down_loudly(mlp_hessian) -> None:
    h, b = mlp_hessian
    ev = torch.linalg.eigvalsh(h)
    delta, _ = resolve_damping_and_alpha(float(ev[0]), float(ev[-1]))
    bv, dense = ShardedVector([b.float()]), _dense_matvec(h)
    counting, peak = _peak_counting(dense)
    res = cg_ihvp(counting, bv, iters=4, damping=delta, compute_residual=False)
    assert res.state_vectors == CG_STATE_VECTORS == peak["n"] == 4, peak
    assert res.terms_used == 4 and math.isnan(res.residual)
    loose = cg_ihvp(dense, bv, iters=200, damping=delta, tol=1e-2)
    assert loose.term_norms[-1] <= 1e-2 < loose.term_norms[-2]
    # H is indefinite (ev[0] < 0): without damping CG meets negative curvature and says so
    assert float(ev[0]) < 0
    with pytest.raises(CGBreakdownError, match="raise selector.damping"):
        cg_ihvp(dense, bv, iters=200, damping=0.0)
    zero = cg_ihvp(dense, ShardedVector.zeros_like(bv), iters=3, damping=delta)
    assert zero.v.norm() == 0.0 and zero.terms_used == 0
    with pytest.raises(ValueError, match="iters"):
        cg_ihvp(dense, bv, iters=0, damping=delta)
    with pytest.raises(ValueError, match="damping"):
        cg_ihvp(dense, bv, iters=3, damping=-1.0)


def test_neumann_keeps_three_vectors_of_state(mlp_hessian) -> None:
    h, b = mlp_hessian
    ev = torch.linalg.eigvalsh(h)
    delta, alpha = resolve_damping_and_alpha(float(ev[0]), float(ev[-1]))
    bv = ShardedVector([b.float()])
    dense = _dense_matvec(h)
    counting, peak = _peak_counting(dense)
    res = neumann_ihvp(counting, bv, terms=4, alpha=alpha, damping=delta)
    assert res.state_vectors == NEUMANN_STATE_VECTORS == 3
    assert peak["n"] == NEUMANN_STATE_VECTORS, peak


def test_neumann_early_stop_on_tolerance(mlp_hessian) -> None:
    h, b = mlp_hessian
    ev = torch.linalg.eigvalsh(h)
    delta, alpha = resolve_damping_and_alpha(float(ev[0]), float(ev[-1]), margin=0.2)
    bv = ShardedVector([b.float()])
    res = neumann_ihvp(_dense_matvec(h), bv, terms=500, alpha=alpha, damping=delta, tol=1e-3)
    assert res.terms_used < 500
    assert res.term_norms[-1] <= 1e-3 < res.term_norms[-2]
    assert res.residual <= 1e-3  # a tolerance on the term norm is one on the residual
    x = torch.linalg.solve(h + delta * torch.eye(h.shape[0], dtype=F64), b)
    assert _rel(res.v.parts[0], x) < 1e-2


def test_neumann_diverges_loudly_when_alpha_too_large(mlp_hessian) -> None:
    h, b = mlp_hessian
    ev = torch.linalg.eigvalsh(h)
    delta = -float(ev[0]) + 0.01
    too_big = 2.5 / (float(ev[-1]) + delta)
    with pytest.warns(RuntimeWarning, match="diverge"):
        d, a = resolve_damping_and_alpha(float(ev[0]), float(ev[-1]), damping=delta, alpha=too_big)
    assert (d, a) == (delta, too_big)  # honoured as given
    with pytest.raises(NeumannDivergenceError, match="alpha=") as info:
        neumann_ihvp(_dense_matvec(h), ShardedVector([b.float()]), terms=100, alpha=a, damping=d)
    e = info.value
    assert e.alpha == a and e.damping == d and e.growth > 1e3 and 0 < e.term_index < 100
    assert "lower selector.alpha or raise selector.damping" in str(e)


def test_neumann_non_finite_matvec_raises() -> None:
    bv = ShardedVector([torch.ones(4)])
    calls = {"n": 0}

    def bad(x: ShardedVector) -> ShardedVector:
        calls["n"] += 1
        out = x.clone()
        if calls["n"] == 3:
            out.parts[0][1] = float("nan")
        return out

    with pytest.raises(NeumannDivergenceError, match="non-finite") as info:
        neumann_ihvp(bad, bv, terms=10, alpha=0.5, damping=0.0)
    assert info.value.term_index == 3
    with pytest.raises(ValueError, match="non-finite"):
        neumann_ihvp(bad, ShardedVector([torch.tensor([1.0, math.inf])]), 3, 0.5, 0.0)


def test_neumann_zero_rhs_and_bad_arguments() -> None:
    z = ShardedVector([torch.zeros(3)])
    res = neumann_ihvp(lambda x: x.clone(), z, terms=5, alpha=1.0, damping=0.0)
    assert res.v.norm() == 0.0 and res.residual == 0.0 and res.terms_used == 0
    one = ShardedVector([torch.ones(3)])
    for kwargs in ({"terms": 0}, {"alpha": 0.0}, {"damping": -1.0}):
        args = {"terms": 3, "alpha": 0.5, "damping": 0.0} | kwargs
        with pytest.raises(ValueError):
            neumann_ihvp(lambda x: x.clone(), one, **args)


# ---------------------------------------------------------------------------------------------
# damping / alpha, identity baseline
# ---------------------------------------------------------------------------------------------


def test_resolve_damping_and_alpha_auto_rule() -> None:
    delta, alpha = resolve_damping_and_alpha(-0.3, 2.0, margin=1e-2)
    assert delta == pytest.approx(0.3 + 1e-2 * 2.0)
    assert alpha == pytest.approx(1.0 / (2.0 + delta))
    # positive definite H: only the margin
    delta, alpha = resolve_damping_and_alpha(0.5, 4.0)
    assert delta == pytest.approx(0.04) and alpha == pytest.approx(1 / 4.04)
    # negative-dominated spectrum: margin relative to the spectral radius keeps kappa bounded
    delta, alpha = resolve_damping_and_alpha(-10.0, 1.0, margin=1e-2)
    kappa = (1.0 + delta) / (-10.0 + delta)
    assert kappa <= 1 + 2 / 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_damping_and_alpha(-1.0, 1.0, damping=2.0, alpha=0.1) == (2.0, 0.1)
    with pytest.warns(RuntimeWarning, match="indefinite"):
        resolve_damping_and_alpha(-1.0, 1.0, damping=0.5, alpha=0.1)
    with pytest.raises(ValueError, match="zero"):
        resolve_damping_and_alpha(0.0, 0.0)
    with pytest.raises(ValueError):
        resolve_damping_and_alpha(1.0, -1.0)
    with pytest.raises(ValueError):
        resolve_damping_and_alpha(math.nan, 1.0)
    with pytest.raises(ValueError):
        resolve_damping_and_alpha(-1.0, 1.0, alpha="big")


def test_identity_ihvp_is_b_over_gamma() -> None:
    b = ShardedVector.from_tensors(_random_parts(4))
    out = identity_ihvp(b, 4.0)
    assert torch.allclose(out.to_flat(), b.to_flat() / 4.0)
    assert out.parts[0].data_ptr() != b.parts[0].data_ptr()
    with pytest.raises(ValueError):
        identity_ihvp(b, 0.0)
