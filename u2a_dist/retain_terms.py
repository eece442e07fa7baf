"""The retain side of the inner objective (docs/design.md §2), on a batch of harmless prompts x
with θ0's own answers y:

    c_r · KL(p_θ0 ‖ p_θ) per response token of y
    + c_o · mean_x (2/β_o)·softplus(β_o·(Δ̄(r|x) − Δ̄(y|x))),   Δ̄ = (logp_θ − logp_θ0)/|·|

where r is a refusal (the prompt-less mismatch answers, cycled by retain index). The second,
the over-refusal contrast, is the mismatch term's counterpart: the mismatch term raises the
refusals on harmful prompts, this one lowers the same refusals on harmless prompts relative to
the answer θ0 gave, so what the model learns is "refuse *these*" rather than "refuse". Per-token
means put it on the mismatch term's scale (its gradient at θ0 is ∇(logp_r/|r| − logp_y/|y|));
β_o bounds it: it stops pushing once the answer leads the refusal by a few 1/β_o nats per token,
where an unbounded push (over-refusals as negatives, lever E1) erased refusal altogether.

The training step and the selector's Hessian closures both call :meth:`RetainTerms.loss`, so
the selector differentiates what the step minimises.

With ``unlearn.retain_kl_topk`` = k > 0 θ0's side is computed once (:meth:`cache_reference`)
and the reference model is freed: the contrast's θ0 log-probs exactly, and the KL between θ0
and θ coarse-grained to θ0's top k tokens at each position plus one bucket for the rest, which
never exceeds the exact KL and equals it as k reaches the vocabulary (tests/test_retain_terms.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from u2a_dist import progress
from u2a_dist.data.tokenize import rows_batch, with_response
from u2a_dist.device import to_device
from u2a_dist.losses import IGNORE, at_labels, item_logps, label_logits, token_kl_sum
from u2a_dist.sharded import all_reduce_sum

Item = dict[str, list[int]]


def _prompt_len(item: Item) -> int:
    return next((k for k, v in enumerate(item["labels"]) if v != IGNORE), len(item["labels"]))


def refusal_items(retain: list[Item], refusals: list[list[int]], max_length: int) -> list[Item]:
    """(x_j, r_{j mod n}) for each retain item j: its prompt tokens with a refusal's tokens."""
    return [with_response(item["input_ids"][:_prompt_len(item)], refusals[j % len(refusals)],
                          max_length) for j, item in enumerate(retain)]


def onset(item: Item, k: int) -> Item:
    """The item cut after its first ``k`` response tokens."""
    end = _prompt_len(item) + k
    return {"input_ids": item["input_ids"][:end], "labels": item["labels"][:end]}


