"""The DeepSpeed trainer as a :class:`u2a_dist.selector.HyperProblem`.

Every method is collective: all ranks call it with the same arguments, and ZeRO-3 forward
passes are padded so every rank makes the same number of them. The inner objective is the
trainer's own (:class:`u2a_dist.losses.InnerObjective`, through ``Trainer.per_example_inner``
and ``Trainer.objective``), so the selector differentiates exactly what the step minimises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from u2a_dist import progress
from u2a_dist.data.tokenize import collate, shard
from u2a_dist.device import to_device
from u2a_dist.linalg import ShardedVector
from u2a_dist.losses import check_finite, dpo_loss, sequence_logps
from u2a_dist.sampling import outer_sample_indices
from u2a_dist.selector import gradient_norms
from u2a_dist.sharded import (
    all_gather_rows,
    all_reduce_mean,
    all_reduce_sum,
    dataset_logps,
    padded_shares,
    world,
)


class TrainerProblem:
    """HyperProblem on a :class:`u2a_dist.trainer.Trainer` (any ZeRO stage, any world size).

    Every method is collective: all ranks call it with the same arguments, and ZeRO-3 forward
    passes are padded so every rank makes the same number of them. The passes run on
    ``trainer.selector_engine()``: the run's engine, or in a bf16/fp16 run an fp32 twin loaded
    with the optimizer's master weights when the problem is made (docs/design.md §3).
    """

    def __init__(self, trainer, hessian_batch: int) -> None:
        self.trainer = trainer
        self.engine = trainer.selector_engine()
        self.cfg = trainer.cfg
        self.ids = trainer.forget.ids
        self.adapters_only = self.engine.adapters_only
        self.hessian_batch = hessian_batch

    # ---- layout

    def parts(self) -> list[torch.Tensor]:
        return self.engine.local_parts()

    def zeros(self) -> ShardedVector:
        engine = self.engine
        parts = [torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                 for t in engine.local_parts()]
        # below ZeRO-3 every rank holds the whole vector: its group is still the default one
        # (ShardedVector's None), so each part is marked replicated and counted once, not W
        # times, by every inner product; random_like draws it the same on every rank
        replicated = None if engine.partitioned else [True] * len(parts)
        return ShardedVector(parts, group=engine.partition_group(),
                             valid_numel=engine.local_valid_numels(), replicated=replicated)

    def _as_vector(self, grads: list[torch.Tensor]) -> ShardedVector:
        like = self.zeros()
        return like.with_parts([g.reshape(q.shape).float().to(q.device)
                                for g, q in zip(grads, like.parts)])

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
        share = padded_shares(n, self.trainer.world_size, batch)[self.trainer.rank]
        return [share[i:i + batch] for i in range(0, len(share), batch)]

    def outer_grad(self) -> tuple[ShardedVector, float]:
        t, pairs = self.trainer, self.trainer.pa
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
        chunks = self._padded(n, self.cfg.unlearn.batch_size)
        grads = self._accumulated_grad(closure_for(c) for c in
                                       progress.each("pairs", chunks))
        j_value = all_reduce_sum(total[0]) / n
        vec = self._as_vector(grads)
        return vec, j_value

    def outer_indices(self) -> list[int]:
        """The pairs of J this round: all of data.pa, or a seeded sample of selector.outer_sample
        (the same on every rank, a fresh one each round)."""
        return outer_sample_indices(len(self.trainer.pa), self.cfg.selector.outer_sample,
                                    self.cfg.runtime.seed, self.trainer.round)

    def _hessian_indices(self) -> list[int]:
        """The Hessian batch: the whole support when it fits, else a seeded weighted subset."""
        support = self.trainer.sampler.support
        if self.hessian_batch >= len(support):
            return list(support)
        g = torch.Generator().manual_seed(self.cfg.runtime.seed * 7919 + self.trainer.round)
        pick = torch.randperm(len(support), generator=g)[: self.hessian_batch]
        return sorted(support[int(i)] for i in pick)

    def inner_grad(self) -> list[torch.Tensor]:
        return self._accumulated_grad(self._inner_closures())

    def exact_hvp(self, v: ShardedVector) -> ShardedVector:
        """H v of the closures :meth:`inner_grad` differentiates (the prox term's λI apart, as
        there), by double backward (Pearlmutter): exact up to rounding, one forward and two
        backward passes per closure. Needs ZeRO stage 0 (whole parameters on every rank and no
        gradient hooks: e.g. a LoRA run on one node); other stages get the finite differences."""
        engine = self.engine
        if engine.stage != 0:
            raise ValueError(f"selector.hvp: exact needs runtime.zero_stage 0 (got {engine.stage}:"
                             " ZeRO-3 partitions the parameters); use selector.hvp: fd")
        params, acc = engine.params, [torch.zeros_like(q) for q in v.parts]
        # on the module itself: DeepSpeed's stage-0 engine refuses any backward but its own
        for closure in self._inner_closures(engine.module):
            grads = torch.autograd.grad(closure(), params, create_graph=True, allow_unused=True)
            dot = sum((g.float() * q.view_as(g)).sum() for g, q in zip(grads, v.parts)
                      if g is not None)
            if not torch.is_tensor(dot) or not dot.requires_grad:
                continue  # the closure does not depend on the parameters (padding only)
            hv = torch.autograd.grad(dot, params, allow_unused=True)
            acc = [a if h is None else a.add_(h.float().view_as(a)) for a, h in zip(acc, hv)]
        # each closure is scaled by W for DeepSpeed's mean over ranks: the same mean here
        return v.with_parts([all_reduce_mean(a) for a in acc])

    def _inner_closures(self, model=None) -> list[Callable[[], torch.Tensor]]:
        """L_in's data terms on the Hessian batch as loss closures, forward on ``model`` (the
        selector engine's DeepSpeed engine unless given)."""
        t = self.trainer
        model = model if model is not None else self.engine.ds
        idx = self._hessian_indices()
        support_size = len(t.sampler.support)
        scale = support_size / len(idx)
        world = t.world_size
        chunks = self._padded(len(idx), max(1, self.cfg.unlearn.batch_size // world))

        def closure_for(chunk: list[int]):
            def closure() -> torch.Tensor:
                real = [idx[i] if i >= 0 else idx[0] for i in chunk]
                mask = torch.tensor([1.0 if i >= 0 else 0.0 for i in chunk], device=t.device)
                total = t.per_example_inner(model, real)[0]
                w = t.weights[real].float().to(t.device) * mask
                return world * scale * (w * total).sum()
            return closure

        closures = [closure_for(c) for c in chunks]
        if t.retain_terms.active:
            closures.append(self._retain_closure(model))
        return closures

    def _retain_closure(self, model):
        """The retain terms (KL, over-refusal contrast) on a fixed retain batch, an equal share
        per rank."""
        t = self.trainer
        n = min(len(t.retain), self.hessian_batch)
        n -= n % t.world_size
        local = shard(list(range(max(n, t.world_size))), t.rank, t.world_size)

        def closure() -> torch.Tensor:
            return t.per_example_inner(model, [], local)[2]
        return closure

    def analytic_curvature(self) -> float:
        return float(self.cfg.unlearn.prox_lambda)

    # ---- per-example losses

    def example_losses(self, idx: list[int], part: str = "total"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        self.engine.release_gathered()  # θ may have just been written (finite differences)
        model = self.engine.module
        was_training = model.training
        model.eval()
        bs = self.cfg.eval.batch_size
        if not t.objective.uses_mismatch or t.objective.forget_weight == 0:
            part = "total"  # one term: the part is the whole
        logp = ntok = ref = m_logp = m_ntok = None
        if part != "mismatch":  # the negatives themselves (the longer sequences)
            logp, ntok = dataset_logps(model, [t.forget.items[i] for i in idx], t.pad_id, bs)
            ref = t.ref_cache["forget"][idx] if "forget" in t.ref_cache else None
        if t.objective.uses_mismatch and part != "forget":
            m_logp, m_ntok = dataset_logps(model, [t.forget.mismatch[i] for i in idx],
                                           t.pad_id, bs)
        f, ell = t.objective(logp, ntok, ref, m_logp, m_ntok, part)
        model.train(was_training)
        check_finite(f, "per-example inner loss", [self.ids[i] for i in idx])
        return f, ell

    def example_grad_norms(self, idx: list[int], term: str = "total",
                           advance: Callable[[], Any] | None = None) -> torch.Tensor:
        """‖∇f_i‖ (‖∇ℓ_i‖ for ``term="forget"``) for idx, identical on every rank. On a whole,
        unpartitioned fp32 copy of θ (``Trainer.eval_model``) each rank takes every W-th example
        with plain autograd and no collective, then one all-reduce: a backward pass through
        ZeRO-3 per example reduce-scatters every gradient (SmolLM2, 2 CPU ranks: ~6 s each).
        Unpartitioned or in half precision, the engine's (or fp32 twin's) per-example backward
        (:meth:`example_grad`) instead."""
        t = self.trainer
        # unpartitioned (ZeRO 0-2), eval_model() is the engine's own module, whose gradient
        # hooks autograd.grad would bypass: the engine's path there
        model = t.eval_model() if t.engine.partitioned else None
        if model is None or next(model.parameters()).dtype != torch.float32:
            t.release_eval_copy()
            return gradient_norms(self, idx, term, advance)  # per-example engine backward
        trainable = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
        params = [p for n, p in model.named_parameters() if n in trainable]
        flags = [p.requires_grad for p in params]
        rank, size = world()
        norms = torch.zeros(len(idx), dtype=torch.float64)
        try:
            for p in params:
                p.requires_grad_(True)
            for k in range(len(idx)):
                if k % size == rank:
                    loss = self._term(t.per_example_inner(model, [idx[k]]), term).sum()
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    norms[k] = sum(float(g.double().pow(2).sum()) for g in grads
                                   if g is not None) ** 0.5
                if advance is not None:
                    advance()
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            t.release_eval_copy()
        norms = torch.stack(all_gather_rows(norms)).sum(0)  # each position: one rank's
        check_finite(norms, "per-example gradient norm", [self.ids[i] for i in idx])
        return norms

    def _term(self, out: tuple, term: str) -> torch.Tensor:
        """Of per_example_inner's (f_i = c_f ℓ_i + c_m m_i, ℓ_i, …): f_i (``total``), ℓ_i
        (``forget``) or the mismatch part f_i − c_f ℓ_i (``mismatch``)."""
        f, ell = out[0], out[1]
        if term == "total":
            return f
        return ell if term == "forget" else f - self.trainer.objective.forget_weight * ell

    def example_grad(self, i: int, term: str = "total") -> ShardedVector:
        t = self.trainer

        def closure() -> torch.Tensor:
            # same example on every rank: the rank average is its gradient
            return self._term(t.per_example_inner(self.engine.ds, [i]), term).sum()

        return self._as_vector(self._accumulated_grad([closure]))

