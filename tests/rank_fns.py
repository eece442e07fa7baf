"""Functions that tests run inside real rank processes (see tests/distributed.py)."""

from __future__ import annotations

from typing import Any

import torch

from u2a_dist.config import config_from_dict
from u2a_dist.retain_terms import global_values
from u2a_dist.rundir import RunDir
from u2a_dist.trainer import Trainer


def _trainer_in_run_dir(cfg: dict, prepare: bool) -> Trainer:
    """A Trainer on the config's run directory (rank 0 creates it first unless resuming)."""
    config = config_from_dict(cfg)
    run_dir = RunDir(config.out)
    if prepare and torch.distributed.get_rank() == 0:
        run_dir.prepare(config)
    torch.distributed.barrier()
    return Trainer(config, run_dir)


def train_report(cfg: dict, steps: int, save: bool = False, export: str | None = None,
                 prepare: bool = True) -> dict[str, Any]:
    """Train `steps` steps and report losses, partition sizes and (optionally) export."""
    trainer = _trainer_in_run_dir(cfg, prepare)
    losses, lrs = [], []
    trainer.train(steps=steps, at_step=lambda m: (losses.append(m["loss"]), lrs.append(m["lr"])))
    if save:
        trainer.save_checkpoint()
    out: dict[str, Any] = {
        "losses": losses,
        "lrs": lrs,
        "resumed_from": trainer.resumed_from,
        "partitions": [(tuple(p.ds_shape), p.ds_numel, p.ds_tensor.numel())
                       for p in trainer.engine.params],
        "state": trainer.engine.full_state_dict(),
    }
    if export:
        trainer.export(export)
        model = trainer.engine.module
        model.eval()
        ids = torch.tensor([[5, 17, 99, 120, 33, 2, 250]])
        with torch.no_grad():
            out["logits"] = model(input_ids=ids).logits
    return out


def _full_from_parts(parts: list[torch.Tensor], params) -> list[torch.Tensor]:
    """All-gather ZeRO-3 local partitions into whole tensors (test-side, independent of linalg)."""
    import torch.distributed as dist

    out = []
    for part, p in zip(parts, params):
        if not hasattr(p, "ds_tensor"):  # stages 0-2: every rank holds the whole parameter
            out.append(part.reshape(p.shape).clone())
            continue
        pieces = [torch.empty_like(part.reshape(-1)) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, part.reshape(-1).contiguous())
        out.append(torch.cat(pieces)[: p.ds_numel].view(p.ds_shape))
    return out


def _local_from_full(full: list[torch.Tensor], params) -> list[torch.Tensor]:
    import torch.distributed as dist

    rank, out = dist.get_rank(), []
    for f, p in zip(full, params):
        if not hasattr(p, "ds_tensor"):
            out.append(f.clone())
            continue
        n = p.ds_tensor.numel()
        flat = torch.zeros(n * dist.get_world_size())
        flat[: p.ds_numel] = f.reshape(-1)
        out.append(flat[rank * n:(rank + 1) * n].clone())
    return out


