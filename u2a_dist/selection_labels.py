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