def coarse_kl_sum(logits: torch.Tensor, top_logp0: torch.Tensor, top_ids: torch.Tensor,
                  tail_logp0: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(p_θ0 ‖ p_θ) on θ0's top-k tokens of each row and one bucket for the
    rest: θ's logits ``[N, V]``, θ0's top-k log-probs and their token ids ``[N, k]`` and the log
    of θ0's remaining mass ``[N]`` (−inf where none is left)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    top_q = logq.gather(1, top_ids)
    tail_q = logq.scatter(1, top_ids, float("-inf")).logsumexp(-1)
    kl = (top_logp0.exp() * (top_logp0 - top_q)).sum(-1)
    rest = tail_logp0 > float("-inf")
    tail = torch.where(rest, tail_logp0.exp() * (tail_logp0 - tail_q), 0.0)
    return (kl + tail).sum()


def contrast_loss(logp_y: torch.Tensor, n_y: torch.Tensor, ref_y: torch.Tensor,
                  logp_r: torch.Tensor, n_r: torch.Tensor, ref_r: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per prompt (2/β)·softplus(β·(Δ̄_r − Δ̄_y)); (2/β)·log 2 at θ = θ0."""
    d_y = (logp_y - ref_y) / n_y.clamp(min=1)
    d_r = (logp_r - ref_r) / n_r.clamp(min=1)
    return (2.0 / beta) * F.softplus(beta * (d_r - d_y))


class RetainTerms:
    """c_r·KL + c_o·contrast on retain rows of a collated batch, scaled for DeepSpeed's
    gradient average over ranks (×W, divided by global counts)."""

    def __init__(self, cfg, reference: torch.nn.Module | None, retain: list[Item],
                 refusals: list[Item] | None, world_size: int) -> None:
        self.kl_weight = cfg.retain_kl_weight
        self.contrast_weight = cfg.retain_refusal_weight if refusals else 0.0
        self.beta = cfg.retain_refusal_beta
        self.reference, self.retain, self.refusals = reference, retain, refusals
        self.world_size = world_size
        self.topk = getattr(cfg, "retain_kl_topk", 0)
        self.cached: dict[str, list[torch.Tensor]] | None = None  # cache_reference
        # k > 0: the contrast compares the first k tokens of answer and refusal, where answering
        # or refusing is decided; over a whole refusal the per-token mean dilutes its opening
        # (the model's own "I'm sorry for any confusion, but as a chatbot …" runs to 60 tokens).
        self.onset = cfg.retain_refusal_tokens if self.contrast_weight > 0 else 0
        if self.onset:
            self.refusals = [onset(r, self.onset) for r in refusals]
            self.answer_onsets = [onset(y, self.onset) for y in retain]

    @property
    def active(self) -> bool:
        return bool(self.retain) and (self.kl_weight > 0 or self.contrast_weight > 0)

    def items(self, idx: list[int]) -> list[Item]:
        """The rows these terms need for retain examples ``idx``: answers, then refusals, then
        (``retain_refusal_tokens`` > 0) the answers' openings."""
        rows = [self.retain[i] for i in idx]
        if self.contrast_weight > 0:
            rows += [self.refusals[i] for i in idx]
        if self.onset:
            rows += [self.answer_onsets[i] for i in idx]
        return rows

    def norm(self, chunks: list[list[int]]) -> tuple[float, float]:
        """The step's global normalisers over retain examples ``chunks`` (this rank's, in its
        micro-batches): θ0's answer tokens the KL averages over and the examples the contrast
        averages over. Counted from the items, so a micro-batch's terms are their share of the
        step's means. Collective."""
        idx = [i for c in chunks for i in c]
        tokens = sum(sum(t != IGNORE for t in self.retain[i]["labels"][1:]) for i in idx)
        return max(all_reduce_sum(tokens), 1.0), max(all_reduce_sum(len(idx)), 1.0)

    def cache_reference(self, pad_id: int, packed: bool, device: torch.device,
                        batch_size: int) -> bool:
        """With ``unlearn.retain_kl_topk`` > 0, θ0's values these terms read, for every retain
        example, from the reference model, which they then drop (True): its log-prob of each
        row :meth:`items` makes and, at each of the answer's tokens, its top-k log-probs, their
        token ids and its remaining mass."""
        if not (self.topk and self.active):
            return False
        out: dict[str, list[torch.Tensor]] = {"rows": [], "top": [], "ids": [], "tail": []}
        for start in progress.each("reference top-k", range(0, len(self.retain), batch_size)):
            idx = list(range(start, min(start + batch_size, len(self.retain))))
            items = self.items(idx)
            batch = to_device(rows_batch(items, pad_id, packed), device)
            labels, n = batch["labels"], len(idx)
            with torch.no_grad():
                logits = label_logits(self.reference, batch)
                rows, _ = item_logps(logits, labels, batch["segment"], len(items))
                out["rows"] += list(rows.view(-1, n).T.cpu())  # per example: its rows' logps
                item = at_labels(batch["segment"], labels)
                answers = (item >= 0) & (item < n)
                logp0 = torch.log_softmax(logits[answers].float(), dim=-1)
                top, ids = logp0.topk(min(self.topk, logp0.shape[-1]), dim=-1)
                tail = logp0.scatter(1, ids, float("-inf")).logsumexp(-1)
                for j in range(n):  # item j's labels, in order (row-major within its row)
                    mine = item[answers] == j
                    out["top"].append(top[mine].cpu())
                    out["ids"].append(ids[mine].int().cpu())  # half the bytes of int64
                    out["tail"].append(tail[mine].cpu())
        self.cached, self.reference = out, None
        return True

    def _cached_kl_sum(self, logits: torch.Tensor, item: torch.Tensor,
                       idx: list[int]) -> torch.Tensor:
        """:func:`coarse_kl_sum` on the answers of retain examples ``idx`` (items 0..n-1),
        θ0's cached values put in the order of θ's logits."""
        keep = (item >= 0) & (item < len(idx))
        order = torch.argsort(item[keep], stable=True)  # rows grouped by example, in order
        inverse = torch.argsort(order)  # cached row p belongs at position order[p]
        top, ids, tail = (torch.cat([self.cached[k][i] for i in idx]).to(logits.device)[inverse]
                          for k in ("top", "ids", "tail"))
        return coarse_kl_sum(logits[keep], top, ids.long(), tail)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], idx: list[int],
             norm: tuple[float, float]) -> tuple[torch.Tensor, dict[str, float], bool]:
        """(this rank's loss to backward, its shares of the terms' values by name, all finite)
        for retain examples ``idx``: ``batch`` (``data.tokenize.rows_batch`` of ``items(idx)``)
        holds their rows only, ``logits`` θ's :func:`~u2a_dist.losses.label_logits` on it,
        ``norm`` the step's :meth:`norm` (this batch may be one micro-batch of it). The values'
        sum over micro-batches and ranks is the step's (:func:`global_values`)."""
        labels, segment, n = batch["labels"], batch["segment"], len(idx)
        item = at_labels(segment, labels)
        tokens, count = norm
        ref_logits = None
        if self.cached is None:
            with torch.no_grad():
                ref_logits = label_logits(self.reference, batch)
        total = logits.new_zeros((), dtype=torch.float32)
        values: dict[str, float] = {}
        finite = True
        if self.kl_weight > 0:  # over θ0's answers only (items 0..n-1), not the refusals
            kl_sum = self._cached_kl_sum(logits, item, idx) if ref_logits is None else \
                token_kl_sum(logits, ref_logits, (item >= 0) & (item < n))[0]
            total = total + self.kl_weight * self.world_size * kl_sum / tokens
            values["loss/retain_kl"] = float(kl_sum.detach()) / tokens
            finite = finite and bool(torch.isfinite(kl_sum.detach()))
        if self.contrast_weight > 0:
            m = 3 * n if self.onset else 2 * n
            logp, ntok = item_logps(logits, labels, segment, m)
            ref = item_logps(ref_logits, labels, segment, m)[0] if ref_logits is not None else \
                torch.stack([self.cached["rows"][i] for i in idx]).T.reshape(-1).to(logp)
            y = slice(2 * n, 3 * n) if self.onset else slice(0, n)  # answers, then refusals
            per = contrast_loss(logp[y], ntok[y], ref[y], logp[n:2 * n], ntok[n:2 * n],
                                ref[n:2 * n], self.beta)
            total = total + self.contrast_weight * self.world_size * per.sum() / count
            values["loss/retain_refusal"] = float(per.detach().sum()) / count
            finite = finite and bool(torch.isfinite(per.detach()).all())
        return total, values, finite


def global_values(shares: list[dict[str, float]]) -> dict[str, float]:
    """The step's values of the retain terms from every micro-batch's shares on this rank: their
    sum over micro-batches and ranks. Collective (one all-reduce per term)."""
    keys = sorted({k for s in shares for k in s})
    return {k: all_reduce_sum(sum(s.get(k, 0.0) for s in shares)) for k in keys}