def selector_checks(cfg: dict, per_example: bool = True,
                    eps_sweep: list | None = None, train_steps: int = 0) -> dict[str, Any]:
    """FD-HVP against a full-space direction, directional vs per-example scores, state sizes
    (after ``train_steps`` training steps; in a bf16 run also the fp32 twin against the
    optimizer's master weights)."""
    from u2a_dist.linalg import NEUMANN_STATE_VECTORS, ShardedVector, finite_difference_hvp
    from u2a_dist.selector import directional_scores, per_example_scores, solve_ihvp
    from u2a_dist.trainer_problem import TrainerProblem

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    for _ in range(train_steps):
        trainer.train_step()
    half = {}
    if config.model.dtype != "float32":
        run_parts = [t.clone() for t in trainer.engine.local_parts()]
        masters = [t.clone() for t in trainer.engine.fp32_master_parts()]
    problem = TrainerProblem(trainer, config.selector.hessian_batch)
    if config.model.dtype != "float32":
        twin = problem.engine.local_parts()
        half = {
            "run_dtypes": sorted({str(t.dtype) for t in run_parts}),
            "twin_dtypes": sorted({str(t.dtype) for t in twin}),
            "twin_is_run_engine": problem.engine is trainer.engine,
            # the twin holds the master weights bit for bit, the run's weights round them
            "twin_equals_master": all(torch.equal(a, b) for a, b in zip(twin, masters)),
            "run_is_rounded_master": all(torch.equal(r, m.to(r.dtype).reshape(r.shape))
                                         for r, m in zip(run_parts, masters)),
            "master_minus_run": max(float((m - r.float().reshape(m.shape)).abs().max())
                                    for r, m in zip(run_parts, masters)),
            "numels": [(a.numel(), b.numel()) for a, b in zip(twin, run_parts)],
        }
    params = problem.engine.params
    # θ where the selector's passes run, gathered by the test's own collective
    names = [n for n, _ in problem.engine.module.named_parameters()]
    theta = dict(zip(names, _full_from_parts(problem.parts(), params)))
    g = torch.Generator().manual_seed(123)
    full_v = [torch.randn(tuple(getattr(p, "ds_shape", p.shape)), generator=g) for p in params]
    zeros = problem.zeros()
    v = ShardedVector(_local_from_full(full_v, params), group=zeros.group,
                      valid_numel=zeros.valid_numel)
    before = [t.clone() for t in problem.parts()]
    hv = finite_difference_hvp(problem.parts(), problem.inner_grad, v,
                               extra_diag=problem.analytic_curvature())
    restored = all(torch.equal(a, b) for a, b in zip(before, problem.parts()))
    exact_hv = None
    if config.runtime.zero_stage == 0:  # selector.hvp: exact, with the prox term's λI added
        exact_hv = _full_from_parts(problem.exact_hvp(v).axpy(problem.analytic_curvature(),
                                                              v).parts, params)
    if eps_sweep:
        sweep = {}
        for eps in eps_sweep:
            h = finite_difference_hvp(problem.parts(), problem.inner_grad, v, eps=eps,
                                      extra_diag=problem.analytic_curvature())
            sweep[eps] = _full_from_parts(h.parts, params)
        return {"sweep": sweep, "v": full_v, "theta0": theta,
                "items": trainer.forget.items, "pad_id": trainer.pad_id}
    grad_j, j_value = problem.outer_grad()
    ihvp, stats = solve_ihvp(problem, config.selector, grad_j)
    idx = list(range(len(trainer.forget)))
    directional, ell = directional_scores(problem, ihvp, idx)
    ell_at_theta = problem.example_losses(idx)[1]  # a pass at θ itself, for the midpoint ℓ_i
    out: dict[str, Any] = {
        "v": full_v, "hv": _full_from_parts(hv.parts, params), "restored": restored,
        "theta0": theta, "items": trainer.forget.items,
        "pad_id": trainer.pad_id, "directional": directional, "ell": ell, "stats": stats,
        "ell_at_theta": ell_at_theta,
        "local_numel": zeros.numel_local(),
        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "state_bytes": NEUMANN_STATE_VECTORS * zeros.nbytes_local(), "j": j_value,
        "param_names": names,
        "half": half, "exact_hv": exact_hv,
    }
    if per_example:
        out["per_example"], _ = per_example_scores(problem, ihvp, idx)
    if config.model.dtype == "float32":  # selector.normalize=cosine's norms (the copy path)
        out["grad_norms"] = problem.example_grad_norms(idx)
    return out


def round0_scores(cfg: dict) -> dict[str, Any]:
    from u2a_dist.u2a_loop import select_round0

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    hg = select_round0(trainer)
    from u2a_dist.u2a_loop import term_scores

    return {"scores": hg.scores, "index": hg.index, "stats": hg.stats,
            "support": trainer.sampler.support,
            "weights": trainer.weights, "terms": term_scores(trainer, hg)}


