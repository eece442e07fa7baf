"""Weighted unlearning on a DeepSpeed engine: the inner problem of U2A (docs/design.md §2).

Every rank runs this same code. A step draws a global batch of B forget examples from the
support S (a seeded permutation, identical on every rank), each rank takes its B/W share, and the
rank loss is scaled so that DeepSpeed's gradient average over ranks equals the gradient of

    L_in(θ, w) ≈ |S|/B · Σ_{i∈batch} w_i (ℓ_i + c_m m_i) + c_r KL_r + (λ/2)‖θ − θ0‖²

whatever the world size (tested: 1 and 2 ranks give the same trajectory). The prox gradient
λ(θ − θ0) is added to the local gradient partitions directly: under ZeRO-3 the parameters are not
whole outside the forward pass, and the term's Hessian (λI) is known exactly.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from u2a_dist import progress, theta0_cache
from u2a_dist.checkpoint import (
    CheckpointStore,
    crash_point,
    load_trainer_state,
    safe_torch_load,
    save_trainer_state,
)
from u2a_dist.config import RunConfig
from u2a_dist.data.tokenize import concat_rows, micro_chunks, packing_ok, rows_batch, shard
from u2a_dist.device import to_device
from u2a_dist.engine import Engine
from u2a_dist.evaluate import GenerationEval, broken_floors, target_holds
from u2a_dist.export import write_model_dir
from u2a_dist.losses import (
    InnerObjective,
    NonFiniteLossError,
    item_logps,
    label_logits,
    n_labels,
    prox_grads,
    prox_sq_norm,
    token_logps,
)
from u2a_dist.models import load_model
from u2a_dist.retain_terms import RetainTerms, global_values
from u2a_dist.run_eval import RunEvaluation
from u2a_dist.run_inputs import ForgetSet, RunInputs
from u2a_dist.rundir import RunDir
from u2a_dist.sampling import BatchSampler, seed_everything
from u2a_dist.sharded import all_reduce_sum, barrier, response_nll, world
from u2a_dist.tracking import Tracker

log = logging.getLogger(__name__)


class Trainer:
    """Builds model, data and engine for one rank; trains with fixed (or selector-set) weights."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir | None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank, self.world_size = world() if rank is None else (rank, world_size or 1)
        seed_everything(cfg.runtime.seed)
        with progress.phase("setup", 3, unit="stage", what="data and tokenizer") as ph:
            self._build(cfg, ph)
        # θ0's own answers to the retain prompts and θ0's log-probs: phases of their own
        self.retain, self.setup_time = self.inputs.load_retain(self.reference, self.theta0_cache)
        self.retain_terms = RetainTerms(cfg.unlearn, self.reference, self.retain,
                                        self.inputs.retain_refusals(self.retain), self.world_size)
        # The ZeRO-3 module itself, not the whole-parameter evaluation copy: with reference
        # log-probs from the copy, the selector test's directional scores stopped matching the
        # per-example ones (tests/test_selector.py); the cause is not yet understood.
        self.ref_cache = self.inputs.reference_logps(self.engine.module,
                                                     self.objective.loss.needs_reference,
                                                     self.theta0_cache)
        with progress.phase("setup", what="evaluation sets"):
            self._finish(cfg, run_dir)
        if self.retain_terms.cache_reference(self.pad_id, self.packed, self.device,
                                             cfg.eval.batch_size):  # unlearn.retain_kl_topk
            self.reference = None  # θ0's side of the retain terms is cached: free the model

    def _build(self, cfg: RunConfig, ph: progress.Phase) -> None:
        """Data, model, DeepSpeed engine, θ0 and the reference model."""
        self.inputs = RunInputs(cfg)
        resolved = self._resolved = self.inputs.resolved
        self.tokenizer, self.pad_id = self.inputs.tokenizer, self.inputs.pad_id
        self.forget, self.pa, self.pa_eval = self.inputs.forget, self.inputs.pa, self.inputs.pa_eval
        self.objective = InnerObjective(cfg.unlearn, has_mismatch=self.forget.mismatch is not None)

        ph.advance(what="model and DeepSpeed engine")
        model = load_model(cfg.model, resolved, seed=cfg.runtime.seed)
        self.engine = Engine(cfg, model, self.world_size)
        self.device = self.engine.device  # batches go here; data and caches stay on the CPU
        self.theta0_cache = theta0_cache.for_run(cfg, resolved, self.world_size, self.device)
        self.packed = packing_ok(self.engine.module, self.forget.items, self.pad_id,
                                 self.device)
        if not self.packed:
            log.warning("%s does not read packed rows as separate sequences: padded batches",
                        cfg.model.name_or_path)
        # θ0 = the starting model = the frozen reference (docs/design.md §2); fp32 local partitions.
        self.theta0 = [t.detach().float().clone() for t in self.engine.local_parts()]
        self._eval_copy: torch.nn.Module | None = None
        self._fp32_engine: Engine | None = None  # the selector's, in a bf16/fp16 run
        # A whole, unpartitioned θ0 for the retain KL's reference logits: each rank runs it on
        # its own share with no collective (a second ZeRO-3 engine would all-gather per layer).
        self.reference: torch.nn.Module | None = None
        ph.advance(what="reference model")
        if cfg.data.retain is not None:
            self.reference = load_model(cfg.model, resolved, seed=cfg.runtime.seed,
                                        adapters=False)  # θ0: fresh adapters add nothing
            self.reference.eval().requires_grad_(False).to(self.device)
        ph.advance()

    def _finish(self, cfg: RunConfig, run_dir: RunDir | None) -> None:
        """Samplers, step counters, the evaluation, and the checkpoint to resume from."""
        n = len(self.forget)
        self.weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.sampler = BatchSampler(list(range(n)), cfg.unlearn.batch_size, cfg.runtime.seed)
        retain_batch = cfg.unlearn.retain_batch_size or cfg.unlearn.batch_size
        self.retain_sampler = (BatchSampler(list(range(len(self.retain))), retain_batch,
                                            cfg.runtime.seed + 1)
                               if self.retain else None)
        self.step, self.train_time, self.round = 0, 0.0, 0
        self.resumed_from: int | None = None
        self.saved_step: int | None = None  # the newest checkpoint saved or resumed from
        self.evaluation = RunEvaluation(cfg, self.tokenizer, self.pad_id, self.rank, run_dir,
                                        self.pa_eval, self.ref_cache, self.theta0_cache)
        resume = run_dir.latest_checkpoint() if run_dir is not None else None
        if resume is not None:  # θ0's reference answers first: the checkpoint replaces θ0
            self.evaluation.prepare_resume(lambda: self.reference if self.reference is not None
                                           else self.eval_model())
            self.load_checkpoint(resume)
        elif run_dir is not None and self.rank == 0:
            run_dir.truncate_metrics_after(-1)  # a fresh start: no line of an earlier attempt

    # ------------------------------------------------------------------ the inner loss

    def per_example_inner(self, model, idx: list[int], retain_idx: list[int] | None = None,
                          norm: tuple[float, float] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, bool]:
        """(c_f ℓ_i + c_m m_i, ℓ_i) for forget examples idx, with the autograd graph, and for
        retain examples ``retain_idx`` the retain terms' (rank loss, this rank's value shares,
        finite) (:meth:`RetainTerms.loss`; ``norm``: the step's, else ``retain_idx``'s own).

        The forget, mismatch and retain sequences go through one forward pass, so ZeRO-3
        all-gathers every layer once per step instead of three times, packed (no padding
        between sequences; the retain rows apart, for the reference model's forward) when the
        model honours restarting position ids (``packing_ok``). Padding was 26% of a SmolLM2
        recipe step's tokens (benchmarks/throughput.py).
        """
        n = len(idx)
        main = [self.forget.items[i] for i in idx]
        if self.objective.uses_mismatch:
            main += [self.forget.mismatch[i] for i in idx]
        rows = self.retain_terms.items(retain_idx) if retain_idx else []
        width = max(len(x["input_ids"]) for x in main + rows)
        parts = [rows_batch(g, self.pad_id, self.packed, width) for g in (main, rows) if g]
        batch = to_device(parts[0] if len(parts) == 1 else concat_rows(*parts), self.device)
        logits = label_logits(model, batch)
        k = len(parts[0]["input_ids"]) if main else 0  # the main part's rows
        cut = n_labels(batch["labels"][:k])  # ... and their logits' (row-major)
        logp, ntok = item_logps(logits[:cut], batch["labels"][:k], batch["segment"][:k],
                                len(main))
        ref = self.ref_cache["forget"][idx].float().to(self.device) \
            if "forget" in self.ref_cache else None
        m_logp, m_ntok = (logp[n:], ntok[n:]) if self.objective.uses_mismatch else (None, None)
        total, loss = self.objective(logp[:n], ntok[:n], ref, m_logp, m_ntok)
        if not retain_idx:
            return total, loss, torch.zeros((), device=self.device), {}, True
        tail = {key: v[k:] for key, v in batch.items()}
        norm = norm or self.retain_terms.norm([retain_idx])
        return (total, loss, *self.retain_terms.loss(logits[cut:], tail, retain_idx, norm))

    def selector_engine(self) -> Engine:
        """The engine the selector's passes run on, holding the current θ (collective).

        An fp32 run: the run's own engine. A bf16/fp16 run: an fp32 twin with the same ZeRO
        partitions (built at the first call), loaded with the optimizer's fp32 master weights
        at every call, because the selector's finite differences perturb θ by about 1% and
        16-bit weights round that away (docs/design.md §3); 8 bytes a local parameter more.
        """
        if self.cfg.model.dtype == "float32":
            return self.engine
        masters = self.engine.fp32_master_parts()
        if self._fp32_engine is None:
            model = load_model(replace(self.cfg.model, dtype="float32"),
                               self._resolved, seed=self.cfg.runtime.seed)
            self._fp32_engine = Engine.fp32_twin(self.cfg, model, self.world_size)
        self._fp32_engine.load_parts(masters)
        return self._fp32_engine

    def prox_grads(self) -> list[torch.Tensor]:
        return prox_grads(self.engine.local_parts(), self.theta0, self.cfg.unlearn.prox_lambda)

    def prox_value(self) -> float:
        """(λ/2)‖θ − θ0‖² over all ranks' partitions (collective under ZeRO-3)."""
        local = prox_sq_norm(self.engine.local_parts(), self.theta0)
        local = all_reduce_sum(local) if self.engine.partition_group() is not None else local
        return 0.5 * self.cfg.unlearn.prox_lambda * local

    def train_step(self) -> dict[str, float]:
        """One optimiser step on L_in(·, w); returns the step's metrics (same on all ranks)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch_idx = self.sampler.next_batch()
        local_idx = shard(batch_idx, self.rank, self.world_size)
        support_size = len(self.sampler.support)
        scale = support_size / cfg.unlearn.batch_size
        use_retain = self.retain_terms.active and self.retain_sampler is not None
        r_local = shard(self.retain_sampler.next_batch(), self.rank, self.world_size) \
            if use_retain else []
        # Gradient accumulation (runtime.micro_batches): the same loss, its terms summed over
        # micro-batches, each normalised by the step's counts; activations held for one only.
        chunks = micro_chunks(local_idx, r_local, cfg.runtime.micro_batches)
        norm = self.retain_terms.norm([r for _, r in chunks]) if use_retain else None
        loss_local, ell_sum, shares = 0.0, 0.0, []
        for j, (idx, r_idx) in enumerate(chunks):
            self.engine.accumulate(last=j == len(chunks) - 1)
            total, ell, retain_loss, values, retain_ok = self.per_example_inner(
                self.engine.ds, idx, r_idx, norm)
            bad = bool((~torch.isfinite(total.detach())).any()) or not retain_ok
            w = self.weights[idx].float().to(self.device)
            loss_j = self.world_size * scale * (w * total).sum() + retain_loss
            if all_reduce_sum(float(bad)) > 0:
                ids = [self.forget.ids[i] for i, ok in
                       zip(idx, torch.isfinite(total.detach()).tolist()) if not ok]
                raise NonFiniteLossError(
                    f"step {self.step + 1}: non-finite unlearning loss"
                    + (f" (examples {ids})" if ids else " (on another rank or in the retain KL)")
                    + "; training stopped, the last good checkpoint is intact")
            self.engine.backward(loss_j)
            loss_local += float(loss_j.detach())
            ell_sum += float(ell.detach().sum())
            shares.append(values)
        retain_values = global_values(shares) if use_retain else {}
        if cfg.unlearn.prox_lambda > 0:
            self.engine.add_to_local_grads(self.prox_grads())
        lr = self.engine.lr()  # this step's (the scheduler moves it in engine.step)
        self.engine.step()
        self._check_update()
        self.step += 1
        dt = time.perf_counter() - t0
        self.train_time += dt
        loss = all_reduce_sum(loss_local) / self.world_size
        prox = self.prox_value() if cfg.unlearn.prox_lambda > 0 else 0.0
        forget_nll = -all_reduce_sum(ell_sum) / cfg.unlearn.batch_size \
            if cfg.unlearn.loss == "ga" else float("nan")
        metrics = {"step": self.step, "time_s": round(self.train_time, 4),
                   "loss": loss + prox, "loss/unlearn": loss, "loss/prox": prox,
                   "lr": lr, "grad_norm": self.engine.global_grad_norm(),
                   "timing/step_s": dt, "round": self.round}
        if cfg.unlearn.loss == "ga":
            metrics["forget/nll"] = forget_nll
        metrics.update(retain_values)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"step {self.step}: non-finite loss after the update")
        return metrics

    def _check_update(self) -> None:
        """Stop before a blown-up update is kept: parameters non-finite or above
        unlearn.max_param_abs on any rank end the run at this step, which is then neither
        counted, logged, checkpointed nor exported (the last checkpoint stays the good one)."""
        bound = self.cfg.unlearn.max_param_abs
        # one pass per part: max|θ| is NaN when any element is, and NaN <= bound is False
        bad = any(t.numel() and not float(t.abs().max()) <= bound
                  for t in self.engine.local_parts())
        if all_reduce_sum(float(bad)) > 0:
            good = self.run_dir.latest_checkpoint() if self.run_dir is not None else None
            raise NonFiniteLossError(
                f"step {self.step + 1}: the update left parameters non-finite or above "
                f"unlearn.max_param_abs={bound:g} (is unlearn.lr={self.cfg.unlearn.lr:g} too "
                "large?); the step is discarded and training stopped; "
                + (f"checkpoint {good} is the last good one" if good else "no checkpoint yet"))

    def set_support(self, support: list[int], weights: torch.Tensor) -> None:
        """Train on `support` with `weights` from now on (a new seeded epoch order)."""
        self.weights = weights.double().clone()
        self.sampler = BatchSampler(support, self.cfg.unlearn.batch_size,
                                    self.cfg.runtime.seed + 10_007 * (self.round + 1))

    # ------------------------------------------------------------------ evaluation

    def eval_model(self) -> torch.nn.Module:
        """The current θ as a whole, unpartitioned module for evaluation passes.

        Under ZeRO-3 every forward all-gathers each layer, and generation makes one forward per
        token in lock-step across ranks; one all-gather into a plain copy instead lets each rank
        generate its share alone (SmolLM2, 2 ranks: ~20× faster). Other stages are whole.
        """
        if not self.engine.partitioned:
            return self.engine.module
        if self._eval_copy is None:
            self._eval_copy = load_model(self.cfg.model, self._resolved, seed=self.cfg.runtime.seed)
            self._eval_copy.eval().requires_grad_(False).to(self.device)
        self.engine.copy_params_into(self._eval_copy)
        return self._eval_copy

    @property
    def gen_eval(self) -> GenerationEval | None:
        return self.evaluation.gen

    @property
    def best(self) -> dict[str, Any] | None:
        return self.evaluation.best

    @property
    def eval_time(self) -> float:
        return self.evaluation.eval_time

    @eval_time.setter
    def eval_time(self, value: float) -> None:
        self.evaluation.eval_time = value

    def has_eval(self) -> bool:
        return self.evaluation.has_eval()

    def evaluate(self) -> dict[str, float]:
        """The evaluation at this step (:meth:`RunEvaluation.evaluate`)."""
        fresh = self.step == 0 and self.resumed_from is None
        with progress.phase("evaluation", what=f"step {self.step}"):
            try:
                return self.evaluation.evaluate(self.eval_model, self.step, at_theta0=fresh)
            finally:
                self.release_eval_copy()

    def release_eval_copy(self) -> None:
        """Drop eval_model()'s copy: not held through training, 4 bytes a parameter (issue 23)."""
        self._eval_copy = None

    def target_met(self, metrics: dict[str, float]) -> bool:
        """The eval.target metric reached its value (max: ≥, min: ≤) and every
        eval.target.require bound holds (``evaluate.target_holds``)."""
        return target_holds(self.cfg, metrics)

    def broken_floors(self, metrics: dict[str, float]) -> list[str]:
        """Utility floors (eval.floors: upper bounds) that ``metrics`` exceed."""
        return broken_floors(self.cfg, metrics)

    def track_best(self, metrics: dict[str, float]) -> bool:
        return self.evaluation.track_best(self.step, metrics)

    def forget_nll(self) -> float:
        """Mean token NLL of the whole forget set (does unlearning raise it?)."""
        model = self.eval_model()
        was_training = model.training
        model.eval()
        nlls = response_nll(model, self.forget.items, self.pad_id, self.cfg.eval.batch_size)
        model.train(was_training)
        return float(nlls.mean())

    # ------------------------------------------------------------------ loop

    #: runtime.report_to's trackers, built at the first record: after a resume has set
    #: ``resumed_from``, which says what their files keep.
    _tracker: Tracker | None = None

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and mirror it to ``runtime.report_to`` (rank 0)."""
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.append("metrics.jsonl", record)
            if self._tracker is None:
                self._tracker = Tracker(self.cfg.runtime.report_to, self.run_dir.path,
                                        self.resumed_from)
            self._tracker.log(record)

    def close_log(self) -> None:
        """Close the trackers' files (the end of the run); a later record reopens them."""
        if self._tracker is not None:
            self._tracker.close()

    def over_time_budget(self) -> bool:
        """Whether unlearn.time_budget_s is spent. Collective: rank 0's clock decides, so that
        every rank stops at the same step even when their clocks differ slightly."""
        budget = self.cfg.unlearn.time_budget_s
        if not budget:
            return False
        return all_reduce_sum(self.train_time if self.rank == 0 else 0.0) >= budget

    def train(self, steps: int | None = None, at_step=None) -> dict[str, Any]:
        """Run until `steps` more steps (default: to unlearn.steps), the target or a floor;
        ``at_step(record)`` sees every step's record (the fault tests' hook)."""
        with progress.phase("train", self.cfg.unlearn.steps, done=self.step, unit="step") as ph:
            return self._train(steps, ph, at_step)

    def _train(self, steps: int | None, ph: progress.Phase, at_step) -> dict[str, Any]:
        cfg = self.cfg
        end = cfg.unlearn.steps if steps is None else min(cfg.unlearn.steps, self.step + steps)
        self.evaluation.load_best(self.step)
        if self.step == 0 and cfg.eval.every and self.has_eval():
            metrics = self.evaluate()
            self.track_best(metrics)
            self.log({"step": 0, "time_s": 0.0, "timing/setup_s": self.setup_time, **metrics})
        stop = None
        broken: list[str] = []
        while self.step < end:
            if self.over_time_budget():
                stop = "time_budget"
                break
            metrics = self.train_step()
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics.update(self.evaluate())
                broken = self.broken_floors(metrics)
                if broken:  # a target met with utility broken does not count
                    stop = "floor"
                    metrics["floors_broken"] = ", ".join(broken)
                elif self.target_met(metrics):
                    stop = "target"
                self.track_best(metrics)
            self.log(metrics)
            ph.advance(to=self.step, metrics=progress.step_metrics(metrics))
            if at_step is not None:
                at_step(metrics)
            if cfg.runtime.checkpoint_every and self.step % cfg.runtime.checkpoint_every == 0:
                self.save_checkpoint()
            if stop:
                break
        result = {"step": self.step, "stopped": stop or "budget", "train_time_s": self.train_time,
                  "eval_time_s": self.eval_time, "best": self.best}
        if broken:
            result["floors_broken"] = broken
        return result

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able rest): what a checkpoint holds besides DeepSpeed's state."""
        version, internal, gauss = random.getstate()
        tensors = {"weights": self.weights.clone(), "torch_rng": torch.get_rng_state()}
        meta = {"step": self.step, "round": self.round, "train_time": self.train_time,
                "eval_time": self.eval_time, "sampler": self.sampler.state_dict(),
                "retain_sampler": self.retain_sampler.state_dict() if self.retain_sampler
                else None, "py_rng": [version, list(internal), gauss]}
        return tensors, meta

    def save_checkpoint(self, final: bool = False) -> str:
        """A crash-safe checkpoint of this step (u2a_dist.checkpoint); returns its tag (rank 0;
        the temporary tag on the other ranks). ``final``: the end-of-run save."""
        assert self.run_dir is not None
        with progress.phase("checkpoint", what=f"step {self.step}"):
            return self._save_checkpoint(final)

    def _save_checkpoint(self, final: bool) -> str:
        store = CheckpointStore(self.run_dir.checkpoints)
        tmp = store.begin(self.step) if self.rank == 0 else f"tmp-step{self.step}"
        barrier()
        self.engine.save(store.root, tmp)
        crash_point("final_write" if final else "write", self.rank, self.step)
        barrier()
        tag = tmp
        if self.rank == 0:
            save_trainer_state(store.root / tmp, *self.trainer_state())
            tag = store.commit(tmp, self.step, self.rank, "final_" if final else "")
        barrier()
        self.saved_step = self.step
        return tag

    def load_checkpoint(self, tag: str) -> None:
        root = self.run_dir.checkpoints
        with safe_torch_load():
            self.engine.load(root, tag)
        self.restore_state(*load_trainer_state(root / tag))
        self.resumed_from = self.step
        self.saved_step = self.step
        if self.rank == 0:
            self.run_dir.truncate_metrics_after(self.step)

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """The inverse of :meth:`trainer_state` (DeepSpeed's state apart)."""
        self.step, self.round = int(state["step"]), int(state["round"])
        self.train_time, self.eval_time = float(state["train_time"]), float(state["eval_time"])
        self.weights = tensors["weights"].clone()
        self.sampler.load_state_dict(state["sampler"])
        if self.retain_sampler is not None and state["retain_sampler"] is not None:
            self.retain_sampler.load_state_dict(state["retain_sampler"])
        torch.set_rng_state(tensors["torch_rng"])
        version, internal, gauss = state["py_rng"]
        random.setstate((version, tuple(internal), gauss))

    # ------------------------------------------------------------------ export

    def export(self, out_dir) -> None:
        """Write model/ (safetensors + config + tokenizer) loadable by from_pretrained."""
        state = self.engine.full_state_dict()  # collective: every rank takes part
        if self.rank == 0:
            fresh = load_model(self.cfg.model, self._resolved, seed=self.cfg.runtime.seed)
            fresh.load_state_dict(state, strict=True)
            write_model_dir(fresh, self.tokenizer, Path(out_dir))
        barrier()


__all__ = ["BatchSampler", "ForgetSet", "Trainer", "response_nll", "token_logps"]
