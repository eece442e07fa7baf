"""``RewardModelJudge``: any HF sequence classifier as a harm judge; ``load_judge`` picks a
``HarmJudge`` directory or a classifier.

transformers and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from u2a_dist.judges.harm import CONFIG_FILE, HEAD_FILE, HarmJudge, JudgeInput

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------ reward-model judge

class RewardModelJudge:
    """Any HF ``AutoModelForSequenceClassification`` directory as a harm judge.

    ``predict_proba``: with one output logit, ``sigmoid(logit)``; with two, ``softmax[:, 1]``
    (class 1 = harmful); more than two needs ``positive_index``. A reward model whose score
    means "good" rather than "harmful" needs ``invert=True`` (then 1 - p). A (prompt, response)
    input goes to the tokenizer as a text pair, a plain string as is.
    """

    def __init__(self, path: str | Path, threshold: float = 0.5, batch_size: int = 16,
                 max_length: int = 512, invert: bool = False,
                 positive_index: int | None = None) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"reward model directory {str(p)!r} does not exist")
        try:
            config = AutoConfig.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{p}: not an HF model directory ({exc})") from exc
        archs = config.architectures or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"{p}: not a sequence classifier (architectures={archs}); a harm "
                             "judge needs an AutoModelForSequenceClassification checkpoint or a "
                             "HarmJudge directory with judge.json")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                p, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{p}: cannot load as a sequence classifier ({exc})") from exc
        missing = sorted(info.get("missing_keys") or [])
        prefix = f"{model.base_model_prefix}."
        head_missing = [k for k in missing if not k.startswith(prefix)]
        if head_missing:  # a freshly initialised (random) head would judge by chance
            raise ValueError(f"{p}: the checkpoint lacks classifier weights {head_missing[:4]}: "
                             "a base model, not a trained sequence classifier")
        if missing:
            log.warning("%s: weights missing from the checkpoint: %s", p, missing[:8])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{p}: no tokenizer saved with the classifier ({exc})") from exc
        n = int(model.config.num_labels)
        if n > 2 and positive_index is None:
            raise ValueError(f"{p}: classifier has {n} labels ({model.config.id2label}); pass "
                             "positive_index to say which one means harmful")
        if self.tokenizer.pad_token is None:  # GPT-2 style: pad with EOS, mask hides it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval()
        self.path = str(p)
        self.num_labels = n
        self.positive_index = positive_index
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.max_length = max_length
        self.invert = invert

    def predict_proba(self, texts: Sequence[JudgeInput]) -> np.ndarray:
        """P(harmful) per input, float64 of shape (n,) (semantics in the class docstring)."""
        import torch

        if isinstance(texts, str):
            raise TypeError("pass a list of texts or (prompt, response) pairs, not one string")
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start:start + self.batch_size])
                if all(isinstance(t, str) for t in chunk):
                    enc = self.tokenizer(chunk, padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt")
                else:
                    pairs = [(t, "") if isinstance(t, str) else t for t in chunk]
                    enc = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs],
                                         padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt")
                logits = self.model(**enc).logits.float()
                if self.positive_index is not None:
                    p = logits.softmax(-1)[:, self.positive_index]
                elif self.num_labels == 1:
                    p = logits[:, 0].sigmoid()
                else:
                    p = logits.softmax(-1)[:, 1]
                out.append(p.double().numpy())
        probs = np.concatenate(out) if out else np.zeros(0)
        return 1.0 - probs if self.invert else probs

    def is_harmful(self, texts: Sequence[JudgeInput], threshold: float | None = None) -> np.ndarray:
        """Boolean per input at ``threshold`` (default: the judge's own)."""
        t = self.threshold if threshold is None else threshold
        return self.predict_proba(texts) >= t


def load_judge(path: str | Path) -> HarmJudge | RewardModelJudge:
    """A ``HarmJudge`` directory (has judge.json) or else an HF sequence classifier."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file() or (p / HEAD_FILE).is_file():
        return HarmJudge.load(p)
    return RewardModelJudge(p)