def round0_with_inputs(cfg: dict, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """Round-0 scores and what an exact reference needs: θ (whole), the forget items, J's
    sampled pairs with their θ0 log-probs, the resolved damping and α. ``also``: other
    ``selector.score`` modes scored at the same θ (``scores_<mode>``)."""
    from dataclasses import replace

    from u2a_dist.trainer_problem import TrainerProblem
    from u2a_dist.u2a_loop import select_round0

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    theta = trainer.engine.full_state_dict()
    sample = TrainerProblem(trainer, config.selector.hessian_batch).outer_indices()
    hg = select_round0(trainer)
    extra = {"support": list(trainer.sampler.support)}  # before any other mode reselects
    for mode in also:
        trainer.cfg = replace(config, selector=replace(config.selector, score=mode))
        extra[f"scores_{mode}"] = select_round0(trainer).scores
    return {**extra, "scores": hg.scores, "stats": hg.stats, "theta": theta,
            "pad_id": trainer.pad_id, "grad_norms": hg.grad_norms,
            "items": trainer.forget.items,
            "chosen": [trainer.pa.chosen[i] for i in sample],
            "rejected": [trainer.pa.rejected[i] for i in sample]}


def round0_scores_each(cfgs: list[dict]) -> list[dict[str, Any]]:
    """:func:`round0_scores` for several configs in one process (one start-up, not several)."""
    return [round0_scores(cfg) for cfg in cfgs]


def score_check(cfg: dict) -> dict[str, Any]:
    """Round 0 then the product's score check (u2a_dist.score_check), in a run directory."""
    from u2a_dist.score_check import THETA0_DIR, check_groups
    from u2a_dist.u2a_loop import ranking_scores, select_round0

    trainer = _trainer_in_run_dir(cfg, prepare=True)
    theta0 = trainer.engine.full_state_dict()
    hg = select_round0(trainer)
    support = list(trainer.sampler.support)
    check = check_groups(trainer, hg, ranking_scores(trainer, hg))
    return {"check": check, "theta0": theta0, "state": trainer.engine.full_state_dict(),
            "scores": hg.scores, "index": hg.index, "stats": hg.stats, "support": support,
            "support_after": list(trainer.sampler.support), "step": trainer.step,
            "left": (trainer.run_dir.path / THETA0_DIR).exists()}


def group_delta_j(cfg: dict, group: list[int], steps: int) -> dict[str, float]:
    """J (the selector's outer objective) at θ0 and after ``steps`` steps on ``group`` alone
    (uniform weights on it): the measured effect a group's scores predict."""
    from u2a_dist.trainer_problem import TrainerProblem

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    problem = TrainerProblem(trainer, config.selector.hessian_batch)
    _, before = problem.outer_grad()
    weights = torch.zeros(len(trainer.forget), dtype=torch.float64)
    weights[group] = 1.0 / len(group)
    trainer.set_support(sorted(group), weights)
    trainer.train(steps=steps)
    _, after = problem.outer_grad()
    return {"before": before, "after": after}


def u2a_report(cfg: dict, prepare: bool = True) -> dict[str, Any]:
    """Run the U2A loop (round-0 selection, train, reweight, ...) and report its state."""
    from u2a_dist.u2a_loop import run_u2a

    trainer = _trainer_in_run_dir(cfg, prepare)
    losses: list[float] = []
    result = run_u2a(trainer, at_step=lambda m: losses.append(m["loss"]) if "loss" in m else None)
    return {"losses": losses, "result": result, "weights": trainer.weights,
            "support": trainer.sampler.support, "round": trainer.round,
            "resumed_from": trainer.resumed_from, "state": trainer.engine.full_state_dict()}


def inner_terms(cfg: dict, idx: list[int]) -> dict[str, Any]:
    """ℓ_i + c_m m_i and ℓ_i from the trainer, with what an independent check needs."""
    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    with torch.no_grad():
        total, ell, *_ = trainer.per_example_inner(trainer.engine.module, idx)
    return {"total": total, "ell": ell, "state": trainer.engine.full_state_dict(),
            "forget": [trainer.forget.items[i] for i in idx],
            "mismatch": [trainer.forget.mismatch[i] for i in idx]}


def outer_grad_check(cfg: dict) -> dict[str, Any]:
    """∇J on a sample of the pairs (selector.outer_sample), gathered, with what a check needs."""
    from u2a_dist.trainer_problem import TrainerProblem

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    problem = TrainerProblem(trainer, config.selector.hessian_batch)
    sample = problem.outer_indices()
    grad_j, j_value = problem.outer_grad()
    trainer.round = 1
    next_sample = problem.outer_indices()
    return {"sample": sample, "next_sample": next_sample, "n_pairs": len(trainer.pa),
            "grad": _full_from_parts(grad_j.parts, trainer.engine.params), "j": j_value,
            "theta0": trainer.engine.full_state_dict(), "pad_id": trainer.pad_id,
            "chosen": [trainer.pa.chosen[i] for i in sample],
            "rejected": [trainer.pa.rejected[i] for i in sample],
            "param_names": [n for n, _ in trainer.engine.module.named_parameters()],
            "ref_known": torch.isfinite(trainer.ref_cache["pa/chosen"]).nonzero().flatten()
            .tolist()}


def budget_report(cfg: dict) -> dict[str, Any]:
    """Train (or run the U2A loop when the selector is on) under unlearn.time_budget_s."""
    from u2a_dist.u2a_loop import run_u2a

    trainer = Trainer(config_from_dict(cfg), None)
    result = run_u2a(trainer) if trainer.cfg.selector.enabled else trainer.train()
    return {"result": result, "step": trainer.step, "train_time": trainer.train_time}


def step_metrics(cfg: dict, steps: int) -> list[dict[str, Any]]:
    """The metrics of `steps` training steps (no run directory)."""
    trainer = Trainer(config_from_dict(cfg), None)
    return [trainer.train_step() for _ in range(steps)]


def steps_and_state(cfg: dict, steps: int) -> dict[str, Any]:
    """The metrics of `steps` training steps and the weights after them (no run directory)."""
    trainer = Trainer(config_from_dict(cfg), None)
    calls = [0]  # forwards of the first block's attention: twice a pass where it is recomputed
    block = trainer.engine.module.transformer.h[0].attn
    block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    metrics = [trainer.train_step() for _ in range(steps)]
    return {"metrics": metrics, "state": trainer.engine.full_state_dict(),
            "checkpointing": trainer.engine.module.is_gradient_checkpointing,
            "block_calls": calls[0], "reference_freed": trainer.reference is None,
            "reduce_bucket": getattr(trainer.engine.ds.optimizer, "reduce_bucket_size", None)}


def half_precision_rounds(cfg: dict) -> dict[str, Any]:
    """The U2A loop in a bf16 run, recording at every selection which engine the selector got
    and whether it held the optimizer's fp32 master weights at that moment."""
    from u2a_dist.u2a_loop import run_u2a

    trainer = _trainer_in_run_dir(cfg, prepare=True)
    loads: list[dict[str, Any]] = []
    selector_engine = trainer.selector_engine

    def recording() -> Any:
        engine = selector_engine()
        masters = trainer.engine.fp32_master_parts()
        loads.append({"step": trainer.step, "twin": id(engine),
                      "run": engine is trainer.engine,
                      "dtypes": sorted({str(t.dtype) for t in engine.local_parts()}),
                      "equal": all(torch.equal(a, m.reshape(a.shape))
                                   for a, m in zip(engine.local_parts(), masters))})
        return engine

    trainer.selector_engine = recording
    losses: list[float] = []
    run_u2a(trainer, at_step=lambda m: losses.append(m["loss"]) if "loss" in m else None)
    return {"loads": loads, "losses": losses, "weights": trainer.weights,
            "support": trainer.sampler.support, "round": trainer.round,
            "state": trainer.engine.full_state_dict()}


def retain_contrast(cfg: dict, idx: list[int]) -> dict[str, Any]:
    """One training step, then the retain terms' global values on retain examples ``idx``
    (this rank's share), with the items and both states an independent check needs."""
    config = config_from_dict(cfg)
    trainer = Trainer(config, None)
    drawn = trainer.retain_sampler.state_dict()
    step = trainer.train_step()
    local = idx[trainer.rank::trainer.world_size]
    with torch.no_grad():
        *_, shares, finite = trainer.per_example_inner(trainer.engine.module, [], local)
    values = global_values([shares])
    return {"values": values, "finite": finite, "step": step,
            "state": trainer.engine.full_state_dict(),
            "retain": [trainer.retain[i] for i in idx],
            "refusals": [trainer.retain_terms.refusals[i] for i in idx],
            "retain_drawn": (drawn, trainer.retain_sampler.state_dict())}
