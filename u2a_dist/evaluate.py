"""Preference-alignment metrics (DESIGN §5).

``pa/accuracy`` is the share of held-out pairs whose implicit reward margin
``[logp(y+) − logp_0(y+)] − [logp(y−) − logp_0(y−)]`` is positive and ``pa/margin`` its mean;
``rewards/*`` are TRL's β-scaled versions. No generation is needed, so these are cheap enough to
log every few steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from u2a_dist.data.examples import Pair
from u2a_dist.data.tokenize import encode
from u2a_dist.passes import dataset_logps


@dataclass
class EncodedPairs:
    ids: list[str]
    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int) -> EncodedPairs:
    return EncodedPairs(
        [p.id for p in pairs],
        [encode(tokenizer, p.prompt, p.chosen, p.history, max_length) for p in pairs],
        [encode(tokenizer, p.prompt, p.rejected, p.history, max_length) for p in pairs])


def pair_logps(model, pairs: EncodedPairs, pad_id: int,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and the rejected answers (all ranks get all)."""
    chosen, _ = dataset_logps(model, pairs.chosen, pad_id, batch_size)
    rejected, _ = dataset_logps(model, pairs.rejected, pad_id, batch_size)
    return chosen, rejected


def pa_metrics(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, prefix: str = "pa") -> dict[str, float]:
    """pa/accuracy, pa/margin and TRL-style rewards/* from the four log-prob vectors."""
    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    reward_chosen = beta * (logp_chosen - ref_chosen)
    reward_rejected = beta * (logp_rejected - ref_rejected)
    return {
        f"{prefix}/accuracy": float((margin > 0).double().mean()),
        f"{prefix}/margin": float(margin.mean()),
        "rewards/chosen": float(reward_chosen.mean()),
        "rewards/rejected": float(reward_rejected.mean()),
        "rewards/margins": float((reward_chosen - reward_rejected).mean()),
    }
