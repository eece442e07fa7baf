"""The driver's checks before any rank starts: bad config, model or data is reported before the
run directory is touched, so it never leaves a half-made run behind.

Kept apart from :mod:`u2a_dist.job` (what ranks run) so that the driver imports no model
classes, trainer or DeepSpeed engine: a `u2a run` that fails here fails in seconds.
"""

from __future__ import annotations

from pathlib import Path

from u2a_dist.config import RunConfig
from u2a_dist.data.examples import (
    load_completions,
    load_pairs,
    mismatch_answers,
    with_rejected_refusals,
)
from u2a_dist.data_spec import as_list, spec_paths
from u2a_dist.engine import build_ds_config, resolve_ds_config_path
from u2a_dist.evaluate import check_eval_inputs, training_prompt_keys
from u2a_dist.fsio import check_disjoint
from u2a_dist.models import load_tokenizer, resolve_model_dir


def preflight(cfg: RunConfig) -> None:
    """Resolve (convert once) the model, check the tokenizer and read every data spec."""
    check_disjoint(Path(cfg.out), input_paths(cfg))
    build_ds_config(cfg, cfg.runtime.world_size)
    load_tokenizer(cfg.model, resolve_model_dir(cfg.model))
    forget = load_completions(cfg.data.forget)
    if cfg.data.mismatch is not None:
        mismatch_answers(forget, load_completions(cfg.data.mismatch),
                         spec_paths(cfg.data.mismatch))
    if cfg.data.pa is not None:
        pairs = load_pairs(cfg.data.pa)
        if cfg.data.pa_refusals is not None:  # bad input fails here, before any rank starts
            with_rejected_refusals(pairs, [c.response for c in
                                           load_completions(cfg.data.pa_refusals)],
                                   spec_paths(cfg.data.pa_refusals))
    training_prompt_keys(cfg, always=True)  # reads the retain specs too (prompts or completions)
    check_eval_inputs(cfg)  # held-out pairs, prompt sets (held out?), eval.retain and eval.judge


def input_paths(cfg: RunConfig) -> list[Path]:
    """The local files and directories a run reads (data specs, model, DeepSpeed JSON, judge):
    its output directory may overlap none of them."""
    specs = [s for name in ("forget", "pa", "pa_eval", "retain", "mismatch", "refusals",
                            "pa_refusals")
             for s in as_list(getattr(cfg.data, name))]
    specs += [s for name in ("harmful_prompts", "harmless_prompts", "retain")
              for s in as_list(getattr(cfg.eval, name))]
    paths = [Path(s.path) for s in specs] + [Path(cfg.model.name_or_path)]
    if cfg.eval.judge is not None:
        paths.append(Path(cfg.eval.judge))
    paths.append(resolve_ds_config_path(cfg.runtime.ds_config))
    return [p for p in paths if p.exists()]
