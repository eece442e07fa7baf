"""Offline export: a DeepSpeed (ZeRO) checkpoint of a run -> ``model/`` for from_pretrained.

In-run export goes through ``Trainer.export`` (gathered live weights); this path needs no process
group: DeepSpeed's ``zero_to_fp32`` merges the per-rank partitions on one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from u2a_dist.config import load_config
from u2a_dist.rundir import RunDir


def _locate(checkpoint: str | Path) -> tuple[Path, Path, str]:
    """(run dir, checkpoints dir, tag) from a run directory or a checkpoints/<tag> path."""
    path = Path(checkpoint)
    if (path / "config.yaml").is_file():
        run = RunDir(path)
        tag = run.latest_checkpoint()
        if tag is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint")
        return path, run.checkpoints, tag
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint")
        return path.parent.parent, path.parent, path.name
    raise FileNotFoundError(f"{path}: neither a run directory nor a run's checkpoints/<tag>")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir

    run, ckpt_dir, tag = _locate(checkpoint)
    cfg = load_config(run / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    resolved = resolve_model_dir(cfg.model)
    model = load_model(cfg.model, resolved, seed=cfg.runtime.seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{ckpt_dir / tag}: checkpoint does not match the model "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]})")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(cfg.model, resolved).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
