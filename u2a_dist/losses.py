"""Per-example log-probs and the losses of docs/design.md §2.

Everything is per example (shape ``[B]``) so that the trainer can weight examples and the
selector can score them; reductions happen in the caller. The inner objective is defined once
here (:class:`InnerObjective`); unlearning losses plug in by name (:data:`LOSSES`,
:func:`register_loss`), the way open-unlearning's methods do: adding one is one class and its
test. This module imports nothing from the rest of the package, so every layer may use it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

#: The label of prompt and padding positions (no loss there).
IGNORE = -100


class NonFiniteLossError(FloatingPointError):
    """A loss or score is NaN/inf; the message says where (step, example ids)."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and the response-token count, per example, from whole
    ``[B, T, V]`` logits (``logits[:, t]`` predicts ``labels[:, t+1]``; label ``-100`` masked).
    Computed in fp32 whatever the model dtype, because differences of log-probs are small."""
    return _row_logps(logits[label_positions(labels)], labels)


def _row_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return item_logps(logits, labels, rows, labels.shape[0])


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the positions whose logits predict a label (t where labels[:, t+1] counts)."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != IGNORE
    return at


def at_labels(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``values`` [B, T] (token ids, segments, ...) at each label, in :func:`label_logits`'s
    row-major order: what position t of those logits predicts, or the item its label is in."""
    return values[:, 1:][labels[:, 1:] != IGNORE]


def n_labels(labels: torch.Tensor) -> int:
    """How many rows :func:`label_logits` returns for these labels."""
    return int((labels[:, 1:] != IGNORE).sum())


def label_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits at :func:`label_positions` only, ``[N, V]`` in row-major order.

    Every loss here reads log-probs of labels, so the output layer is given only the hidden
    states that predict one (a forward pre-hook on it for this call): prompt, padding and last
    positions never make a vocabulary-sized row, in the forward or the backward, and neither
    does θ0's forward. Row by row the same arithmetic as the whole [B, T, V] logits."""
    at = label_positions(batch["labels"])
    head = getattr(model, "module", model).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0][at], *args[1:]))
    try:
        logits = forward_logits(model, batch)
    finally:
        hook.remove()
    # a model that does not call its output embeddings as a module: select afterwards
    return logits if logits.dim() == 2 else logits[at]


