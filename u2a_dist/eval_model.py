"""``u2a eval``: the metrics of a run's evaluation for any model, against the run's reference
model, written to ``eval.json`` and ``generations.jsonl``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from u2a_dist import progress
from u2a_dist.config import RunConfig
from u2a_dist.data.examples import load_pairs
from u2a_dist.evaluate import (
    GenerationEval,
    check_eval_inputs,
    encode_pairs,
    pa_metrics,
    pair_logps,
    training_prompt_keys,
)
from u2a_dist.fsio import atomic_write, claim_dir
from u2a_dist.judges import is_refusal
from u2a_dist.sharded import world
from u2a_dist.theta0_cache import Theta0Cache, for_run


def evaluate_model(cfg: RunConfig, model_path: str, out_dir: str | Path | None = None
                   ) -> dict[str, Any]:
    """``u2a eval``: the metrics of ``cfg.eval`` for the model at ``model_path`` against the
    reference ``cfg.model``, in this process (world size 1, or every rank of a process group:
    generation and log-prob passes are sharded). Writes ``eval.json`` and ``generations.jsonl``
    to ``out_dir`` (default ``cfg.out``) on rank 0; returns the eval.json object.
    """
    t_start = time.perf_counter()
    with progress.phase("setup", what="judge, models and tokenizer"):
        judge, result, model, reference, tokenizer, same = _load(cfg, model_path)
    result["timing/load_s"] = time.perf_counter() - t_start
    if cfg.data.pa_eval is not None:
        with progress.phase("evaluation", what="held-out pairs"):
            result.update(_pa(cfg, model, reference, tokenizer, same))
    cache = _theta0_cache(cfg, reference)
    gen = GenerationEval(cfg, tokenizer, judge=judge, exclude=training_prompt_keys(cfg),
                         theta0_cache=cache)
    if gen.enabled:
        t0 = time.perf_counter()
        with progress.phase("evaluation", what="prompts"):
            if not same:
                result["timing/eval_reference_s"] = gen.prepare(reference)
            result.update(gen(model, is_reference=same))
        result["eval/n_harmful"] = len(gen.harmful)
        result["eval/n_harmless"] = len(gen.harmless)
        result["eval/n_excluded"] = gen.excluded
        result["timing/generation_eval_s"] = time.perf_counter() - t0
    result["timing/eval_s"] = time.perf_counter() - t_start
    if world()[0] == 0:
        _write_eval(Path(out_dir if out_dir is not None else cfg.out), result, gen)
    return result


def _load(cfg: RunConfig, model_path: str) -> tuple[Any, dict[str, Any], Any, Any, Any, bool]:
    """The judge, the result's header, the model, the reference, the tokenizer, and whether
    model and reference are the same."""
    from u2a_dist.device import comm_device, resolve_device
    from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir

    judge = check_eval_inputs(cfg)
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(model_path))
    model_dir, ref_dir = resolve_model_dir(model_cfg), resolve_model_dir(cfg.model)
    same = _same_model(model_dir, ref_dir)
    tokenizer = load_tokenizer(model_cfg, model_dir)
    # runtime.device on one process; inside a process group, the group's device (NCCL: GPU)
    device = comm_device() if dist.is_initialized() else resolve_device(cfg.runtime.device)
    # an exported model/ is whole (a LoRA run's adapters merged into it); θ0 has none
    model = load_model(model_cfg, model_dir, seed=cfg.runtime.seed,
                       adapters=False).eval().to(device)
    reference = model if same else \
        load_model(cfg.model, ref_dir, seed=cfg.runtime.seed, adapters=False).eval().to(device)
    result: dict[str, Any] = {"model": str(model_path), "reference": cfg.model.name_or_path,
                              "reference_is_model": same, "device": str(device)}
    return judge, result, model, reference, tokenizer, same


def _theta0_cache(cfg: RunConfig, reference) -> Theta0Cache:
    """``runtime.theta0_cache``: the reference's answers, as a training run keeps them."""
    from u2a_dist.device import model_device
    from u2a_dist.models import resolve_model_dir

    return for_run(cfg, resolve_model_dir(cfg.model), world()[1], model_device(reference))


def _pa(cfg: RunConfig, model, reference, tokenizer, same: bool) -> dict[str, Any]:
    """The held-out pairs' metrics of ``model`` against ``reference``."""
    t0 = time.perf_counter()
    bs, pad = cfg.eval.batch_size, tokenizer.pad_token_id
    pairs = encode_pairs(tokenizer, load_pairs(cfg.data.pa_eval), cfg.data.max_length)
    chosen, rejected = pair_logps(model, pairs, pad, bs)
    ref = (chosen, rejected) if same else pair_logps(reference, pairs, pad, bs)
    out = pa_metrics(chosen, rejected, *ref, cfg.selector.dpo_beta)
    out["pa/n_pairs"] = len(pairs)
    out["timing/pa_s"] = time.perf_counter() - t0
    return out


def _same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _write_eval(out: Path, result: dict[str, Any], gen: GenerationEval) -> None:
    claim_dir(out, "eval")
    atomic_write(out / "eval.json", json.dumps(result, indent=2) + "\n")
    # A red-team log: with a judge, each harmful answer's verdict (`harmful`), so that
    # `{schema: completions, filter: {kind: harmful, harmful: 1}}` reads the model's own
    # judged compliances as negatives to unlearn.
    judged = gen.last_judged or []
    with open(out / "generations.jsonl", "w") as fh:
        for kind, prompts in (("harmful", gen.harmful), ("harmless", gen.harmless)):
            for i, (p, text) in enumerate(zip(prompts, gen.last_generations.get(kind, []))):
                row = {"kind": kind, "id": p.id, "prompt": p.prompt, "response": text,
                       "refusal": is_refusal(text)}
                if kind == "harmful" and i < len(judged):
                    row["harmful"] = int(judged[i])
                fh.write(json.dumps(row) + "\n")
