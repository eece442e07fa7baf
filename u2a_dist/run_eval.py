"""A run's evaluation, held by the trainer: PA metrics on held-out pairs, generation metrics on
held-out prompts, the time they take (logged apart from training), and the best evaluated step
(``best.json``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from u2a_dist.config import RunConfig
from u2a_dist.evaluate import (
    EncodedPairs,
    GenerationEval,
    better_best,
    pa_metrics,
    pair_logps,
    training_prompt_keys,
)
from u2a_dist.rundir import RunDir
from u2a_dist.theta0_cache import Theta0Cache

log = logging.getLogger(__name__)


class RunEvaluation:
    """Evaluation of one rank's model; the metrics are the same on every rank."""

    def __init__(self, cfg: RunConfig, tokenizer, pad_id: int, rank: int,
                 run_dir: RunDir | None, pa_eval: EncodedPairs | None,
                 ref_cache: dict[str, torch.Tensor],
                 theta0_cache: Theta0Cache | None = None) -> None:
        self.cfg = cfg
        self.pad_id = pad_id
        self.rank = rank
        self.run_dir = run_dir
        self.pa_eval = pa_eval
        self.ref_cache = ref_cache
        self.eval_time = 0.0
        self.best: dict[str, Any] | None = None
        self._cache: tuple[int, dict[str, float]] | None = None
        self.gen: GenerationEval | None = None
        ec = cfg.eval
        if ec.harmful_prompts is not None or ec.harmless_prompts is not None:
            self.gen = GenerationEval(cfg, tokenizer, rank, exclude=training_prompt_keys(cfg),
                                      theta0_cache=theta0_cache)
            if self.gen.excluded and rank == 0:
                log.info("evaluation leaves out %d prompts that the training data contains",
                         self.gen.excluded)

    def prepare_resume(self, reference: Callable[[], torch.nn.Module]) -> None:
        """On resume: θ0's own harmless answers for retain_ppl (unless eval.retain is given)
        are made now, with θ0 (``reference()``), before the checkpoint is loaded."""
        if self.gen is not None and self.gen.needs_reference():
            self.eval_time += self.gen.prepare(reference())

    def has_eval(self) -> bool:
        return self.pa_eval is not None or self.gen is not None

    def evaluate(self, model: Callable[[], torch.nn.Module], step: int,
                 at_theta0: bool) -> dict[str, float]:
        """PA metrics on held-out pairs, plus generation metrics when eval prompts are given.

        Time is logged apart (``timing/eval_s``, cumulative); a second call at the same step
        returns the first result (the model has not changed).
        """
        if self._cache is not None and self._cache[0] == step:
            return dict(self._cache[1])
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        current = model()
        if self.pa_eval is not None:
            was_training = current.training
            current.eval()
            chosen, rejected = pair_logps(current, self.pa_eval, self.pad_id,
                                          self.cfg.eval.batch_size)
            current.train(was_training)
            out.update(pa_metrics(chosen, rejected, self.ref_cache["pa_eval/chosen"],
                                  self.ref_cache["pa_eval/rejected"], self.cfg.selector.dpo_beta))
        if self.gen is not None:
            out.update(self.gen(current, is_reference=at_theta0))
        dt = time.perf_counter() - t0
        self.eval_time += dt
        out["timing/eval_step_s"] = dt
        out["timing/eval_s"] = self.eval_time
        self._cache = (step, dict(out))
        return out

    def _best_metric(self) -> tuple[str, str]:
        target = self.cfg.eval.target
        return (target.metric, target.mode) if target is not None else ("pa/accuracy", "max")

    def track_best(self, step: int, metrics: dict[str, float]) -> bool:
        """Record in best.json the evaluated step with the best target metric among those that
        keep every floor (``evaluate.better_best``); True when this step is the new best."""
        best = better_best(self.cfg, self.best, step, metrics)
        if best is None:
            return False
        self.best = best
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.write_json("best.json", self.best)
        return True

    def load_best(self, step: int) -> None:
        """On resume: the best step so far, unless it lies after the checkpoint."""
        if self.best is not None or self.run_dir is None:
            return
        path = self.run_dir.path / "best.json"
        if path.is_file():
            best = json.loads(path.read_text())
            if best.get("step", 0) <= step and best.get("metric") == self._best_metric()[0]:
                self.best = best
