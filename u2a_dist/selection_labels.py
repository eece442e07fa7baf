"""How a selection treats negatives of known ground truth (a noisy pool's labelled rows, issue
22): per label, the ROC AUC of the scores ranking that label's rows above all others, and how
many of them the pool and the selected support hold. For reports only: the labels come from
``DataSpec.label`` (or a row's own ``label`` field) and reach neither training nor selection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


def label_stats(scores: Sequence[float], labels: Sequence[str | None],
                selected: Iterable[int]) -> dict[str, float]:
    """``selector/pool@L`` and ``selector/support@L`` (rows labelled L among all scored rows and
    among ``selected``, positions into ``scores``) and ``selector/auc@L`` (ROC AUC of ``scores``
    for L against every other row, ties counting one half; only where both exist). Empty when
    no row has a label."""
    if all(label is None for label in labels):
        return {}
    from sklearn.metrics import roc_auc_score

    pool = Counter(str(label) for label in labels if label is not None)
    chosen = Counter(str(labels[i]) for i in selected if labels[i] is not None)
    out: dict[str, float] = {}
    for label, n in sorted(pool.items()):
        out[f"selector/pool@{label}"] = n
        out[f"selector/support@{label}"] = chosen.get(label, 0)
        if n < len(labels):
            truth = [str(x) == label if x is not None else False for x in labels]
            out[f"selector/auc@{label}"] = float(roc_auc_score(truth, list(scores)))
    return out


def weight_shares(weights: Sequence[float], labels: Sequence[str | None]) -> dict[str, float]:
    """``selector/weight@L``: label L's share of the weight mass (``weights`` and ``labels``
    aligned, e.g. over the support); empty when no row has a label or there is no mass. A
    reweighting round can move mass toward one label: this is how much it holds."""
    total = float(sum(weights))
    if total <= 0 or all(label is None for label in labels):
        return {}
    out: dict[str, float] = {}
    for w, label in zip(weights, labels):
        if label is not None:
            key = f"selector/weight@{label}"
            out[key] = out.get(key, 0.0) + float(w) / total
    return dict(sorted(out.items()))


def unscored_counts(examples: Sequence, scored: Sequence[int]) -> dict[str, float]:
    """``selector/unscored@L``: rows labelled L that round 0 did not score (outside a
    ``selector.candidates`` sample); empty when it scored them all or the pool has no labels."""
    left = set(range(len(examples))) - set(scored)
    counts = Counter(str(examples[i].attrs.get("label")) for i in left
                     if examples[i].attrs.get("label") is not None)
    return {f"selector/unscored@{label}": n for label, n in sorted(counts.items())}


def grounded_shares(labels: Sequence[str | None], grounded: Sequence[bool] | None
                    ) -> dict[str, float]:
    """``selector/grounded@L``: the share of label L's rows whose mismatch target is their own
    prompt's answer rather than a template (run_inputs.ForgetSet.grounded); empty without labels
    or mismatch targets."""
    if grounded is None or all(label is None for label in labels):
        return {}
    out: dict[str, float] = {}
    for label in sorted({str(x) for x in labels if x is not None}):
        mine = [g for x, g in zip(labels, grounded) if x is not None and str(x) == label]
        out[f"selector/grounded@{label}"] = sum(mine) / len(mine)
    return out


#: Shares of grounded mismatch targets further apart than this between labels: a warning.
GROUNDED_GAP = 0.1


def grounded_warning(stats: dict[str, float]) -> str | None:
    """The warning a labelled pool's report carries when its labels' mismatch targets differ
    (grounded answers for some, templates for others) by more than GROUNDED_GAP."""
    shares = {k.partition("@")[2]: v for k, v in stats.items()
              if k.startswith("selector/grounded@")}
    if len(shares) < 2 or max(shares.values()) - min(shares.values()) <= GROUNDED_GAP:
        return None
    return ("mismatch targets differ by label (share grounded in the prompt: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items()))
            + "): the score's mismatch part can tell the labels apart by its targets alone; "
            "give every negative the same kind of target to measure the selector")


def kept_and_left_out(rows: Sequence[dict], prompts: Sequence[str], n: int = 3,
                      width: int = 90) -> dict[str, dict]:
    """Per ground-truth label, what round 0 kept (weight > 0) and left out, from its
    ``scores.jsonl`` rows (``prompts``: the forget set's, by ``index``): the counts and the
    ``n`` highest-ranked kept and ``n`` lowest-ranked left-out rows, each ``{id, prompt,
    score}`` (prompt cut to ``width`` characters). Ranked by the logged score, over its
    ``grad_norm`` where the run ranked by the cosine. Empty for a pool without labels."""
    rows = [r for r in rows if r.get("round") == 0 and r.get("label") is not None]

    def rank(r: dict) -> float:
        norm = r.get("grad_norm")
        return r["score"] / norm if norm else (0.0 if norm == 0 else r["score"])

    def show(r: dict) -> dict:
        text = " ".join(prompts[r["index"]].split())
        return {"id": r["id"], "score": round(rank(r), 4),
                "prompt": text if len(text) <= width else text[:width - 1] + "…"}

    out: dict[str, dict] = {}
    for label in sorted({str(r["label"]) for r in rows}):
        mine = sorted((r for r in rows if str(r["label"]) == label), key=rank, reverse=True)
        kept = [r for r in mine if r["weight"] > 0]
        left = [r for r in mine if r["weight"] <= 0]
        out[label] = {"kept": len(kept), "left_out": len(left),
                      "kept_examples": [show(r) for r in kept[:n]],
                      "left_out_examples": [show(r) for r in left[::-1][:n]]}
    return out