def item_logps(logits: torch.Tensor, labels: torch.Tensor, segment: torch.Tensor,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` per item of a batch from its :func:`label_logits`: the sums over the
    labels whose ``segment`` is the item's index, for items 0..n-1 (items ≥ n are left out). In a
    packed batch (``data.tokenize.pack``) each item's first label is masked, so no position
    predicts across items."""
    target, seg = at_labels(labels, labels), at_labels(segment, labels)
    # Fused cross-entropy: no log-softmax tensor is kept beside the logits for the backward.
    logp = -F.cross_entropy(logits.float(), target, reduction="none")
    keep = (seg >= 0) & (seg < n)
    sums = logp.new_zeros(n).index_add(0, seg[keep], logp[keep])
    counts = torch.zeros(n, dtype=torch.long, device=seg.device).index_add(
        0, seg[keep], torch.ones_like(seg[keep]))
    return sums, counts


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp(y|x) summed over response tokens, response length) for each row's example."""
    return _row_logps(label_logits(model, batch), batch["labels"])


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a batch of ``data.tokenize.rows_batch``: a packed one through its
    restarting position ids (no attention mask, no cache: transformers looks for packed rows
    only then), a padded one through its attention mask."""
    if "position_ids" in batch:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """nll_i = −logp(y_i|x_i)/|y_i| (mean over response tokens)."""
    return -logp / n_tokens.clamp(min=1)


def ga_loss(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ℓ_i = −nll_i (minimising it raises the NLL of the negative)."""
    return -nll(logp, n_tokens)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: ℓ_i = (2/β)·softplus(β·(logp_θ − logp_θ0)); equals log 2·2/β at θ = θ0."""
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp))


def token_kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of KL(p_θ0 ‖ p_θ) over the rows ``keep`` of θ's and θ0's :func:`label_logits` on the
    same batch, and their count (for a global mean)."""
    logq = torch.log_softmax(logits[keep].float(), dim=-1)
    logp0 = torch.log_softmax(ref_logits[keep].float(), dim=-1)
    return (logp0.exp() * (logp0 - logq)).sum(), keep.sum()


def prox_sq_norm(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """‖θ − θ0‖² over the given (local) parts, in float64 (the caller sums over ranks)."""
    return sum(float((p.detach().double() - r.double()).pow(2).sum())
               for p, r in zip(params, ref))


def prox_value(params: list[torch.Tensor], ref: list[torch.Tensor], lam: float) -> float:
    """(λ/2)‖θ − θ0‖² over the given (local) parts."""
    return 0.5 * lam * prox_sq_norm(params, ref)


def prox_grads(params: list[torch.Tensor], ref: list[torch.Tensor],
               lam: float) -> list[torch.Tensor]:
    """λ(θ − θ0), flat per part: added to the local gradient partitions directly (under ZeRO-3
    the parameters are not whole outside the forward pass; the term's Hessian λI is exact)."""
    return [lam * (p.detach().float().reshape(-1) - r.reshape(-1)) for p, r in zip(params, ref)]


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


# --------------------------------------------------------------------------- unlearning losses

class UnlearnLoss:
    """ℓ_i, a per-example unlearning loss (minimised), chosen by ``unlearn.loss``.

    Subclass, set ``name``, implement :meth:`__call__`, decorate with :func:`register_loss`:
    the trainer's step, the selector's problem and every benchmark then use it. Options come
    from ``unlearn.loss_args`` (keyword arguments of ``__init__``); ``needs_reference`` makes
    the trainer cache logp(y_i|x_i;θ0) once and pass it as ``ref_logp``.
    """

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # u2a_dist.config.UnlearnConfig

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> str | None:
        """Why ``unlearn.loss_args`` do not fit ``__init__``, or None."""
        try:
            inspect.signature(cls.__init__).bind(None, None, **args)
        except TypeError as exc:
            return str(exc)
        return None

    def __call__(self, logp: torch.Tensor, n_tokens: torch.Tensor,
                 ref_logp: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


#: unlearn.loss name -> class
LOSSES: dict[str, type[UnlearnLoss]] = {}


def register_loss(cls: type[UnlearnLoss]) -> type[UnlearnLoss]:
    LOSSES[cls.name] = cls
    return cls


def build_unlearn_loss(cfg: Any) -> UnlearnLoss:
    """The loss of an ``UnlearnConfig`` (its name and ``loss_args`` are validated there)."""
    return LOSSES[cfg.loss](cfg, **cfg.loss_args)


@register_loss
class GradientAscent(UnlearnLoss):
    """GA: ℓ_i = −nll_i."""

    name = "ga"

    def __call__(self, logp, n_tokens, ref_logp):
        return ga_loss(logp, n_tokens)


@register_loss
class NPO(UnlearnLoss):
    """NPO (Zhang et al. 2024), β = unlearn.npo_beta."""

    name = "npo"
    needs_reference = True

    def __call__(self, logp, n_tokens, ref_logp):
        if ref_logp is None:
            raise ValueError("NPO needs the reference log-probs")
        return npo_loss(logp, ref_logp, self.cfg.npo_beta)


@register_loss
class SimNPO(UnlearnLoss):
    """SimNPO (Fan et al. 2024, "Simplicity Prevails"): NPO without the reference model, on
    the length-normalised log-prob, ℓ_i = −(2/β)·log σ(−β·logp_i/|y_i| − γ)
    = (2/β)·softplus(β·logp_i/|y_i| + γ). β = unlearn.npo_beta unless ``loss_args.beta``;
    γ = ``loss_args.gamma`` (0 by default; the paper's reward margin)."""

    name = "simnpo"

    def __init__(self, cfg: Any, beta: float | None = None, gamma: float = 0.0) -> None:
        super().__init__(cfg)
        self.beta = float(cfg.npo_beta if beta is None else beta)
        self.gamma = float(gamma)

    def __call__(self, logp, n_tokens, ref_logp):
        per_token = logp / n_tokens.clamp(min=1)
        return (2.0 / self.beta) * F.softplus(self.beta * per_token + self.gamma)


class InnerObjective:
    """The per-example inner term ``∂L_in/∂w_i = c_f ℓ_i + c_m m_i`` (docs/design.md §2), the
    one definition the training step, the selector's problem and the benchmarks share."""

    def __init__(self, cfg: Any, has_mismatch: bool) -> None:
        self.loss = build_unlearn_loss(cfg)
        self.forget_weight = cfg.forget_weight
        self.mismatch_weight = cfg.mismatch_weight if has_mismatch else 0.0

    @property
    def uses_mismatch(self) -> bool:
        return self.mismatch_weight > 0

    def __call__(self, logp: torch.Tensor, n_tokens: torch.Tensor,
                 ref_logp: torch.Tensor | None, mismatch_logp: torch.Tensor | None = None,
                 mismatch_tokens: torch.Tensor | None = None, part: str = "total"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_f ℓ_i + c_m m_i, ℓ_i) from the forget (and mismatch) log-probs; ``part``
        ``forget``: (c_f ℓ_i, ℓ_i) without the mismatch log-probs, ``mismatch``: (c_m m_i, NaN)
        without the forget ones (the selector scoring one part alone, ``selector.score_on``)."""
        if part == "mismatch":
            m = self.mismatch_weight * nll(mismatch_logp, mismatch_tokens)
            return m, torch.full_like(m, float("nan"))
        ell = self.loss(logp, n_tokens, ref_logp)
        total = self.forget_weight * ell
        if self.uses_mismatch and part == "total":
            total = total + self.mismatch_weight * nll(mismatch_logp, mismatch_tokens)
        return total, ell
