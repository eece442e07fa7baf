"""Seeded sampling shared by the trainer and the selector: every rank draws the same indices,
and the state is a few integers, so a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BatchSampler:
    """Seeded epochs over the support; state is two integers, so resume is exact."""

    def __init__(self, support: list[int], batch_size: int, seed: int) -> None:
        self.support = list(support)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [self.support[i] for i in torch.randperm(len(self.support), generator=g)]

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation()
            take = min(self.batch_size - len(out), len(self._order) - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"support": self.support, "epoch": self.epoch, "cursor": self.cursor,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.support = list(state["support"])
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


def seeded_subset(n: int, m: int, generator_seed: int) -> list[int]:
    """All of range(n) when m is 0 or ≥ n, else m of them drawn by ``generator_seed``, sorted:
    the same on every rank."""
    if m == 0 or m >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(generator_seed)
    return sorted(int(i) for i in torch.randperm(n, generator=g)[:m])


def outer_sample_indices(n: int, m: int, seed: int, round_: int) -> list[int]:
    """Round ``round_``'s pairs of J: all n when m is 0 or ≥ n, else a seeded sample of m."""
    return seeded_subset(n, m, seed * 104729 + 31 * round_ + 1)


def candidate_indices(n: int, m: int, seed: int) -> list[int]:
    """Round 0's candidates (``selector.candidates``): all n negatives when m is 0 or ≥ n,
    else a seeded sample of m — what a very large pool is scored and ranked on."""
    return seeded_subset(n, m, seed * 7919 + 17)


def outer_pairs_used(n: int, cfg) -> list[int]:
    """Every pair some round's J can draw (rounds 0..selector.rounds): the only ones whose
    reference log-probs the selector needs."""
    sel = cfg.selector
    return sorted({i for r in range(sel.rounds + 1)
                   for i in outer_sample_indices(n, sel.outer_sample, cfg.runtime.seed, r)})
