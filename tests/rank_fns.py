"""Functions that tests run inside real rank processes (see tests/distributed.py)."""

from __future__ import annotations

from typing import Any

import torch

from u2a_dist.config import config_from_dict
from u2a_dist.rundir import RunDir
from u2a_dist.trainer import Trainer


def train_report(cfg: dict, steps: int, save: bool = False, export: str | None = None,
                 prepare: bool = True) -> dict[str, Any]:
    """Train `steps` steps and report losses, partition sizes and (optionally) export."""
    config = config_from_dict(cfg)
    run_dir = RunDir(config.out)
    if prepare and torch.distributed.get_rank() == 0:
        run_dir.prepare(config)
    torch.distributed.barrier()
    trainer = Trainer(config, run_dir)
    losses = []
    trainer.train(steps=steps, progress=lambda m: losses.append(m["loss"]))
    if save:
        trainer.save_checkpoint()
    out: dict[str, Any] = {
        "losses": losses,
        "resumed_from": trainer.resumed_from,
        "partitions": [(tuple(p.ds_shape), p.ds_numel, p.ds_tensor.numel())
                       for p in trainer.engine.params],
        "state": trainer.engine.full_state_dict(),
    }
    if export:
        trainer.export(export)
        model = trainer.engine.module
        model.eval()
        ids = torch.tensor([[5, 17, 99, 120, 33, 2, 250]])
        with torch.no_grad():
            out["logits"] = model(input_ids=ids).logits
    return out
