"""θ0's work kept on disk between runs (``runtime.theta0_cache``).

Before its first step a run makes θ0's greedy answers to the retain prompts, θ0's reference
log-probs, and the step-0 evaluation's generations. They depend only on the starting model, the
data and a few settings, yet they were 37 % of a SmolLM2 run (E22 seed 2: retain answers 9 min,
reference log-probs 6, the step-0 evaluation 22, training 61). A second run of the same model on
the same data — another seed of the sampler, another weight of the inner objective — reads them
instead of recomputing them.

Entries are JSON (generations) and safetensors (tensors): nothing is unpickled. An entry's key is
a SHA-256 over everything its result depends on: the model's files (path, size, mtime) or a
preset's name and seed; dtype, attention kernel, world size, ZeRO stage and DeepSpeed config,
device type; the versions of torch, transformers and deepspeed; the inputs' token ids and the
call's settings. Rank 0 decides hit or miss and broadcasts the entry, so the ranks never disagree
and need no shared filesystem; on a miss every rank computes as without a cache and rank 0 writes
the entry (atomically). An entry that cannot be read is reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from u2a_dist.config import RunConfig
from u2a_dist.fsio import atomic_write, fsync_path
from u2a_dist.generation import Share
from u2a_dist.sharded import broadcast_object, world

log = logging.getLogger(__name__)

#: Bumped when what an entry holds, or how a key is made, changes: old entries then miss.
FORMAT = 1


def digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _model_identity(resolved: str, seed: int) -> dict[str, Any]:
    """A model directory by its files (a rewritten file has a new size or mtime: a miss); a
    preset built in code by its name and the seed it is built with."""
    path = Path(resolved)
    if not path.is_dir():
        return {"preset": resolved, "seed": seed}
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append([p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
    return {"dir": str(path.resolve()), "files": files}


def run_context(cfg: RunConfig, resolved: str, world_size: int,
                device: torch.device) -> dict[str, Any]:
    """What every θ0 result of this run depends on besides its inputs."""
    ds_config = Path(cfg.runtime.ds_config)
    return {
        "format": FORMAT,
        "model": _model_identity(resolved, cfg.runtime.seed),
        "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation,
        "world_size": world_size, "zero_stage": cfg.runtime.zero_stage,
        "ds_config": (digest(ds_config.read_text()) if ds_config.is_file()
                      else cfg.runtime.ds_config),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {p: _version(p) for p in ("torch", "transformers", "deepspeed")},
    }


def for_run(cfg: RunConfig, resolved: str, world_size: int, device: torch.device) -> Theta0Cache:
    """The cache ``runtime.theta0_cache`` names for this run (a no-op one when unset)."""
    root = cfg.runtime.theta0_cache
    return Theta0Cache(root, run_context(cfg, resolved, world_size, device)) if root \
        else Theta0Cache.off()


class Theta0Cache:
    """Memoises θ0's generations and tensors under ``root`` (None: computes every time).

    Every call is a collective on more than one rank (a broadcast), made by every rank in the
    same order, as the computations it replaces are.
    """

    def __init__(self, root: str | Path | None, context: dict[str, Any]) -> None:
        self.root = Path(root).expanduser() / "theta0" if root else None
        self.context = context
        self.hits: list[str] = []  # what was read, in order (reported by the run)

    @classmethod
    def off(cls) -> Theta0Cache:
        """A cache that keeps nothing: every call computes."""
        return cls(None, {})

    def generations(self, what: str, prompt_ids: Sequence[list[int]], settings: dict[str, Any],
                    compute: Callable[[], Share]) -> Share:
        """``compute()``'s greedy answers to ``prompt_ids`` (every prompt, in order), or the
        entry a run with the same context, prompts and ``settings`` wrote."""
        n = len(prompt_ids)

        def load(path: Path, key: str) -> Share:
            entry = json.loads(path.read_text(encoding="utf-8"))
            tokens, texts = entry["tokens"], entry["texts"]
            if (entry.get("key") != key or len(tokens) != n or len(texts) != n
                    or not all(isinstance(t, int) for row in tokens for t in row)
                    or not all(isinstance(t, str) for t in texts)):
                raise ValueError("its key or its shape does not match")
            return Share(list(range(n)), texts, tokens)

        def save(path: Path, key: str, share: Share) -> None:
            atomic_write(path, json.dumps({"key": key, "what": what, "tokens": share.tokens,
                                           "texts": share.texts}))

        inputs = {"prompt_ids": [list(p) for p in prompt_ids], "settings": settings}
        return self._memo("generations", what, inputs, ".json", load, save, compute)

    def tensors(self, what: str, inputs: Any,
                compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``compute()``'s named CPU tensors, or the entry of a run with the same context and
        ``inputs`` (anything JSON can hold that determines the result)."""

        def load(path: Path, key: str) -> dict[str, torch.Tensor]:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") != key:
                    raise ValueError("its key does not match")
                return {name: fh.get_tensor(name) for name in fh.keys()}

        def save(path: Path, key: str, value: dict[str, torch.Tensor]) -> None:
            from safetensors.torch import save_file

            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in value.items()}, str(tmp),
                      metadata={"key": key, "what": what})
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)

        return self._memo("tensors", what, inputs, ".safetensors", load, save, compute)

    def _memo(self, kind: str, what: str, inputs: Any, suffix: str, load, save, compute):
        if self.root is None:
            return compute()
        key = digest({"context": self.context, "kind": kind, "inputs": inputs})
        path = self.root / f"{kind}-{key[:32]}{suffix}"
        rank, _ = world()
        entry = None
        if rank == 0 and path.is_file():
            try:
                entry = load(path, key)
            except Exception as exc:  # torn, edited or foreign: recompute, never trust it
                log.warning("θ0 cache: %s cannot be used (%s: %s); recomputing %s", path,
                            type(exc).__name__, exc, what)
        entry = broadcast_object(entry)
        if entry is not None:
            self.hits.append(what)
            if rank == 0:
                log.info("θ0 cache: %s read from %s", what, path)
            return entry
        value = compute()
        if rank == 0:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                save(path, key, value)
            except OSError as exc:  # a full or read-only disk costs the next run time, not this one
                log.warning("θ0 cache: could not write %s (%s)", path, exc)
        return value
