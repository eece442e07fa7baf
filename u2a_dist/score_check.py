"""Round-0 scores checked against the effect they predict (issue 22; the U2A code's brute-force
ΔPA script, Bergson's LDS): T training steps on each group of k negatives alone — the top k by
score, the bottom k, a seeded random k — each from θ0 with a fresh optimizer, and the outer
objective J on the same pairs before and after. A score predicts a larger drop of J, so the
top group's ΔJ should be the lowest.

`u2a select` runs it after round 0 with ``selector.check_steps: T`` (``selector.check_k``, else
``top_k``, negatives a group); each group costs T of the run's training steps and one J pass.
"""

from __future__ import annotations

import copy
import shutil
from typing import Any

import torch

from u2a_dist import progress
from u2a_dist.checkpoint import safe_torch_load
from u2a_dist.sampling import seeded_subset
from u2a_dist.selector import Hypergradient
from u2a_dist.sharded import barrier
from u2a_dist.trainer_problem import TrainerProblem

#: Where θ0 and its fresh optimizer state wait between groups: `u2a select`'s own directory,
#: removed when the check ends (it is u2a's: fsio.RUN_ENTRIES).
THETA0_DIR = "check-theta0"


def score_groups(index: list[int], scores: torch.Tensor, k: int, seed: int
                 ) -> dict[str, list[int]]:
    """The top-k, bottom-k and a seeded random k of the scored negatives ``index`` (forget-set
    indices, sorted within each group); ties by position, as top-k selection breaks them."""
    k = min(k, len(index))
    order = sorted(range(len(index)), key=lambda p: (-float(scores[p]), p))
    pick = seeded_subset(len(index), k, seed * 6271 + 5)
    return {"top": sorted(index[p] for p in order[:k]),
            "bottom": sorted(index[p] for p in order[len(order) - k:]),
            "random": sorted(index[p] for p in pick)}


def check_groups(trainer, hg: Hypergradient, scores: torch.Tensor) -> dict[str, Any]:
    """ΔJ of T steps on each score group from θ0 (``scores``: what round 0 ranked by, aligned
    with ``hg.index``); every rank takes part. Leaves the trainer at θ0 with a fresh optimizer,
    at step 0, on the round-0 support."""
    cfg = trainer.cfg
    steps, k = cfg.selector.check_steps, cfg.selector.check_k or cfg.selector.top_k
    groups = score_groups(list(hg.index), scores, k, cfg.runtime.seed)
    position = {i: p for p, i in enumerate(hg.index)}
    support, weights = list(trainer.sampler.support), trainer.weights.clone()
    state = copy.deepcopy(trainer.trainer_state())  # every group: the same retain batches
    problem = TrainerProblem(trainer, cfg.selector.hessian_batch)
    directory = trainer.run_dir.path / THETA0_DIR
    if trainer.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)  # a check a crash cut short: u2a's own
        directory.mkdir()
    barrier()
    trainer.engine.save(directory, "theta0")
    with progress.phase("score check", what=f"J at θ0 on {len(problem.outer_indices())} pairs"):
        _, j0 = problem.outer_grad()
    out: dict[str, Any] = {"steps": steps, "k": k, "j_before": j0, "groups": {}}
    try:
        for name, group in groups.items():
            with progress.phase("score check", what=f"{name} {k}: {steps} steps"):
                _restore(trainer, directory, state)
                w = torch.zeros(len(trainer.forget), dtype=torch.float64)
                w[group] = 1.0 / len(group)
                trainer.set_support(group, w)
                for _ in range(steps):
                    trainer.train_step()
                _, j = problem.outer_grad()
            out["groups"][name] = {
                "delta_j": j - j0, "j_after": j,
                "mean_score": float(torch.stack([scores[position[i]] for i in group]).mean()),
                "index": group}
        _restore(trainer, directory, state)
        trainer.set_support(support, weights)
    finally:
        barrier()
        if trainer.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def _restore(trainer, directory, state: tuple[dict, dict]) -> None:
    """θ0 with a fresh optimizer (DeepSpeed's own checkpoint of it) and the trainer's state as
    it was at θ0: step 0, the same retain batches and random state."""
    with safe_torch_load():
        trainer.engine.load(directory, "theta0")
    trainer.restore_state(*state)
