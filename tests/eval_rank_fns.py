"""Evaluation functions that tests run inside real rank processes (see tests/distributed.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from u2a_dist.config import ModelConfig, config_from_dict
from u2a_dist.data.builtin import builtin_prompts
from u2a_dist.models import build_tiny_model, load_tokenizer

NOISE = 0.3


def perturbed_tiny(seed: int = 1, noise: float = NOISE) -> torch.nn.Module:
    """The tiny model with seeded noise on every weight: at init it repeats one token, perturbed
    it gives varied text of varied length (some prompts end at eos early, others run to the cap).
    """
    model = build_tiny_model(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


def tiny_prompt_ids(n: int, max_length: int = 64) -> list[list[int]]:
    from u2a_dist.generation import encode_prompts

    tokenizer = load_tokenizer(ModelConfig())
    prompts = (builtin_prompts("harmful") + builtin_prompts("harmless"))[:n]
    return encode_prompts(tokenizer, prompts, max_length)


def _cfg(out: str, **eval_section: Any) -> dict:
    from tests.conftest import tiny_config

    return tiny_config(out, eval={"every": 3, "target": None, "batch_size": 2, **eval_section})


def sharded_generation(n: int, batch_size: int, max_new_tokens: int,
                       out: str) -> dict[str, Any]:
    """Generate with a ZeRO-3 (inference) engine: this rank's share and the gathered whole."""
    from u2a_dist.engine import Engine
    from u2a_dist.generation import gather_shares, generate_share

    cfg = config_from_dict(_cfg(out, batch_size=batch_size))
    tokenizer = load_tokenizer(cfg.model)
    engine = Engine(cfg, perturbed_tiny(), dist.get_world_size(), train=False)
    ids = tiny_prompt_ids(n)
    share = generate_share(engine.module, tokenizer, ids, batch_size, max_new_tokens)
    texts = gather_shares(share, n).texts
    partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in engine.params
                      if p.ds_numel >= dist.get_world_size())
    return {"rank": dist.get_rank(), "indices": share.indices, "share": share.texts,
            "texts": texts, "partitioned": partitioned}


def train_with_eval(cfgs: list[dict]) -> list[dict[str, Any]]:
    """Train tiny runs (one after another) with generation-based evaluation; return each run's
    result, metrics log, best.json and reference answers."""
    import json
    from pathlib import Path

    from u2a_dist.rundir import RunDir
    from u2a_dist.trainer import Trainer

    outs = []
    for cfg in cfgs:
        config = config_from_dict(cfg)
        run_dir = RunDir(config.out)
        if dist.get_rank() == 0:
            run_dir.prepare(config)
        dist.barrier()
        trainer = Trainer(config, run_dir)
        result = trainer.train()
        dist.barrier()
        best = Path(config.out) / "best.json"
        outs.append({"result": result, "metrics": run_dir.read_metrics(),
                     "best": json.loads(best.read_text()) if best.is_file() else None,
                     "reference_answers": trainer.gen_eval.reference_answers})
    return outs


def recipe_parts(cfg: dict) -> dict[str, Any]:
    """A trainer with a `prompts` retain set: the θ0 answers it made, and the evaluation copy
    (whole parameters) against the ZeRO-3 partitions, before and after one step."""
    from u2a_dist.generation import generate
    from u2a_dist.trainer import Trainer

    config = config_from_dict(cfg)
    trainer = Trainer(config, None)

    def copy_error() -> float:
        full = trainer.engine.full_state_dict()
        copy = dict(trainer.eval_model().named_parameters())
        return max(float((copy[k] - v).abs().max()) for k, v in full.items() if k in copy)

    ids = tiny_prompt_ids(6)
    before = copy_error()
    trainer.train_step()
    after = copy_error()
    plain = generate(trainer.eval_model(), trainer.tokenizer, ids, 2, 8).texts
    synced = generate(trainer.engine.module, trainer.tokenizer, ids, 2, 8).texts
    return {"retain_tokens": [item["input_ids"] for item in trainer.retain],
            "retain_labels": [item["labels"] for item in trainer.retain],
            "copy_error_before": before, "copy_error_after": after,
            "plain": plain, "synced": synced, "kl_weight": config.unlearn.retain_kl_weight,
            "partitioned": trainer.engine.partitioned}
