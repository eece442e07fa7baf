"""Checkpoints that survive a crash at any point, and loading them without executing code.

Layout under ``<run>/checkpoints``: one directory per checkpoint, named ``step{k}`` (or
``step{k}.{n}`` when a later save at the same step must not replace a tag that ``latest``
may name), plus the ``latest`` pointer. A save writes everything under
``tmp-step{k}``, fsyncs it, writes :data:`COMPLETE` (the list of files and their sizes) last,
renames the directory into place and only then swaps ``latest`` atomically; older checkpoints
are pruned after that, never the one ``latest`` names. So at every instant the newest
complete checkpoint on disk is a whole one, and resuming takes it
(:meth:`CheckpointStore.resume_tag`), warning when ``latest`` is dangling or names something
else; if tags exist but none is complete, resuming is an error, never a silent restart.

No pickle from a run directory: the trainer's state is safetensors + JSON
(:func:`save_trainer_state`), and DeepSpeed's own files, which are pickles, are read through
:func:`safe_torch_load`: ``torch.load(weights_only=True)`` with an allow-list of the two
DeepSpeed classes its optimizer states hold. A payload that needs anything else is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from u2a_dist.fsio import CheckpointError, atomic_write, fsync_path

log = logging.getLogger(__name__)

COMPLETE = "u2a_complete.json"
TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
TAG_RE = re.compile(r"^step(\d+)(?:\.(\d+))?$")
#: Crash-injection hook for tests: ``RANK:POINT[:STEP]`` kills that rank with SIGKILL at POINT
#: of a checkpoint save: ``write`` (its files written, not sealed), ``before_swap`` (sealed, not
#: in place), ``during_swap`` (in place, ``latest`` not yet swapped), ``after_swap`` (swapped,
#: not pruned); ``final_`` + one of the last three: the same in the end-of-run save.
CRASH_ENV = "U2A_CRASH_AT"


def crash_point(point: str, rank: int, step: int) -> None:
    """Die here, like a killed process, when ``U2A_CRASH_AT`` names this rank and point."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != rank or parts[1] != point or (len(parts) > 2 and int(parts[2]) != step):
        return
    print(f"[u2a] {CRASH_ENV}: rank {rank} killed at checkpoint point {point!r}, step {step}",
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _tag_key(name: str) -> tuple[int, int] | None:
    m = TAG_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def tag_step(tag: str) -> int:
    key = _tag_key(tag)
    if key is None:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (step<k>[.<n>])")
    return key[0]


class CheckpointStore:
    """The checkpoints of one run directory (shared by every rank's filesystem view)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- reading

    def tags(self) -> list[str]:
        """Checkpoint directories (complete or not), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _tag_key(p.name)]
        return sorted(found, key=_tag_key)

    def exists(self) -> bool:
        return bool(self.tags()) or (self.root / "latest").is_file()

    def problem(self, tag: str) -> str | None:
        """Why ``tag`` is not a complete checkpoint, or None when it is one."""
        if _tag_key(tag) is None:
            return "not a checkpoint tag"
        path = self.root / tag
        if not path.is_dir():
            return "no such directory"
        try:
            manifest = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"no valid {COMPLETE} (the save did not finish)"
        for name, size in files.items():
            f = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
        return None

    def pointer(self) -> str | None:
        path = self.root / "latest"
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return "<unreadable>"

    def resume_tag(self) -> str | None:
        """The newest complete checkpoint; None when there is none and nothing was saved.

        ``latest`` is a hint: when it is dangling, invalid or older than a complete
        checkpoint that a crash left unannounced, the newest complete one wins, with a warning.
        Tags without any complete one are an error: restarting silently would redo (and log
        twice) steps whose results are on disk.
        """
        complete = [t for t in self.tags() if self.problem(t) is None]
        pointer = self.pointer()
        if not complete:
            if self.tags() or pointer is not None:
                why = (f"checkpoints/latest names {pointer!r} ({self.problem(pointer)})"
                       if pointer is not None else "no checkpoint is complete")
                raise CheckpointError(
                    f"{self.root}: {why}, and no other complete checkpoint exists "
                    f"(found {self.tags()}); refusing to restart from step 0 over a run that "
                    "saved checkpoints. Remove the run directory (or its checkpoints/) to start "
                    "over")
            return None
        newest = complete[-1]
        if pointer != newest:
            why = "missing" if pointer is None else (
                f"names {pointer!r}: {self.problem(pointer)}" if self.problem(pointer)
                else f"names the older {pointer!r}")
            log.warning("%s/latest %s; resuming from the newest complete checkpoint %s",
                        self.root, why, newest)
            print(f"[u2a] warning: {self.root}/latest {why}; resuming from the newest complete "
                  f"checkpoint {newest}", flush=True)
        return newest

    # ----------------------------------------------------------------- writing

    def begin(self, step: int) -> str:
        """(rank 0) A fresh temporary directory for a save at ``step``; returns its tag."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = f"tmp-step{step}"
        shutil.rmtree(self.root / tmp, ignore_errors=True)  # a crashed save's leftovers
        return tmp

    def commit(self, tmp: str, step: int, rank: int = 0, label: str = "") -> str:
        """(rank 0, after every rank wrote its files) Seal, move into place, swap ``latest``,
        prune. Returns the tag. ``label`` prefixes the crash points (``final_``: the end-of-run
        save)."""
        src = self.root / tmp
        files = {}
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            fsync_path(f)
            files[str(f.relative_to(src))] = f.stat().st_size
        atomic_write(src / COMPLETE, json.dumps({"step": step, "files": files}) + "\n")
        crash_point(label + "before_swap", rank, step)
        tag = f"step{step}"
        n = 0
        while (self.root / tag).exists():  # never replace an existing tag in place
            n += 1
            tag = f"step{step}.{n}"
        src.rename(self.root / tag)
        fsync_path(self.root)
        crash_point(label + "during_swap", rank, step)
        atomic_write(self.root / "latest", tag + "\n")
        crash_point(label + "after_swap", rank, step)
        self.prune(keep=tag)
        return tag

    def prune(self, keep: str, max_keep: int = 2) -> None:
        """Remove all but the newest ``max_keep`` checkpoints, and temporaries of other saves;
        ``keep`` (what ``latest`` names) always stays."""
        for tag in self.tags()[:-max_keep]:
            if tag != keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("tmp-step"):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------- the trainer's state

def save_trainer_state(directory: Path, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    """Tensors as safetensors, everything else as JSON (no pickle)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(directory / TRAINER_STATE_TENSORS))
    (directory / TRAINER_STATE_JSON).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def load_trainer_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path, meta_path = directory / TRAINER_STATE_TENSORS, directory / TRAINER_STATE_JSON
    if not tensors_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{directory}: no {TRAINER_STATE_JSON} + {TRAINER_STATE_TENSORS} "
                              "(a checkpoint of an older u2a, whose pickled trainer_state.pt is "
                              "not loaded); start the run again in a new directory")
    try:
        tensors = load_file(str(tensors_path))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory}: unreadable trainer state ({exc})") from None
    return tensors, meta


# --------------------------------------------------------------------- DeepSpeed's pickles

def _deepspeed_safe_globals() -> list[Any]:
    """What DeepSpeed's checkpoints hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-0..3 fp32/bf16 saves)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


@contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within: every ``torch.load`` (DeepSpeed's included) is ``weights_only=True`` with only
    :func:`_deepspeed_safe_globals` allowed; anything else in a pickle raises CheckpointError."""
    original = torch.load
    allowed = _deepspeed_safe_globals()

    def guarded(f, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:  # what weights_only raises for any other global
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = found.group(1) if found else str(exc).splitlines()[-1][:200]
            raise CheckpointError(
                f"{f}: refused to load: it holds a pickled {what}, beyond the tensors and "
                "DeepSpeed optimizer state a checkpoint may hold (nothing in it was run)") from None

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
