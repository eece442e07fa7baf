"""Per-example log-probs and the losses of docs/design.md §2.

Everything is per example (shape ``[B]``) so that the trainer can weight examples and the
selector can score them; reductions happen in the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from u2a_dist.data.tokenize import IGNORE


class NonFiniteLossError(FloatingPointError):
    """A loss or score is NaN/inf; the message says where (step, example ids)."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and the response-token count, per example.

    ``logits[:, t]`` predicts ``labels[:, t+1]``; positions with label ``-100`` are masked.
    Computed in fp32 whatever the model dtype, because differences of log-probs are small.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    safe = target.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = logp * mask
    return logp.sum(-1), mask.sum(-1)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp(y|x) summed over response tokens, response length) for each example."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_logps(out.logits, batch["labels"])


def nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """nll_i = −logp(y_i|x_i)/|y_i| (mean over response tokens)."""
    return -logp / n_tokens.clamp(min=1)


def ga_loss(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ℓ_i = −nll_i (minimising it raises the NLL of the negative)."""
    return -nll(logp, n_tokens)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: ℓ_i = (2/β)·softplus(β·(logp_θ − logp_θ0)); equals log 2·2/β at θ = θ0."""
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp))


def unlearn_loss(kind: str, logp: torch.Tensor, n_tokens: torch.Tensor,
                 ref_logp: torch.Tensor | None, npo_beta: float) -> torch.Tensor:
    if kind == "ga":
        return ga_loss(logp, n_tokens)
    if kind == "npo":
        if ref_logp is None:
            raise ValueError("NPO needs the reference log-probs")
        return npo_loss(logp, ref_logp, npo_beta)
    raise ValueError(f"unknown unlearning loss {kind!r}")


def token_kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over response tokens of KL(p_θ0 ‖ p_θ), and the token count (for a global mean)."""
    mask = (labels[:, 1:] != IGNORE)
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp0 = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (logp0.exp() * (logp0 - logq)).sum(-1)
    return (kl * mask).sum(), mask.sum()


def prox_value(params: list[torch.Tensor], ref: list[torch.Tensor], lam: float) -> float:
    """(λ/2)‖θ − θ0‖² over the given (local) parts; its gradient λ(θ−θ0) is added in place."""
    return 0.5 * lam * sum(float((p.float() - r).pow(2).sum()) for p, r in zip(params, ref))


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss −log σ(β·margin) with the implicit rewards (TRL's definitions).

    Returns (loss, reward_chosen, reward_rejected) where reward = β·(logp_θ − logp_θ0).
    """
    reward_chosen = beta * (logp_chosen - ref_chosen)
    reward_rejected = beta * (logp_rejected - ref_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected), reward_chosen, reward_rejected


def check_finite(value: torch.Tensor, what: str, ids: list[str] | None = None) -> None:
    """Raise NonFiniteLossError naming the offending example ids when a value is NaN/inf."""
    bad = ~torch.isfinite(value.detach())
    if bad.any():
        where = ""
        if ids is not None and value.dim() == 1:
            where = f" (examples {[ids[i] for i in bad.nonzero().flatten().tolist()]})"
        raise NonFiniteLossError(f"non-finite {what}{where}")
