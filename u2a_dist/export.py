"""Export a model directory for ``from_pretrained``: in-run (gathered live weights, from the
trainer) or offline from a DeepSpeed (ZeRO) checkpoint of a run (``u2a export``), which needs
no process group: DeepSpeed's ``zero_to_fp32`` merges the per-rank partitions on one process,
its pickles read through :func:`u2a_dist.checkpoint.safe_torch_load`.

The output directory is replaced only when u2a made it (its marker), never when it holds
anything else, and it may not overlap the run it reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from u2a_dist.checkpoint import CheckpointError, CheckpointStore, safe_torch_load
from u2a_dist.config import ConfigError, RunConfig, load_config
from u2a_dist.fsio import atomic_write, check_disjoint, is_marked, mark
from u2a_dist.model_card import build_model_card

#: Where a LoRA run's adapters go inside its exported model directory.
ADAPTER_DIR = "adapter"
#: What an export of a LoRA model holds: adapters and merged model (a run's ``model/``), the
#: peft adapter directory only (``u2a export``), or the merged model only (``u2a export --merge``).
LoraLayout = Literal["both", "adapter", "merged"]
LORA_LAYOUTS: tuple[str, ...] = get_args(LoraLayout)


def _locate(checkpoint: str | Path) -> tuple[Path, Path, str]:
    """(run dir, checkpoints dir, tag) from a run directory or a checkpoints/<tag> path."""
    path = Path(checkpoint)
    if (path / "config.yaml").is_file():
        store = CheckpointStore(path / "checkpoints")
        tag = store.resume_tag()
        if tag is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint")
        return path, store.root, tag
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        store = CheckpointStore(path.parent)
        if (problem := store.problem(path.name)) is not None:
            raise FileNotFoundError(f"{path}: not a complete checkpoint ({problem})")
        return path.parent.parent, path.parent, path.name
    raise FileNotFoundError(f"{path}: neither a run directory nor a run's checkpoints/<tag>")


def check_weights(state: dict[str, torch.Tensor], bound: float, where: str) -> None:
    """Refuse weights that are non-finite or above ``bound`` in magnitude (a blown-up run)."""
    for name, t in state.items():
        if t.is_floating_point() and not (torch.isfinite(t).all() and t.abs().max() <= bound):
            raise CheckpointError(f"{where}: parameter {name} is non-finite or above "
                                  f"unlearn.max_param_abs={bound:g}; not exporting it")


def write_model_card(model_dir: Path, cfg: RunConfig, summary: dict[str, Any],
                     run_dir: str | Path) -> Path:
    """``model_dir/README.md``, the Hub's model card (u2a_dist.model_card). A run writes it
    after its summary exists, which is after the weights: the "after" metrics need them."""
    path = Path(model_dir) / "README.md"
    atomic_write(path, build_model_card(cfg, summary, run_dir=str(run_dir)))
    return path


def write_model_dir(model: torch.nn.Module, tokenizer, out: Path,
                    card: str | None = None, lora_layout: LoraLayout = "both") -> Path:
    """``model/``-style directory (safetensors + config + tokenizer, and ``card`` as its
    README.md when given), replacing ``out`` only when it is empty or an earlier u2a export;
    written under a temporary name first. A peft model (``model.lora``) is written as
    ``lora_layout`` says: ``"both"`` (a run's ``model/``) its adapters as ``adapter/``
    (``PeftModel.from_pretrained(base, out / "adapter")``) and, at the top, the base with the
    adapters merged in, for ``AutoModelForCausalLM.from_pretrained``; ``"adapter"`` the adapter
    directory only, at the top (``PeftModel.from_pretrained(base, out)``); ``"merged"`` the
    merged model only. A model without adapters is a plain model whatever the layout."""
    if lora_layout not in LORA_LAYOUTS:
        raise ValueError(f"lora_layout must be one of {LORA_LAYOUTS}, not {lora_layout!r}")
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_marked(out))):
        raise ConfigError(f"{out} exists and is not a u2a export (no marker): not replacing it; "
                          "choose a new or empty directory")
    tmp = out.with_name(f".{out.name}.u2a-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):  # peft: the adapters, then merged (in place)
        if lora_layout != "merged":
            model.save_pretrained(tmp / ADAPTER_DIR if lora_layout == "both" else tmp,
                                  safe_serialization=True)
        if lora_layout != "adapter":
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if card is not None:
        atomic_write(tmp / "README.md", card)
    mark(tmp, "export")
    if out.exists():
        old = out.with_name(f".{out.name}.u2a-old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, merge: bool = False) -> Path:
    """``out`` from a run's latest complete checkpoint (or the ``checkpoints/<tag>`` given). A
    LoRA run's export is its peft adapter directory (``PeftModel.from_pretrained(base, out)``),
    or with ``merge`` the base with the adapters merged in, a plain model for
    ``AutoModelForCausalLM.from_pretrained``; a full fine-tuning run's is a plain model either
    way."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir

    run, ckpt_dir, tag = _locate(checkpoint)
    check_disjoint(Path(out), [run], what="--out")
    cfg = load_config(run / "config.yaml")
    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    check_weights(state, cfg.unlearn.max_param_abs, str(ckpt_dir / tag))
    resolved = resolve_model_dir(cfg.model)
    model = load_model(cfg.model, resolved, seed=cfg.runtime.seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if model.config.tie_word_embeddings else set()
    # a LoRA run's checkpoint holds the adapters only: the frozen base is θ0's, loaded above
    tied |= {k for k, p in model.named_parameters() if not p.requires_grad} \
        if cfg.model.lora is not None else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{ckpt_dir / tag}: checkpoint does not match the model "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]})")
    # the card's before/after table comes from the run's summary; a run that has none (it
    # stopped early) still gets a card, with an empty table
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    card = build_model_card(cfg, summary, run_dir=str(run))
    return write_model_dir(model, load_tokenizer(cfg.model, resolved), Path(out), card=card,
                           lora_layout="merged" if merge else "adapter")
