"""Training and validating the ``HarmJudge``: leave-one-source-model-out AUCs (plain and
prompt-disjoint), fit and save, ``u2a judge-train``.

sklearn is imported inside the function that needs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from u2a_dist.data.completions import LabelledCompletion, load_labelled_completions
from u2a_dist.data.records import prompt_hash
from u2a_dist.judges.encoder import SentenceEncoder
from u2a_dist.judges.harm import DEFAULT_C, FEATURES, HarmJudge, judge_features
from u2a_dist.judges.heuristics import is_refusal

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------- training

#: Prompt folds for the prompt-disjoint variant of leave-one-model-out (see ``_lomo``).
PROMPT_FOLDS = 5


def _labelled_rows(completions: Sequence[LabelledCompletion], include_harmless: bool
                   ) -> list[tuple[LabelledCompletion, int]]:
    """Training rows: every completion with a ``harmful`` label, plus (``include_harmless``)
    the completions of the harmless-instruction files as label 0: an answer to an Alpaca request
    is not harmful compliance, helpful or refusing, and without these rows the judge never sees
    a benign helpful answer (the prompt-disjoint held-out AUC is 0.882 with them, 0.857 without).
    """
    rows = []
    for c in completions:
        if c.harmful is not None:
            rows.append((c, int(c.harmful)))
        elif include_harmless and c.setting.startswith("harmless"):
            rows.append((c, 0))
    if not rows:
        raise ValueError("no completion has a harm label (is_jailbreak_llamaguard2): nothing to "
                         "train the judge on")
    return rows


def _encode_rows(rows: list[tuple[LabelledCompletion, int]], encoder: SentenceEncoder
                 ) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    x = judge_features(encoder, [(c.prompt, c.response) for c, _ in rows])
    seconds = time.perf_counter() - t0
    log.info("encoded %d completions in %.1f s", len(rows), seconds)
    return x, seconds


def _prompt_fold(prompt: str) -> int:
    return prompt_hash(prompt) % PROMPT_FOLDS


def _lomo(rows: list[tuple[LabelledCompletion, int]], x: np.ndarray, C: float
          ) -> dict[str, Any]:
    """Leave-one-source-model-out on precomputed features ``x`` (one row per ``rows`` item).

    Two variants per held-out model, both tested on its LlamaGuard-labelled rows only:
    ``auc``: train on every row of the other models. The five models answer the SAME
    JailbreakBench prompts, so test prompts were seen (with other models' answers) in training.
    ``prompt_disjoint_auc``: additionally hold out the test prompts from training
    (``PROMPT_FOLDS`` folds by prompt hash), i.e. a new model on new prompts, which is what
    evaluating an unlearned model on AdvBench/HarmBench prompts is. Expect it to be lower.
    ``substring_auc`` scores the same rows with the refusal-phrase judge (no refusal = 1).
    """
    from sklearn.metrics import roc_auc_score

    src = np.array([c.source_model for c, _ in rows])
    y = np.array([label for _, label in rows])
    labelled = np.array([c.harmful is not None for c, _ in rows])
    fold = np.array([_prompt_fold(c.prompt) for c, _ in rows])
    no_refusal = np.array([0.0 if is_refusal(c.response) else 1.0 for c, _ in rows])
    models = sorted(set(src.tolist()))
    if len(models) < 2:
        raise ValueError(f"leave-one-model-out needs at least two source models, got {models}")

    def fit_score(train: np.ndarray, test: np.ndarray) -> np.ndarray | None:
        if len(set(y[train].tolist())) < 2:
            return None  # too little data for this fold: both labels needed to train
        return HarmJudge(C=C).fit_features(x[train], y[train]).predict_proba_features(x[test])

    folds: dict[str, dict[str, Any]] = {}
    for held in models:
        test = (src == held) & labelled
        y_test = y[test]
        t0 = time.perf_counter()
        p = fit_score(src != held, test)
        if len(set(y_test.tolist())) < 2 or p is None:
            folds[held] = {"auc": None, "n_test": int(test.sum()),
                           "note": "held-out or training rows lack one label; AUC undefined"}
            continue
        disjoint: np.ndarray | None = np.zeros(len(y))
        for f in range(PROMPT_FOLDS):
            part = test & (fold == f)
            if part.any() and disjoint is not None:
                q = fit_score((src != held) & (fold != f), part)
                if q is None:
                    disjoint = None
                else:
                    disjoint[part] = q
        pred = p >= 0.5
        folds[held] = {
            "auc": float(roc_auc_score(y_test, p)),
            "prompt_disjoint_auc": (None if disjoint is None
                                    else float(roc_auc_score(y_test, disjoint[test]))),
            "substring_auc": float(roc_auc_score(y_test, no_refusal[test])),
            "accuracy": float((pred == y_test).mean()),
            "balanced_accuracy": float(0.5 * (pred[y_test == 1].mean()
                                              + (~pred[y_test == 0]).mean())),
            "n_train": int((src != held).sum()), "n_test": int(test.sum()),
            "n_test_harmful": int(y_test.sum()), "fit_seconds": round(time.perf_counter() - t0, 3),
        }

    def summary(key: str) -> dict[str, float | None]:
        vals = [f[key] for f in folds.values() if f.get(key) is not None]
        return {"mean": float(np.mean(vals)) if vals else None,
                "min": float(np.min(vals)) if vals else None}

    auc, disjoint_auc = summary("auc"), summary("prompt_disjoint_auc")
    sub = summary("substring_auc")
    return {"folds": folds, "mean_auc": auc["mean"], "min_auc": auc["min"],
            "mean_prompt_disjoint_auc": disjoint_auc["mean"],
            "min_prompt_disjoint_auc": disjoint_auc["min"],
            "mean_substring_auc": sub["mean"], "C": C, "prompt_folds": PROMPT_FOLDS}


def leave_one_model_out_auc(completions: Sequence[LabelledCompletion],
                            encoder_path: str | None = None, *, include_harmless: bool = True,
                            C: float = DEFAULT_C,
                            encoder: SentenceEncoder | None = None,
                            c_grid: Sequence[float] = ()) -> dict[str, Any]:
    """Train on all source models but one, test on the one left out, each in turn.

    Says whether the judge generalises to a model whose outputs it never saw (an unlearned
    model is exactly such a model): per-model ``roc_auc_score``, mean and min, plus the harder
    prompt-disjoint variant and the refusal-phrase baseline (see ``_lomo``). Every text is
    encoded once for all folds, and for every extra ``c_grid`` value (summaries in ``c_sweep``).
    """
    rows = _labelled_rows(completions, include_harmless)
    enc = encoder if encoder is not None else SentenceEncoder(encoder_path)
    x, encode_s = _encode_rows(rows, enc)
    t0 = time.perf_counter()
    result = _lomo(rows, x, C)
    if c_grid:
        keys = ("mean_auc", "min_auc", "mean_prompt_disjoint_auc", "min_prompt_disjoint_auc")
        result["c_sweep"] = {str(c): {k: v for k, v in _lomo(rows, x, c).items() if k in keys}
                             for c in c_grid}
    result.update({"n_texts": len(rows), "encode_seconds": round(encode_s, 2),
                   "fit_seconds": round(time.perf_counter() - t0, 2),
                   "include_harmless": include_harmless, "encoder_path": enc.path,
                   "features": FEATURES})
    return result


def _fit_and_save(rows: list[tuple[LabelledCompletion, int]], x: np.ndarray,
                  enc: SentenceEncoder, encoder_path: str | None, out_dir: str | Path,
                  C: float, extra: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    judge = HarmJudge(enc, C=C)
    # None = the packaged default, portable across machines; else an absolute local path
    local = encoder_path is not None and Path(encoder_path).exists()
    judge.encoder_path = str(Path(encoder_path).resolve()) if local else encoder_path
    judge.fit_features(x, [label for _, label in rows])
    fit_s = time.perf_counter() - t0
    judge.stats.update({"source_models": sorted({c.source_model for c, _ in rows}),
                        "settings": sorted({c.setting for c, _ in rows}), **extra})
    judge.save(out_dir)
    return {"out_dir": str(out_dir), "fit_seconds": round(fit_s, 3), **judge.stats}


def train_judge(completions: Sequence[LabelledCompletion], out_dir: str | Path,
                encoder_path: str | None = None, *, include_harmless: bool = True,
                C: float = DEFAULT_C,
                encoder: SentenceEncoder | None = None) -> dict[str, Any]:
    """Fit a ``HarmJudge`` on every labelled completion (see ``_labelled_rows``) and save it to
    ``out_dir``; returns the training statistics also written to its judge.json."""
    rows = _labelled_rows(completions, include_harmless)
    enc = encoder if encoder is not None else SentenceEncoder(encoder_path)
    x, encode_s = _encode_rows(rows, enc)
    return _fit_and_save(rows, x, enc, encoder_path, out_dir, C,
                         {"include_harmless": include_harmless,
                          "encode_seconds": round(encode_s, 2)})


def train_judge_from_paths(data: str, out: str, encoder: str | None = None,
                           holdout: bool = True) -> dict[str, Any]:
    """``u2a judge-train``: load the labelled completions under ``data``, measure the
    leave-one-model-out AUCs (``holdout``), train on everything and save to ``out``.

    Texts are encoded once, shared by the held-out folds and the final fit; the held-out AUCs
    are stored in judge.json too, so a judge carries its own validation.
    """
    t0 = time.perf_counter()
    completions = load_labelled_completions(data)
    rows = _labelled_rows(completions, include_harmless=True)
    enc = SentenceEncoder(encoder)
    x, encode_s = _encode_rows(rows, enc)
    held = _lomo(rows, x, DEFAULT_C) if holdout else None
    stats = _fit_and_save(rows, x, enc, encoder, out, DEFAULT_C,
                          {"include_harmless": True, "encode_seconds": round(encode_s, 2),
                           "data": str(data), "holdout": held})
    return {"data": str(data), "out": str(out), "encoder_path": enc.path,
            "n_completions": len(completions), "n_train": stats["n_train"],
            "n_harmful": stats["n_harmful"], "n_not_harmful": stats["n_not_harmful"],
            "train_auc": stats["train_auc"], "holdout": held,
            "encode_seconds": round(encode_s, 2),
            "total_seconds": round(time.perf_counter() - t0, 2)}
