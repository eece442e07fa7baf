"""Scaling of u2a-dist: step time, tokens/s, memory and communication per rank, by ZeRO stage,
world size, model and device; HVP cost over gradient cost; selector time against N and K.

    python benchmarks/scaling.py [--models tiny,smollm2] [--stages 0,2,3,3off] [--world 1,2]
        [--devices cpu,gpu] [--steps 3] [--selector-stages 3] [--n 16,64,256] [--k 1,2,4,8]
        [--out DIR] [--shared-data DIR]
    python benchmarks/scaling.py --merge A.json,B.json,... [--out DIR]

Every configuration runs in its own W real rank processes (gloo on 127.0.0.1, the launcher's
rendezvous store; ``nccl`` on a GPU), which build the product's own ``Trainer`` (DeepSpeed engine
at that stage, fp32, AdamW, GA on the real negatives of ``../shared/data/refusal/completions``,
J = DPO on the refusal pairs) and measure, one phase after the other:

- ``step``: ``--steps`` optimiser steps of ``Trainer.train_step`` after one warm-up step
  (median and minimum seconds, global tokens per step, tokens/s, and each rank's CPU seconds
  per wall second, which shows when other processes starved it);
- ``grad`` / ``hvp``: one gradient pass of the selector's inner objective on the Hessian batch,
  and one finite-difference HVP (2 gradient passes, θ restored), ``--repeats`` times each; the
  ratio of their medians is what DESIGN §3 says should be 2;
- ``forward``: one no-grad pass of the per-example losses over ``--fwd-n`` negatives;
- ``selector`` (stages in ``--selector-stages``): ∇J over the P pairs, the Lanczos spectrum
  estimate (L HVPs), the Neumann series for every K in ``--k`` (K−1 HVPs each), directional
  scores for every N in ``--n`` (2 forward passes over N; 3 before 2026-11-28), and one whole round
  (``selector.hypergradients``) with ``--round-k`` terms over ``--round-n`` negatives;
- memory: each rank's resident-set high-water mark per phase (``VmHWM`` of /proc, reset between
  phases after ``malloc_trim``; ``peak_rss_bytes`` is the highest of them, model loading
  included), and the
  engine's own state: parameter partition, optimizer states and master copies, per rank;
- communication: every ``torch.distributed`` collective (DeepSpeed's included) is counted per
  phase with the bytes each rank sends under ring algorithms.

The ``gpu`` device runs the same phases on CUDA with a plain loop on the same engine, and
``gpu-trainer`` with the product's Trainer (``runtime.device: cuda``); both are skipped, said so
in the results, when CUDA is absent. ``stage 3off`` is ZeRO-3 with parameters and optimizer states
offloaded to the CPU (``ds_configs/zero3_offload.json``); on a CPU-only machine it measures the
offload code path's overhead, not a memory saving.

Variance between processes: ``--launches R`` runs each configuration R times, each time in
fresh rank processes, and reports every timing as the median over the launches (each launch's
own median, slowest rank); ``launch_medians_s`` keeps them all. One launch is one sample of
the processes, not of the machine: on 2 cores the tiny model's W = 2 stage-2 gradient pass took
36, 45, 38, 51 and 44 ms (median of 15 repeats each) in five launches of one run. And the rank
processes of the models in ``--malloc-hugepages`` (default: tiny) get ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`` (glibc's malloc backs its heap with transparent huge pages): the tiny
model's forward pass fits in the caches, and its speed then depends on the physical pages a
process happens to get - in 10 fresh processes the same 16 x 64-token forward took 7.6-9.4 ms
in 6 and 10.8-12.1 ms in 4, and with the tunable 7.2-8.8 ms in all 10
(``benchmarks/process_variance.py``). A W = 2 phase waits for the slower of two processes, so
it fell in the slow group more often than W = 1 did. SmolLM2's working set is far larger than
the caches: it has no such groups (5 processes within 5%), and huge pages made its fwd+bwd 10%
slower, so it runs with glibc's default, like the product.

``--merge`` makes one record of several runs' ``scaling.json`` (CPU results here, GPU results
from a lent machine: ``benchmarks/gpu_run.sh``), each configuration keeping its run's stamp.
``model.name_or_path`` presets ``random:smollm2-135m|360m|1.7b`` time a checkpoint's shape
with random weights where the checkpoint cannot be copied.

Writes ``scaling.json`` (every measurement, per rank), ``scaling.md`` (tables) and
``scaling.png`` under ``--out`` (default ``benchmarks/results``), stamped with hardware, versions
and this command. ``benchmarks/cost_model.py`` calibrates its constants on ``scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    malloc_trim,
    peak_rss_bytes,
    read_hwm_rss,
    reset_hwm,
    stamp,
)

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"

MODELS = {"tiny": "tiny-gpt2", "smollm2": "smollm2-135m-instruct"}
#: stage key -> (ZeRO stage, DeepSpeed JSON; the stage is applied on top by build_ds_config)
STAGES = {"0": (0, "ds_configs/zero3_cpu.json"), "1": (1, "ds_configs/zero3_cpu.json"),
          "2": (2, "ds_configs/zero3_cpu.json"), "3": (3, "ds_configs/zero3_cpu.json"),
          "3off": (3, "ds_configs/zero3_offload.json")}


# =============================================================================================
# communication counter (rank side)
# =============================================================================================


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return int(t.numel() * t.element_size()) if hasattr(t, "numel") else 0


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


# op -> (payload bytes: the whole logical tensor, bytes this rank sends under the standard
# ring algorithms, as a function of W). Ring all-gather/reduce-scatter send (W-1)/W of the
# whole tensor per rank, ring all-reduce twice that; broadcast/reduce count the tensor once.
_OPS: dict[str, Any] = {
    "all_reduce": lambda a, k, w: (_nbytes(_arg(a, k, 0, "tensor")),
                                   2 * (w - 1) / w * _nbytes(_arg(a, k, 0, "tensor"))),
    "all_gather": lambda a, k, w: (w * _nbytes(_arg(a, k, 1, "tensor")),
                                   (w - 1) * _nbytes(_arg(a, k, 1, "tensor"))),
    "all_gather_into_tensor": lambda a, k, w: (
        _nbytes(_arg(a, k, 0, "output_tensor")),
        (w - 1) * _nbytes(_arg(a, k, 1, "input_tensor"))),
    "_all_gather_base": lambda a, k, w: (
        _nbytes(_arg(a, k, 0, "output_tensor")),
        (w - 1) * _nbytes(_arg(a, k, 1, "input_tensor"))),
    "reduce_scatter": lambda a, k, w: (
        w * _nbytes(_arg(a, k, 0, "output")), (w - 1) * _nbytes(_arg(a, k, 0, "output"))),
    "reduce_scatter_tensor": lambda a, k, w: (
        _nbytes(_arg(a, k, 1, "input")), (w - 1) * _nbytes(_arg(a, k, 0, "output"))),
    "_reduce_scatter_base": lambda a, k, w: (
        _nbytes(_arg(a, k, 1, "input")), (w - 1) * _nbytes(_arg(a, k, 0, "output"))),
    "broadcast": lambda a, k, w: (_nbytes(_arg(a, k, 0, "tensor")),
                                  _nbytes(_arg(a, k, 0, "tensor")) if w > 1 else 0),
    "reduce": lambda a, k, w: (_nbytes(_arg(a, k, 0, "tensor")),
                               _nbytes(_arg(a, k, 0, "tensor")) if w > 1 else 0),
    "all_to_all_single": lambda a, k, w: (_nbytes(_arg(a, k, 1, "input")),
                                          (w - 1) / w * _nbytes(_arg(a, k, 1, "input"))),
    "barrier": lambda a, k, w: (0, 0),
}


class CommCounter:
    """Counts every ``torch.distributed`` collective of this process, with its bytes.

    Installed before DeepSpeed builds its communication backend (it keeps references to the
    torch functions), so ZeRO's all-gathers and reduce-scatters are counted as well as u2a's own
    all-reduces. The overhead is one Python call per collective.
    """

    def __init__(self) -> None:
        self.counts: dict[str, list[float]] = {}  # op -> [calls, payload bytes, wire bytes]
        self._world = 1

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, size_fn in _OPS.items():
            original = getattr(dist, name, None) or getattr(c10d, name, None)
            if original is None:
                continue
            wrapped = self._wrap(name, original, size_fn)
            for module in (dist, c10d):
                if hasattr(module, name):
                    setattr(module, name, wrapped)

    def _wrap(self, name: str, original: Any, size_fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                payload, wire = size_fn(args, kwargs, self.world())
            except Exception:  # noqa: BLE001 - an odd call signature: count the call, not bytes
                payload = wire = 0
            row = self.counts.setdefault(name, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += payload
            row[2] += wire
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    def world(self) -> int:
        if self._world == 1:
            import torch.distributed as dist

            if dist.is_initialized():
                self._world = dist.get_world_size()
        return self._world

    def snapshot(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.counts.items()}

    def since(self, snap: dict[str, list[float]]) -> dict[str, Any]:
        """Collectives since ``snap``: per op and in total (calls, payload and wire bytes)."""
        ops = {}
        for name, (calls, payload, wire) in self.counts.items():
            c0, p0, w0 = snap.get(name, [0, 0.0, 0.0])
            if calls - c0:
                ops[name] = {"calls": int(calls - c0), "payload_bytes": int(payload - p0),
                             "wire_bytes": int(wire - w0)}
        return {"calls": sum(o["calls"] for o in ops.values()),
                "wire_bytes": sum(o["wire_bytes"] for o in ops.values()),
                "payload_bytes": sum(o["payload_bytes"] for o in ops.values()), "ops": ops}


# =============================================================================================
# workloads (rank side): what a phase runs, on the Trainer (CPU) or a plain device loop (GPU)
# =============================================================================================


def _arch(model: Any) -> dict[str, Any]:
    """Parameter count and the shape numbers the cost model needs (layers, width, vocabulary).

    ``compute_params``: parameters that take part in matmuls, i.e. all but embedding tables
    used only as look-ups (position embeddings, an untied input embedding): FLOPs per token of
    a forward pass are about 2 x compute_params.
    """
    import torch

    cfg = model.config
    params = list(model.parameters())
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    out_emb = model.get_output_embeddings()
    out_w = out_emb.weight if out_emb is not None else None
    lookup = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
                 if isinstance(m, torch.nn.Embedding) and m.weight is not out_w)
    # Modules that own a parameter not owned by an earlier one: what ZeRO-3 gathers per pass
    # (a tied lm_head reuses the embedding's weight and gathers nothing).
    seen: set[int] = set()
    modules_with_params = 0
    for m in model.modules():
        own = [id(p) for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(own)
        modules_with_params += bool(own)
    return {"params": int(numel), "compute_params": int(numel - lookup),
            "param_tensors": len(params), "param_modules": modules_with_params,
            "layers": int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))),
            "hidden": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
            "heads": int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0))),
            "vocab": int(cfg.vocab_size)}


def _padded_tokens(items: list[dict[str, list[int]]], batches: list[list[int]]) -> int:
    """Tokens the model actually computes on: each batch is padded to its longest row."""
    return sum(len(b) * max(len(items[i]["input_ids"]) for i in b) for b in batches if b)


class TrainerWorkload:
    """The product's code path: ``Trainer.train_step`` and the selector's ``TrainerProblem``."""

    def __init__(self, cfg: Any, device: str) -> None:
        from u2a_dist.selector import TrainerProblem
        from u2a_dist.trainer import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg, None)
        self.engine = self.trainer.engine
        self.problem = TrainerProblem(self.trainer, cfg.selector.hessian_batch)
        self.items = self.trainer.forget.items
        self.rank, self.world = self.trainer.rank, self.trainer.world_size

    def next_step_tokens(self) -> tuple[int, int]:
        """(real, padded) tokens of the next global batch, without consuming the sampler."""
        from u2a_dist.data.tokenize import shard
        from u2a_dist.trainer import BatchSampler

        s = self.trainer.sampler
        peek = BatchSampler(s.support, s.batch_size, s.seed)
        peek.load_state_dict(s.state_dict())
        batch = peek.next_batch()
        real = sum(len(self.items[i]["input_ids"]) for i in batch)
        shards = [shard(batch, r, self.world) for r in range(self.world)]
        return real, _padded_tokens(self.items, shards)

    def train_step(self) -> None:
        self.trainer.train_step()

    def hessian_tokens(self) -> tuple[int, int, int]:
        """(real tokens, padded tokens, micro-batches per rank) of one inner gradient pass."""
        from u2a_dist.passes import padded_shares

        idx = self.problem._hessian_indices()
        per = max(1, self.cfg.unlearn.batch_size // self.world)
        shares = padded_shares(len(idx), self.world, per)
        batches = []
        for share in shares:
            real = [idx[i] if i >= 0 else idx[0] for i in share]  # as inner_grad pads
            batches += [real[j:j + per] for j in range(0, len(real), per)]
        return (sum(len(self.items[i]["input_ids"]) for i in idx),
                _padded_tokens(self.items, batches), len(shares[0]) // per)

    def forward_tokens(self, idx: list[int]) -> tuple[int, int, int]:
        """(real, padded tokens, batches per rank) of one example_losses pass over idx."""
        from u2a_dist.passes import padded_shares

        bs = self.cfg.eval.batch_size
        shares = padded_shares(len(idx), self.world, bs)
        batches = []
        for share in shares:
            filler = next((i for i in share if i >= 0), 0)
            real = [idx[i if i >= 0 else filler] for i in share]
            batches += [real[j:j + bs] for j in range(0, len(real), bs)]
        return (sum(len(self.items[i]["input_ids"]) for i in idx),
                _padded_tokens(self.items, batches), len(shares[0]) // bs)

    def pair_tokens(self) -> tuple[int, int, int, int]:
        """(real tokens, padded tokens, pairs, micro-batches per rank) of one ∇J pass."""
        from u2a_dist.passes import padded_shares

        pairs = self.trainer.pa
        idx = self.problem.outer_indices() if hasattr(self.problem, "outer_indices") \
            else list(range(len(pairs)))
        # TrainerProblem.outer_grad passes unlearn.batch_size pairs per micro-batch
        return _pair_tokens(pairs, idx, self.world, self.cfg.unlearn.batch_size, padded_shares)


def _pair_tokens(pairs: Any, idx: list[int], world: int, bs: int,
                 padded_shares: Any) -> tuple[int, int, int, int]:
    """Tokens of ∇J over the pairs idx: each micro-batch holds the chosen and the rejected
    answers of ``bs`` pairs, padded to its longest sequence."""
    shares = padded_shares(len(idx), world, bs)
    real = sum(len(pairs.chosen[i]["input_ids"]) + len(pairs.rejected[i]["input_ids"])
               for i in idx)
    padded = 0
    for share in shares:
        chunk_idx = [idx[i if i >= 0 else 0] for i in share]
        for j in range(0, len(chunk_idx), bs):
            chunk = chunk_idx[j:j + bs]
            width = max(max(len(pairs.chosen[i]["input_ids"]), len(pairs.rejected[i]["input_ids"]))
                        for i in chunk)
            padded += 2 * len(chunk) * width
    return real, padded, len(idx), len(shares[0]) // bs


class DeviceWorkload:
    """The same phases on an accelerator: a plain GA loop on the same DeepSpeed engine.

    The Trainer builds its batches and weights on the CPU; this loop moves every batch to the
    engine's device. Loss: GA (mean over the batch, scaled by W so DeepSpeed's rank average is
    the global mean) plus the analytic prox gradient, as in ``Trainer.train_step``. The selector
    functions run on :class:`_DeviceProblem`, a ``HyperProblem`` on the same engine.
    """

    def __init__(self, cfg: Any, device: str) -> None:
        import torch

        from u2a_dist.data.examples import load_completions, load_pairs
        from u2a_dist.data.tokenize import encode
        from u2a_dist.engine import Engine
        from u2a_dist.evaluate import encode_pairs
        from u2a_dist.models import load_model, load_tokenizer, resolve_model_dir
        from u2a_dist.passes import world
        from u2a_dist.trainer import BatchSampler, seed_everything

        self.cfg = cfg
        self.rank, self.world = world()
        seed_everything(cfg.runtime.seed)
        resolved = resolve_model_dir(cfg.model)
        self.tokenizer = load_tokenizer(cfg.model, resolved)
        self.pad_id = self.tokenizer.pad_token_id
        examples = load_completions(cfg.data.forget)
        self.items = [encode(self.tokenizer, e.prompt, e.response, e.history,
                             cfg.data.max_length) for e in examples]
        self.ids = [e.id for e in examples]
        self.pa = encode_pairs(self.tokenizer, load_pairs(cfg.data.pa), cfg.data.max_length)
        self.engine = Engine(cfg, load_model(cfg.model, resolved, seed=cfg.runtime.seed),
                             self.world)
        self.device = next(self.engine.module.parameters()).device if device != "cpu" \
            else torch.device("cpu")
        self.theta0 = [t.detach().float().clone() for t in self.engine.local_parts()]
        self.sampler = BatchSampler(list(range(len(self.items))), cfg.unlearn.batch_size,
                                    cfg.runtime.seed)
        self.problem = _DeviceProblem(self)
        self.problem.reference()  # at setup, as the Trainer does: not inside a timed ∇J

    def batch(self, items: list[dict[str, list[int]]]) -> dict[str, Any]:
        from u2a_dist.data.tokenize import collate

        return {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}

    def next_step_tokens(self) -> tuple[int, int]:
        from u2a_dist.data.tokenize import shard
        from u2a_dist.trainer import BatchSampler

        s = self.sampler
        peek = BatchSampler(s.support, s.batch_size, s.seed)
        peek.load_state_dict(s.state_dict())
        batch = peek.next_batch()
        shards = [shard(batch, r, self.world) for r in range(self.world)]
        return (sum(len(self.items[i]["input_ids"]) for i in batch),
                _padded_tokens(self.items, shards))

    def ga_loss(self, idx: list[int]) -> Any:
        from u2a_dist.losses import sequence_logps, unlearn_loss

        logp, ntok = sequence_logps(self.engine.ds, self.batch([self.items[i] for i in idx]))
        return unlearn_loss("ga", logp, ntok, None, self.cfg.unlearn.npo_beta)

    def train_step(self) -> None:
        from u2a_dist.data.tokenize import shard

        local = shard(self.sampler.next_batch(), self.rank, self.world)
        loss = self.world * self.ga_loss(local).sum() / self.cfg.unlearn.batch_size
        self.engine.backward(loss)
        lam = self.cfg.unlearn.prox_lambda
        if lam > 0:
            self.engine.add_to_local_grads([
                lam * (p.detach().float().reshape(-1) - r.reshape(-1))
                for p, r in zip(self.engine.local_parts(), self.theta0)])
        self.engine.step()

    def hessian_tokens(self) -> tuple[int, int, int]:
        idx = self.problem.hessian_indices()
        per = max(1, self.cfg.unlearn.batch_size // self.world)
        mine = idx[self.rank::self.world]
        batches = [mine[j:j + per] for j in range(0, len(mine), per)]
        return (sum(len(self.items[i]["input_ids"]) for i in idx),
                self.world * _padded_tokens(self.items, batches), len(batches))

    def forward_tokens(self, idx: list[int]) -> tuple[int, int, int]:
        bs = self.cfg.eval.batch_size
        per = -(-len(idx) // self.world)
        batches = [idx[j:j + bs] for j in range(0, len(idx), bs)]
        return (sum(len(self.items[i]["input_ids"]) for i in idx),
                _padded_tokens(self.items, batches), -(-per // bs))

    def pair_tokens(self) -> tuple[int, int, int, int]:
        from u2a_dist.passes import padded_shares

        return _pair_tokens(self.pa, list(range(len(self.pa))), self.world,
                            self.cfg.eval.batch_size, padded_shares)


class _DeviceProblem:
    """``HyperProblem`` (u2a_dist.selector) on a :class:`DeviceWorkload`: GA inner loss, DPO J.

    Every rank runs the same number of forward passes (shares padded by repetition, weight 0),
    because ZeRO-3 forward passes are collectives.
    """

    def __init__(self, w: DeviceWorkload) -> None:
        self.w = w
        self.ids = w.ids
        self._ref: tuple[Any, Any] | None = None

    def parts(self) -> list[Any]:
        return self.w.engine.local_parts()

    def zeros(self) -> Any:
        import torch

        from u2a_dist.linalg import ShardedVector

        engine = self.w.engine
        parts = [torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                 for t in engine.local_parts()]
        valid = None
        if engine.stage == 3:
            valid = [max(0, min(p.ds_numel - self.w.rank * p.ds_tensor.numel(),
                                p.ds_tensor.numel())) for p in engine.params]
        return ShardedVector(parts, group=engine.partition_group(), valid_numel=valid)

    def _vector(self, grads: list[Any]) -> Any:
        from u2a_dist.linalg import ShardedVector

        like = self.zeros()
        return ShardedVector([g.reshape(q.shape).float().to(q.device)
                              for g, q in zip(grads, like.parts)],
                             group=like.group, valid_numel=like.valid_numel)

    def _grad(self, losses: list[Any]) -> list[Any]:
        engine, acc = self.w.engine, None
        engine.zero_grad()
        for closure in losses:
            engine.backward(closure())
            grads = engine.local_grads()
            acc = grads if acc is None else [a.add_(g.to(a.device)) for a, g in zip(acc, grads)]
            engine.zero_grad()
        return acc

    def _shares(self, n: int, batch: int) -> list[list[int]]:
        from u2a_dist.passes import padded_shares

        share = padded_shares(n, self.w.world, batch)[self.w.rank]
        return [share[i:i + batch] for i in range(0, len(share), batch)]

    def hessian_indices(self) -> list[int]:
        return list(range(min(self.w.cfg.selector.hessian_batch, len(self.w.items))))

    def inner_grad(self) -> list[Any]:
        import torch

        idx, world = self.hessian_indices(), self.w.world
        per = max(1, self.w.cfg.unlearn.batch_size // world)

        def closure_for(chunk: list[int]) -> Any:
            def closure() -> Any:
                real = [idx[i] if i >= 0 else idx[0] for i in chunk]
                mask = torch.tensor([float(i >= 0) for i in chunk], device=self.w.device)
                return world * (self.w.ga_loss(real) * mask).sum() / len(idx)
            return closure

        return self._grad([closure_for(c) for c in self._shares(len(idx), per)])

    def analytic_curvature(self) -> float:
        return float(self.w.cfg.unlearn.prox_lambda)

    def _logps(self, items: list[dict[str, list[int]]]) -> tuple[Any, Any]:
        import torch

        from u2a_dist.losses import sequence_logps
        from u2a_dist.passes import all_gather_rows, padded_shares

        bs, n = self.w.cfg.eval.batch_size, len(items)
        shares = padded_shares(n, self.w.world, bs)
        mine = shares[self.w.rank]
        filler = next((i for i in mine if i >= 0), 0)
        vals = torch.zeros(len(mine), 2, dtype=torch.float64, device=self.w.device)
        with torch.no_grad():
            for s in range(0, len(mine), bs):
                idx = [i if i >= 0 else filler for i in mine[s:s + bs]]
                logp, ntok = sequence_logps(self.w.engine.ds, self.w.batch([items[i] for i in idx]))
                vals[s:s + len(idx), 0], vals[s:s + len(idx), 1] = logp.double(), ntok.double()
        gathered = all_gather_rows(vals)
        out = torch.zeros(n, 2, dtype=torch.float64)
        for r, share in enumerate(shares):
            for j, i in enumerate(share):
                if i >= 0:
                    out[i] = gathered[r][j].cpu()
        return out[:, 0], out[:, 1]

    def reference(self) -> tuple[Any, Any]:
        """Log-probs of J's chosen and rejected answers at θ0 (computed once)."""
        if self._ref is None:
            pa = self.w.pa
            self._ref = (self._logps(pa.chosen)[0], self._logps(pa.rejected)[0])
        return self._ref

    def outer_grad(self) -> tuple[Any, float]:
        import torch

        from u2a_dist.losses import dpo_loss, sequence_logps

        pa, world, beta = self.w.pa, self.w.world, self.w.cfg.selector.dpo_beta
        self.reference()
        n, total = len(pa), [0.0]

        def closure_for(chunk: list[int]) -> Any:
            def closure() -> Any:
                real = [i if i >= 0 else 0 for i in chunk]
                mask = torch.tensor([float(i >= 0) for i in chunk], device=self.w.device)
                logp, _ = sequence_logps(self.w.engine.ds, self.w.batch(
                    [pa.chosen[i] for i in real] + [pa.rejected[i] for i in real]))
                ref_c = self._ref[0][real].float().to(self.w.device)
                ref_r = self._ref[1][real].float().to(self.w.device)
                loss, _, _ = dpo_loss(logp[:len(real)], logp[len(real):], ref_c, ref_r, beta)
                total[0] += float((loss.detach() * mask).sum())
                return world * (loss * mask).sum() / n
            return closure

        grads = self._grad([closure_for(c) for c in
                            self._shares(n, self.w.cfg.eval.batch_size)])
        # trainer.all_reduce_sum reduces a CPU tensor, which NCCL cannot: sum on the device
        j = torch.tensor([total[0]], dtype=torch.float64, device=self.w.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(j)
        return self._vector(grads), float(j.item()) / n

    def example_losses(self, idx: list[int]) -> tuple[Any, Any]:
        from u2a_dist.losses import unlearn_loss

        logp, ntok = self._logps([self.w.items[i] for i in idx])
        ell = unlearn_loss("ga", logp, ntok, None, self.w.cfg.unlearn.npo_beta)
        return ell, ell

    def example_grad(self, i: int) -> Any:
        return self._vector(self._grad([lambda: self.w.ga_loss([i]).sum()]))


# =============================================================================================
# engine state sizes (rank side)
# =============================================================================================


def _base_optimizer(opt: Any) -> Any:
    """The torch optimizer that DeepSpeed's ZeRO wrapper drives (or ``opt`` itself)."""
    import torch

    seen = 0
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and seen < 5:
        opt = getattr(opt, "optimizer", None)
        seen += 1
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def engine_state(engine: Any) -> dict[str, Any]:
    """This rank's model-state bytes as the engine holds them (after the first step).

    ``param_bytes``: the parameter storage the forward pass reads (ZeRO-3: the partitions
    ``p.ds_tensor``); ``optimizer_state_bytes``: the base optimizer's state (Adam: exp_avg,
    exp_avg_sq); ``master_bytes``: parameters the base optimizer updates that are separate
    copies of the model's (ZeRO's fp32 flat partitions); ``grad_bytes``: gradient storage
    attached to those (measured after a step; DeepSpeed frees some at the step).
    """
    import torch

    parts = engine.local_parts()
    model_ptrs = {t.untyped_storage().data_ptr() for t in parts}
    out: dict[str, Any] = {
        "param_numel": int(sum(t.numel() for t in parts)),
        "param_bytes": int(sum(t.numel() * t.element_size() for t in parts)),
        "param_device": str(parts[0].device) if parts else "cpu",
    }
    base = _base_optimizer(engine.optimizer)
    state_bytes, master, grads, seen = 0, 0, 0, set()
    if base is not None:
        for st in base.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    state_bytes += v.numel() * v.element_size()
        for group in base.param_groups:
            for p in group["params"]:
                ptr = p.untyped_storage().data_ptr()
                if ptr in seen:
                    continue
                seen.add(ptr)
                if ptr not in model_ptrs:
                    master += p.numel() * p.element_size()
                if p.grad is not None:
                    grads += p.grad.numel() * p.grad.element_size()
        out["optimizer_device"] = next(
            (str(v.device) for st in base.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.numel() > 1), None)
    # ZeRO-3 keeps its fp32 master partitions in fp32_partitioned_groups_flat and leaves the
    # base optimizer's param_groups empty outside step(), so they were missed above. DeepSpeed
    # 0.19.8 copies them even for fp32 parameters (its alias test compares a torch.device with
    # a string, which is never equal).
    zero3_flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3_flat is not None:
        for t in zero3_flat:
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr not in model_ptrs and ptr not in seen:
                seen.add(ptr)
                master += t.numel() * t.element_size()
        out["zero3_master_counted"] = True
    out.update({"optimizer_state_bytes": int(state_bytes), "master_bytes": int(master),
                "grad_bytes_after_step": int(grads),
                "optimizer": type(engine.optimizer).__name__,
                "base_optimizer": type(base).__name__ if base is not None else None})
    out["total_bytes"] = out["param_bytes"] + out["optimizer_state_bytes"] + out["master_bytes"]
    return out


# =============================================================================================
# rank main
# =============================================================================================


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _timing(seconds: list[float], cpu: list[float]) -> dict[str, Any]:
    """Median and minimum wall seconds of the repeats, and the process's CPU seconds per wall
    second (about the thread count when the rank had its cores; far less when it was starved
    by other processes or waited on its peers)."""
    return {"times_s": seconds, "median_s": _median(seconds),
            "min_s": min(seconds) if seconds else float("nan"),
            "cpu_per_wall": sum(cpu) / sum(seconds) if seconds and sum(seconds) > 0 else None}


class ForwardCounter:
    """Counts this rank's model forward calls and the tokens they computed on (padded) from
    its creation to :meth:`close`: what one phase really ran, to check the analytic token
    accounting the cost model reads."""

    def __init__(self, model: Any) -> None:
        self.calls = self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True) \
            if model is not None else None

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0

    def close(self, times: int = 1) -> dict[str, float]:
        """Removes the hook; the counts per repeat of the phase (``times`` repeats)."""
        if self._handle is not None:
            self._handle.remove()
        return {"forward_calls": self.calls / times, "tokens": self.tokens / times}


class _Phases:
    """Times collective operations the same way on every rank and snapshots comm and memory."""

    def __init__(self, counter: CommCounter, device: str) -> None:
        self.counter = counter
        self.device = device
        self.cpu_s: list[float] = []  # process CPU seconds of every run(): starvation shows

    def sync(self) -> None:
        import torch
        import torch.distributed as dist

        if _on_gpu(self.device):
            torch.cuda.synchronize()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def run(self, fn: Any) -> tuple[Any, float, dict[str, Any]]:
        """(result, seconds, collectives) of fn(); ranks start together (a barrier first)."""
        self.sync()
        snap = self.counter.snapshot()
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        if _on_gpu(self.device):
            import torch

            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.cpu_s.append(time.process_time() - c0)
        return result, dt, self.counter.since(snap)

    def repeat(self, fn: Any, times: int) -> tuple[Any, float, list[float], dict[str, Any]]:
        """fn() ``times`` times: (last result, median seconds, all seconds, last collectives)."""
        result, seconds, comm = None, [], {}
        for _ in range(max(1, times)):
            result, dt, comm = self.run(fn)
            seconds.append(dt)
        return result, _median(seconds), seconds, comm

    def memory_mark(self) -> dict[str, int]:
        """High-water mark of the phase that just ended; then a fresh mark for the next one.
        On a GPU also the CUDA allocator's peak of allocated (what tensors held) and reserved
        (what the caching allocator took from the device) bytes."""
        hwm, rss = read_hwm_rss()
        out = {"hwm_bytes": hwm, "rss_bytes": rss, "ru_maxrss_bytes": peak_rss_bytes()}
        if _on_gpu(self.device):
            import torch

            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            out["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        malloc_trim()
        reset_hwm()
        return out


#: Devices whose phases run on the product's Trainer (the others on DeviceWorkload's loop).
TRAINER_DEVICES = ("cpu", "gpu-trainer")


def _on_gpu(device: str) -> bool:
    return device in ("gpu", "gpu-trainer")


def _rank_config(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    stage, ds_config = STAGES[spec["stage"]]
    if spec["data"] == "refusal":
        shared = Path(spec.get("shared_data") or SHARED)
        forget = {"path": str(shared / "refusal" / "completions"), "schema": "completions",
                  "limit": spec["n_forget"]}
        pa = {"path": str(shared / "refusal" / "refusal_pairs.jsonl"),
              "schema": "refusal-pairs", "split": "train", "limit": spec["pa_pairs"]}
    else:  # the built-in demo data: no files needed (tests)
        forget = {"path": "builtin:harmful", "schema": "completions", "limit": spec["n_forget"]}
        pa = {"path": "builtin:all", "schema": "pairs", "split": "train",
              "limit": spec["pa_pairs"]}
    return {
        "model": {"name_or_path": MODELS.get(spec["model"], spec["model"])},
        "data": {"forget": forget, "pa": pa, "max_length": spec["max_length"]},
        "unlearn": {"loss": "ga", "lr": 1e-5, "steps": 10**6, "batch_size": spec["batch_size"],
                    "prox_lambda": 0.1},
        "selector": {"enabled": True, "hessian_batch": spec["hessian_batch"],
                     "power_iters": spec["lanczos"], "neumann_terms": spec["round_k"],
                     "neumann_tol": 0.0},
        "runtime": {"world_size": spec["world"], "zero_stage": stage, "ds_config": ds_config,
                    "checkpoint_every": 0, "seed": 0,
                    "device": "cuda" if _on_gpu(spec["device"]) else "cpu"},
        "eval": {"every": 0, "target": None, "batch_size": spec["eval_batch_size"]},
        "out": str(Path(out_dir) / "run"),
    }


def rank_main(spec: dict[str, Any], out_path: str) -> dict[str, Any]:
    """One rank of one configuration: every phase, written to ``out_path`` as JSON."""
    counter = CommCounter()
    counter.install()  # before DeepSpeed captures the torch.distributed functions

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    if _on_gpu(spec["device"]):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from u2a_dist.config import config_from_dict
    from u2a_dist.engine import init_distributed

    rank, world = init_distributed(timeout_s=spec["timeout"])
    phases = _Phases(counter, spec["device"])
    rec: dict[str, Any] = {"rank": rank, "world": world, "pid": os.getpid(),
                           "torch_threads": torch.get_num_threads(),
                           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "memory": {}}
    cfg = config_from_dict(_rank_config(spec, str(Path(out_path).parent)))

    t0 = time.perf_counter()
    workload_cls = TrainerWorkload if spec["device"] in TRAINER_DEVICES else DeviceWorkload
    wl = workload_cls(cfg, "cpu" if spec["device"] == "cpu-loop" else spec["device"])
    rec["setup_s"] = time.perf_counter() - t0
    rec["arch"] = _arch(wl.engine.module)
    rec["n_forget"] = len(wl.items)
    rec["memory"]["setup"] = phases.memory_mark()

    # ---- optimiser steps
    tokens = wl.next_step_tokens()
    _, warm_s, warm_comm = phases.run(wl.train_step)
    step_s, step_comm, seen_tokens = [], None, [tokens]
    phases.cpu_s = []
    for _ in range(spec["steps"]):
        seen_tokens.append(wl.next_step_tokens())
        _, dt, comm = phases.run(wl.train_step)
        step_s.append(dt)
        step_comm = comm
    timed_tokens = seen_tokens[1:] or seen_tokens
    rec["engine_state"] = engine_state(wl.engine)
    rec["step"] = {"warmup_s": warm_s, **_timing(step_s, phases.cpu_s),
                   "tokens": statistics.mean(t[0] for t in timed_tokens),
                   "padded_tokens": statistics.mean(t[1] for t in timed_tokens),
                   "micro_batches": 1, "comm": step_comm or warm_comm}
    rec["memory"]["train"] = phases.memory_mark()

    # ---- gradient pass and finite-difference HVP (DESIGN §3: 2 gradient passes each)
    from u2a_dist.linalg import ShardedVector, finite_difference_hvp

    problem = wl.problem
    v = ShardedVector.random_like(problem.zeros(), 7)
    v.scale_(1.0 / v.norm())
    lam = problem.analytic_curvature()
    grad_s, hvp_s, grad_cpu, hvp_cpu, grad_comm, hvp_comm = [], [], [], [], None, None
    problem.inner_grad()  # warm-up: the first passes allocate what later ones reuse
    finite_difference_hvp(problem.parts(), problem.inner_grad, v, extra_diag=lam)
    for _ in range(spec["repeats"]):
        _, dt, grad_comm = phases.run(problem.inner_grad)
        grad_s.append(dt)
        grad_cpu.append(phases.cpu_s[-1])
        _, dt, hvp_comm = phases.run(
            lambda: finite_difference_hvp(problem.parts(), problem.inner_grad, v,
                                          extra_diag=lam))
        hvp_s.append(dt)
        hvp_cpu.append(phases.cpu_s[-1])
    real, padded, micro = wl.hessian_tokens()
    rec["grad"] = {**_timing(grad_s, grad_cpu), "tokens": real,
                   "padded_tokens": padded, "micro_batches": micro, "comm": grad_comm}
    rec["hvp"] = {**_timing(hvp_s, hvp_cpu), "tokens": 2 * real,
                  "padded_tokens": 2 * padded, "micro_batches": 2 * micro, "comm": hvp_comm,
                  "ratio_to_grad": _median(hvp_s) / _median(grad_s)}
    rec["memory"]["hvp"] = phases.memory_mark()

    # ---- one no-grad pass of the per-example losses
    fwd_idx = list(range(min(spec["fwd_n"], len(wl.items))))
    phases.cpu_s = []
    fwd = ForwardCounter(getattr(wl.engine, "module", None))
    _, dt, times, comm = phases.repeat(lambda: problem.example_losses(fwd_idx), spec["repeats"])
    real, padded, batches = wl.forward_tokens(fwd_idx)
    rec["forward"] = {"n": len(fwd_idx), "seconds": dt, **_timing(times, phases.cpu_s),
                      "tokens": real, "padded_tokens": padded, "micro_batches": batches,
                      "comm": comm, "counted": fwd.close(max(1, spec["repeats"]))}

    if spec["selector"]:
        rec["selector"] = _selector_phases(spec, wl, phases)
        rec["memory"]["selector"] = phases.memory_mark()
    # Resetting VmHWM also resets ru_maxrss (both read the kernel's hiwater_rss): the lifetime
    # peak is the highest phase mark.
    rec["peak_rss_bytes"] = max(m["hwm_bytes"] for m in rec["memory"].values())
    rec["ru_maxrss_at_setup_bytes"] = rec["memory"]["setup"]["ru_maxrss_bytes"]
    if _on_gpu(spec["device"]):
        rec["peak_cuda_bytes"] = max(m["cuda_peak_bytes"] for m in rec["memory"].values())
    Path(out_path).write_text(json.dumps(rec, indent=1, default=float) + "\n")
    return rec


def _selector_phases(spec: dict[str, Any], wl: Any, phases: _Phases) -> dict[str, Any]:
    """∇J, Lanczos, Neumann(K) for each K, directional scores for each N, one whole round."""
    import dataclasses

    from u2a_dist.linalg import (
        extreme_eigenvalues,
        finite_difference_hvp,
        neumann_ihvp,
        resolve_damping_and_alpha,
    )
    from u2a_dist.selector import SCORE_FORWARD_PASSES, directional_scores, hypergradients

    problem, cfg = wl.problem, wl.cfg
    lam = problem.analytic_curvature()
    hvps = [0]

    def matvec(x: Any) -> Any:
        hvps[0] += 1
        return finite_difference_hvp(problem.parts(), problem.inner_grad, x, extra_diag=lam)

    out: dict[str, Any] = {}
    reps = spec.get("sweep_repeats", 1)
    fwd = ForwardCounter(getattr(wl.engine, "module", None))
    (grad_j, j_value), dt, all_s, comm = phases.repeat(problem.outer_grad, reps)
    real, padded, pairs, micro = wl.pair_tokens()
    out["outer_grad"] = {"seconds": dt, "min_s": min(all_s), "pairs": pairs, "tokens": real,
                         "padded_tokens": padded, "micro_batches": micro, "comm": comm,
                         "J": j_value, "counted": fwd.close(max(1, reps)),
                         "reference_pass_timed": False}

    hvps[0] = 0
    (lo, hi), dt, all_s, comm = phases.repeat(
        lambda: extreme_eigenvalues(matvec, grad_j, iters=spec["lanczos"], seed=0), reps)
    delta, alpha = resolve_damping_and_alpha(lo, hi)
    out["lanczos"] = {"seconds": dt, "min_s": min(all_s), "hvps": hvps[0] // max(1, reps),
                      "lambda_min": lo, "lambda_max": hi, "damping": delta, "alpha": alpha,
                      "comm": comm}

    ks, v = [], grad_j
    for k in spec["k"]:
        hvps[0] = 0
        res, dt, all_s, comm = phases.repeat(lambda k=k: neumann_ihvp(
            matvec, grad_j, k, alpha, delta, tol=0.0, compute_residual=False), reps)
        ks.append({"k": k, "seconds": dt, "min_s": min(all_s), "hvps": hvps[0] // max(1, reps),
                   "comm_wire_bytes": comm["wire_bytes"],
                   "comm_calls": comm["calls"]})
        v = res.v
    out["neumann_vs_k"] = ks

    ns = []
    # warm-up: the first scoring pass allocates the perturbation's buffers and, on a GPU, picks
    # kernels for new shapes (without it the H200's first sweep point, N = 16, cost 1.5× the
    # per-batch time of the next ones)
    directional_scores(problem, v, list(range(min(spec["n"][0], len(wl.items)))),
                       cfg.selector.fd_eps)
    for n in spec["n"]:
        if n > len(wl.items):
            continue
        idx = list(range(n))
        counter = ForwardCounter(getattr(wl.engine, "module", None))
        _, dt, all_s, comm = phases.repeat(lambda idx=idx: directional_scores(
            problem, v, idx, cfg.selector.fd_eps), reps)
        real, padded, batches = wl.forward_tokens(idx)
        k = SCORE_FORWARD_PASSES
        ns.append({"n": n, "seconds": dt, "min_s": min(all_s), "forward_passes": k,
                   "tokens": k * real, "padded_tokens": k * padded, "micro_batches": k * batches,
                   "counted": counter.close(max(1, reps)),
                   "comm_wire_bytes": comm["wire_bytes"], "comm_calls": comm["calls"]})
    out["scores_vs_n"] = ns

    n_round = min(spec["round_n"], len(wl.items))
    sel = dataclasses.replace(cfg.selector, neumann_terms=spec["round_k"],
                              power_iters=spec["lanczos"], neumann_tol=0.0)
    hg, dt, all_s, comm = phases.repeat(
        lambda: hypergradients(problem, sel, list(range(n_round))), reps)
    st = hg.stats
    real, padded, batches = wl.forward_tokens(list(range(n_round)))
    out["round"] = {"seconds": dt, "min_s": min(all_s), "n": n_round, "k": spec["round_k"],
                    "score_forward_passes": SCORE_FORWARD_PASSES,
                    "score_tokens": SCORE_FORWARD_PASSES * real,
                    "score_padded_tokens": SCORE_FORWARD_PASSES * padded,
                    "score_micro_batches": SCORE_FORWARD_PASSES * batches,
                    "lanczos_iters": spec["lanczos"], "pairs": pairs,
                    "hvps": st.get("selector/hvps"), "ihvp_s": st.get("timing/ihvp_s"),
                    "score_s": st.get("timing/score_s"),
                    "residual": st.get("selector/ihvp_residual"),
                    "comm_wire_bytes": comm["wire_bytes"], "comm_calls": comm["calls"]}
    return out


# =============================================================================================
# driver
# =============================================================================================


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU here
        return 0


def run_config(spec: dict[str, Any], timeout: int, keep_logs: Path | None = None
               ) -> dict[str, Any]:
    """Run one configuration in ``spec['world']`` real rank processes; merge what they report."""
    from u2a_dist.runtime.local import LoopbackStore, rank_env

    world = spec["world"]
    tmp = Path(tempfile.mkdtemp(prefix="u2a-scaling-"))
    store = LoopbackStore(world, timeout_s=timeout)
    procs = []
    t0 = time.perf_counter()
    for rank in range(world):
        env = rank_env(rank, world, store.port)
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        if spec.get("malloc_hugepages"):
            env["GLIBC_TUNABLES"] = _with_tunable(env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE)
        if not _on_gpu(spec["device"]):
            # CPU ranks must not see a GPU: init_distributed would pick nccl and DeepSpeed cuda.
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--rank-spec", json.dumps(spec),
               "--rank-out", str(tmp / f"rank{rank}.json")]
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    load_before = os.getloadavg()
    failed = []
    deadline = time.monotonic() + timeout
    for rank, (proc, log) in enumerate(procs):
        try:
            code: Any = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((rank, code))
            for p, _ in procs:  # one failed rank: the others would wait forever
                if p.poll() is None:
                    p.kill()
    store.close()
    wall = time.perf_counter() - t0
    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()]}
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            (keep_logs / f"rank{rank}.log").write_text((tmp / f"rank{rank}.log").read_text())
    if failed:
        tails = {r: "\n".join((tmp / f"rank{r}.log").read_text().splitlines()[-25:])
                 for r, _ in failed}
        return {**_config_key(spec), "ok": False, "wall_s": round(wall, 1), "loadavg": load,
                "error": f"ranks {[r for r, _ in failed]} failed ({[c for _, c in failed]})",
                "log_tail": tails}
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    out = merge_ranks(spec, ranks, wall)
    out["loadavg"] = load  # 1/5/15-min load of the machine: other work skews the times
    return out


def _config_key(spec: dict[str, Any]) -> dict[str, Any]:
    stage, ds_config = STAGES[spec["stage"]]
    return {"model": spec["model"], "model_name": MODELS.get(spec["model"], spec["model"]),
            "stage": spec["stage"], "zero_stage": stage, "offload": spec["stage"] == "3off",
            "ds_config": ds_config, "world": spec["world"], "device": spec["device"],
            "malloc_hugepages": bool(spec.get("malloc_hugepages"))}


#: glibc's tunable that makes malloc back its heap with transparent huge pages (glibc >= 2.35;
#: older ones ignore an unknown tunable).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def _with_tunable(current: str | None, tunable: str) -> str:
    """GLIBC_TUNABLES with ``tunable`` added to what the caller's environment already sets."""
    return f"{current}:{tunable}" if current else tunable


def _derive_rates(step: dict[str, Any], grad: dict[str, Any], hvp: dict[str, Any],
                  fwd: dict[str, Any]) -> None:
    """The fields derived from the phases' times: tokens/s, HVP over gradient pass, and the
    forward's ``seconds`` (the name the selector sections use)."""
    fwd["seconds"] = fwd["median_s"]
    step["tokens_per_s"] = step["tokens"] / step["median_s"]
    hvp["ratio_to_grad"] = hvp["median_s"] / grad["median_s"]
    hvp["ratio_to_grad_min"] = hvp["min_s"] / grad["min_s"]


def run_launches(spec: dict[str, Any], timeout: int, launches: int,
                 keep_logs: Path | None = None) -> dict[str, Any]:
    """Run one configuration ``launches`` times, each in fresh rank processes; one record."""
    recs = []
    for i in range(max(1, launches)):
        logs = keep_logs / f"launch{i}" if keep_logs is not None and launches > 1 else keep_logs
        rec = run_config(spec, timeout, logs)
        if not rec["ok"]:
            return rec
        recs.append(rec)
    return merge_launches(recs)


def merge_launches(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a configuration launched ``len(recs)`` times in fresh processes.

    Every timing is the median over the launches of each launch's median (slowest rank);
    ``min_s`` is the least of their minima and ``launch_medians_s`` keeps each launch's. The
    ranks' CPU share per wall second is the median per rank. Memory, engine state, collectives
    and token counts are the first launch's (they are counted, and equal in every launch)."""
    import copy

    out = copy.deepcopy(recs[0])
    if len(recs) == 1:
        return out

    def fold(dst: dict[str, Any], srcs: list[dict[str, Any]], key: str) -> None:
        vals = [s[key] for s in srcs]
        dst[key] = _median(vals)
        dst["min_s"] = min(s["min_s"] for s in srcs)
        dst["launch_medians_s"] = vals
        shares = [s.get("cpu_per_wall_per_rank") for s in srcs]
        if all(shares):
            dst["cpu_per_wall_per_rank"] = [
                _median([x for x in col if x is not None]) if any(x is not None for x in col)
                else None for col in zip(*shares)]

    for name in ("step", "grad", "hvp", "forward"):
        fold(out[name], [r[name] for r in recs], "median_s")
    _derive_rates(*(out[name] for name in ("step", "grad", "hvp", "forward")))
    sel = out.get("selector")
    if sel:
        for name in ("outer_grad", "lanczos", "round"):
            fold(sel[name], [r["selector"][name] for r in recs], "seconds")
        for sweep in ("neumann_vs_k", "scores_vs_n"):
            for i, row in enumerate(sel[sweep]):
                fold(row, [r["selector"][sweep][i] for r in recs], "seconds")
    out["launches"] = len(recs)
    out["wall_s"] = round(sum(r["wall_s"] for r in recs), 1)
    out["loadavg_per_launch"] = [r.get("loadavg") for r in recs]
    return out


def _counted_global(sections: list[dict[str, Any]]) -> dict[str, float] | None:
    """Forward calls per rank (the most any rank made) and padded tokens summed over ranks:
    the units of the section's ``micro_batches`` and ``padded_tokens``."""
    counted = [s["counted"] for s in sections if s.get("counted")]
    if not counted:
        return None
    return {"forward_calls": max(c["forward_calls"] for c in counted),
            "tokens": sum(c["tokens"] for c in counted)}


def merge_ranks(spec: dict[str, Any], ranks: list[dict[str, Any]], wall: float
                ) -> dict[str, Any]:
    """One record per configuration: times from the slowest rank (the ranks run in lock-step),
    tokens global, memory and engine state per rank."""
    r0 = ranks[0]

    def slowest(section: str, key: str = "median_s") -> float:
        return max(r[section][key] for r in ranks)

    step, grad, hvp, fwd = (dict(r0[k]) for k in ("step", "grad", "hvp", "forward"))
    for name, sec in (("step", step), ("grad", grad), ("hvp", hvp), ("forward", fwd)):
        sec["median_s"], sec["min_s"] = slowest(name), slowest(name, "min_s")
        sec["cpu_per_wall_per_rank"] = [r[name].get("cpu_per_wall") for r in ranks]
    fwd["counted"] = _counted_global([r["forward"] for r in ranks])
    _derive_rates(step, grad, hvp, fwd)
    out = {**_config_key(spec), "ok": True, "wall_s": round(wall, 1),
           "setup_s": max(r["setup_s"] for r in ranks), "arch": r0["arch"],
           "n_forget": r0["n_forget"], "torch_threads": r0["torch_threads"],
           "glibc_tunables": [r.get("glibc_tunables") for r in ranks],
           "step": step, "grad": grad, "hvp": hvp, "forward": fwd,
           "memory": {"per_rank": [{"rank": r["rank"], "peak_rss_bytes": r["peak_rss_bytes"],
                                    **{f"{phase}_hwm_bytes": m["hwm_bytes"]
                                       for phase, m in r["memory"].items()},
                                    **({"peak_cuda_bytes": r["peak_cuda_bytes"],
                                        **{f"{phase}_cuda_peak_bytes": m["cuda_peak_bytes"]
                                           for phase, m in r["memory"].items()}}
                                       if "peak_cuda_bytes" in r else {}),
                                    "engine": r["engine_state"]} for r in ranks]}}
    mem = out["memory"]["per_rank"]
    out["memory"]["peak_rss_bytes_max"] = max(m["peak_rss_bytes"] for m in mem)
    out["memory"]["steady_hwm_bytes_max"] = max(
        max(m.get(f"{p}_hwm_bytes", 0) for p in ("train", "hvp", "selector")) for m in mem)
    out["memory"]["param_numel_per_rank"] = [m["engine"]["param_numel"] for m in mem]
    if "selector" in r0:
        sel = r0["selector"]
        for stat in ("seconds", "min_s"):
            for key in ("outer_grad", "lanczos", "round"):
                sel[key][stat] = max(r["selector"][key][stat] for r in ranks)
            for sweep in ("neumann_vs_k", "scores_vs_n"):
                for i, row in enumerate(sel[sweep]):
                    row[stat] = max(r["selector"][sweep][i][stat] for r in ranks)
        sel["outer_grad"]["counted"] = _counted_global([r["selector"]["outer_grad"]
                                                         for r in ranks])
        for i, row in enumerate(sel["scores_vs_n"]):
            row["counted"] = _counted_global([r["selector"]["scores_vs_n"][i] for r in ranks])
        out["selector"] = sel
    out["settings"] = {k: spec[k] for k in ("steps", "repeats", "batch_size", "hessian_batch",
                                            "eval_batch_size", "max_length", "data", "pa_pairs",
                                            "fwd_n", "threads", "sweep_repeats")}
    return out


def _fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _source_line(src: dict[str, Any]) -> str:
    hw = src["hardware"]
    return (f"`{src['command']}` ({src['date_utc']}; {hw['platform']}, {hw['cpu_count']} CPUs, "
            f"GPU: {hw['gpu']}; torch {src.get('versions', {}).get('torch')}, deepspeed "
            f"{src.get('versions', {}).get('deepspeed')}; wall time {src['wall_seconds']} s)")


def merge_records(records: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """One scaling record from several runs (the CPU configurations here, the GPU ones on a
    lent machine, a long model measured apart): every configuration keeps the stamp of the run
    that measured it (``source``, an index into ``sources``); a configuration measured again
    (same model, stage, W and device) is taken from the later file; configurations a run
    skipped (no GPU there) are left out: they hold no measurement."""
    sources: list[dict[str, Any]] = []
    by_key: dict[tuple, dict[str, Any]] = {}
    for rec, path in zip(records, paths):
        if rec.get("benchmark") != "scaling" or "configs" not in rec:
            raise SystemExit(f"--merge: {path} is not a scaling.json (no 'configs')")
        subs = rec.get("sources") or [{k: rec.get(k) for k in (
            "command", "date_utc", "hardware", "versions", "settings", "wall_seconds")}]
        base = len(sources)
        sources += [{**src, "file": path} for src in subs]
        for c in rec["configs"]:
            if c.get("skipped"):
                continue
            key = (c["model"], str(c["stage"]), c["world"], c["device"])
            by_key[key] = {**c, "source": base + c.get("source", 0)}
    return {"benchmark": "scaling", **stamp(), "sources": sources,
            "wall_seconds": round(sum(s.get("wall_seconds") or 0 for s in sources), 1),
            "configs": list(by_key.values())}


def markdown(record: dict[str, Any]) -> str:
    """The tables of scaling.md."""
    if record.get("sources"):
        head = ["Merged from these runs (the `src` column):", "",
                *[f"{i}. {_source_line(src)}" for i, src in enumerate(record["sources"])]]
    else:
        head = [f"Hardware: {record['hardware']['platform']}, {record['hardware']['cpu_count']} "
                f"CPUs, GPU: {record['hardware']['gpu']}. Wall time {record['wall_seconds']} s."]
    lines = [f"# Scaling ({record['date_utc']})", "",
             f"Command: `{record['command']}`", "", *head,
             "", "Times are medians over the measured repeats, from the slowest rank (a "
             "configuration launched R > 1 times in fresh processes: the median over the "
             "launches of each launch's median; `launches` column). Memory: "
             "`peak RSS` is each rank's lifetime high-water mark (model loading included); "
             "`steady` the highest per-phase mark after loading (train, HVP, selector); "
             "`params/rank` and `opt state/rank` are the engine's own partition sizes "
             "(optimizer states and master copies: measured after the first step). `CPU s/wall s`: "
             "each rank's CPU time per wall second in the timed steps (≈ its threads when it had "
             "its cores; much less when other processes or its peers held it up); `load avg`: the "
             "machine's 1-minute load when the configuration started; `GPU peak`: the CUDA "
             "allocator's peak of allocated bytes per rank (GPU configurations).", "",
             "| model | stage | W | device | src | launches | step s | tokens/s | grad pass s "
             "| HVP s "
             "| HVP/grad | comm/step per rank | peak RSS per rank | steady per rank "
             "| GPU peak per rank | params/rank | opt state+master/rank | CPU s/wall s (step) "
             "| load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["configs"]:
        key = (f"| {c['model']} | {c['stage']} | {c['world']} | {c['device']} "
               f"| {c.get('source', '–')} | {c.get('launches', 1) if c.get('ok') else '–'} ")
        if not c.get("ok"):
            reason = c.get("skipped") or c.get("error", "failed")
            lines.append(key + f"| {reason} |" + " |" * 12)
            continue
        mem = c["memory"]["per_rank"]
        lines.append(
            key + f"| {c['step']['median_s']:.3f} | {c['step']['tokens_per_s']:.0f} "
            f"| {c['grad']['median_s']:.3f} | {c['hvp']['median_s']:.3f} "
            f"| {c['hvp']['ratio_to_grad']:.2f} | {_fmt_bytes(c['step']['comm']['wire_bytes'])} "
            f"| {' / '.join(_fmt_bytes(m['peak_rss_bytes']) for m in mem)} "
            f"| {' / '.join(_fmt_bytes(max(m.get(p + '_hwm_bytes', 0) for p in ('train', 'hvp', 'selector'))) for m in mem)} "  # noqa: E501
            f"| {' / '.join(_fmt_bytes(m.get('peak_cuda_bytes')) for m in mem)} "
            f"| {' / '.join(_fmt_bytes(m['engine']['param_bytes']) for m in mem)} "
            f"| {' / '.join(_fmt_bytes(m['engine']['optimizer_state_bytes'] + m['engine']['master_bytes']) for m in mem)} "  # noqa: E501
            f"| {' / '.join('–' if x is None else f'{x:.2f}' for x in c['step'].get('cpu_per_wall_per_rank', []))} "  # noqa: E501
            f"| {c.get('loadavg', {}).get('before', ['–'])[0]} |")
    ok = [c for c in record["configs"] if c.get("ok")]
    if ok:
        ratios = sorted(c["hvp"]["ratio_to_grad"] for c in ok)
        mins = sorted(c["hvp"].get("ratio_to_grad_min", math.nan) for c in ok)
        lines += ["", f"**HVP cost over gradient cost**: median {statistics.median(ratios):.2f} "
                  f"over {len(ok)} configurations (range {ratios[0]:.2f}-{ratios[-1]:.2f}; from "
                  f"the fastest repeats {statistics.median(mins):.2f}). One finite-difference "
                  "HVP is 2 gradient passes plus saving, perturbing and restoring θ (DESIGN §3): "
                  "2 plus that vector work is the expectation."]
    sel = [c for c in record["configs"] if c.get("ok") and "selector" in c]
    if sel:
        lines += ["", "## Selector: time against N (directional scores; passes: forward passes "
                  "over N, 3 in runs before 2026-11-28, then 2)",
                  "", "| model | stage | W | passes | " + " | ".join(
                      f"N={r['n']}" for r in sel[0]["selector"]["scores_vs_n"]) + " |",
                  "|---|---|---|---|" + "---|" * len(sel[0]["selector"]["scores_vs_n"])]
        for c in sel:
            rows = c["selector"]["scores_vs_n"]
            passes = rows[0].get("forward_passes", 3) if rows else "-"
            lines.append(f"| {c['model']} | {c['stage']} | {c['world']} | {passes} | "
                         + " | ".join(f"{r['seconds']:.3f} s" for r in rows) + " |")
        lines += ["", "## Selector: time against K (Neumann terms; K−1 HVPs each)", "",
                  "| model | stage | W | " + " | ".join(
                      f"K={r['k']}" for r in sel[0]["selector"]["neumann_vs_k"]) + " |",
                  "|---|---|---|" + "---|" * len(sel[0]["selector"]["neumann_vs_k"])]
        for c in sel:
            lines.append(f"| {c['model']} | {c['stage']} | {c['world']} | " + " | ".join(
                f"{r['seconds']:.3f} s ({r['hvps']} HVPs)"
                for r in c["selector"]["neumann_vs_k"]) + " |")
        lines += ["", "## One selector round (hypergradients: ∇J over P pairs, L Lanczos + K "
                  "Neumann HVPs, 2 forward passes over N, 3 before 2026-11-28)", "",
                  "| model | stage | W | P | L | K | N | HVPs | ∇J s | round s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in sel:
            r = c["selector"]["round"]
            lines.append(f"| {c['model']} | {c['stage']} | {c['world']} | {r['pairs']} "
                         f"| {r['lanczos_iters']} | {r['k']} | {r['n']} | {r['hvps']} "
                         f"| {c['selector']['outer_grad']['seconds']:.3f} "
                         f"| {r['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in record["configs"] if c.get("ok")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (a, b), (c_ax, d) = axes
    labels = [f"{c['model'].replace('random:smollm2-', 'rand ')} z{c['stage']} W{c['world']} "
              f"{c['device']}" for c in ok]
    x = range(len(ok))
    a.bar(x, [c["step"]["median_s"] for c in ok])
    a.set(ylabel="seconds per optimiser step", title="step time", yscale="log")
    width = 0.8 / max(1, max((c["world"] for c in ok), default=1))
    for r in range(max((c["world"] for c in ok), default=1)):
        b.bar([i + r * width for i in x],
              [c["memory"]["per_rank"][r]["peak_rss_bytes"] / 1e9
               if r < len(c["memory"]["per_rank"]) else 0 for c in ok],
              width=width, label=f"rank {r}")
    gpu_peak = [c["memory"]["per_rank"][0].get("peak_cuda_bytes") for c in ok]
    if any(gpu_peak):
        b.bar([i for i, g in zip(x, gpu_peak) if g], [g / 1e9 for g in gpu_peak if g],
              width=width, bottom=0, fill=False, hatch="//", label="GPU peak (allocated)")
    b.set(ylabel="GB", title="peak RSS per rank; GPU peak on GPU configurations", yscale="log")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
    for cfg in (c for c in ok if "selector" in c):
        lab = f"{cfg['model']} z{cfg['stage']} W{cfg['world']}"
        rows = cfg["selector"]["scores_vs_n"]
        c_ax.plot([r["n"] for r in rows], [r["seconds"] for r in rows], "o-", label=lab)
        rows = cfg["selector"]["neumann_vs_k"]
        d.plot([r["k"] for r in rows], [r["seconds"] for r in rows], "o-", label=lab)
    c_ax.set(xscale="log", yscale="log", xlabel="negatives scored N", ylabel="seconds",
             title="directional scores (forward passes over N: 3 before 2026-11-28, then 2)")
    d.set(xlabel="Neumann terms K", ylabel="seconds", yscale="log",
          title="Neumann series (K−1 HVPs)")
    for ax in (c_ax, d):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2",
                    help=f"comma list of {sorted(MODELS)} or any model.name_or_path")
    ap.add_argument("--stages", default="0,2,3,3off", help=f"comma list of {sorted(STAGES)}")
    ap.add_argument("--world", default="1,2", help="world sizes (rank processes)")
    ap.add_argument("--devices", default="cpu,gpu",
                    help="cpu (the Trainer, gloo), gpu (a plain loop on the engine, CUDA; "
                         "skipped without it), gpu-trainer (the Trainer on CUDA, "
                         "runtime.device=cuda), cpu-loop (the gpu loop on the CPU, to check it "
                         "without a GPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimiser steps (after 1 warm-up)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed gradient passes, HVPs and forward passes (median reported)")
    ap.add_argument("--batch-size", type=int, default=8, help="global forget batch per step")
    ap.add_argument("--hessian-batch", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=16, help="forward-pass batch")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--pa-pairs", type=int, default=16, help="P: pairs of J")
    ap.add_argument("--fwd-n", type=int, default=32, help="negatives of the forward phase")
    ap.add_argument("--selector-stages", default="3",
                    help="stages that also run the selector sweeps ('' for none)")
    ap.add_argument("--sweep-repeats", type=int, default=1,
                    help="repeats of each selector measurement (median reported)")
    ap.add_argument("--n", default="16,64,256", help="N of the scoring sweep")
    ap.add_argument("--k", default="1,2,4,8", help="K of the Neumann sweep")
    ap.add_argument("--lanczos", type=int, default=4, help="L: Lanczos iterations")
    ap.add_argument("--round-k", type=int, default=4, help="K of the whole-round measurement")
    ap.add_argument("--round-n", type=int, default=64, help="N of the whole-round measurement")
    ap.add_argument("--data", choices=("refusal", "builtin", "auto"), default="auto",
                    help="refusal: <--shared-data>/refusal (default when present); builtin: "
                         "the package's demo data (no files)")
    ap.add_argument("--shared-data", default=str(SHARED),
                    help="the shared data folder (default ../shared/data beside the repo)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per rank; 0: the local launcher's default (CPU cores / W)")
    ap.add_argument("--timeout", type=int, default=3600,
                    help="seconds per configuration launch")
    ap.add_argument("--launches", type=int, default=1,
                    help="launches of each configuration, each in fresh rank processes; "
                         "timings are the median over them (processes differ: see above)")
    ap.add_argument("--malloc-hugepages", default="tiny",
                    help="comma list of models whose rank processes get GLIBC_TUNABLES="
                         f"{HUGEPAGE_TUNABLE} (cache-resident models: see above); '' for none")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--logs", default=None, help="keep every rank's log under this directory")
    ap.add_argument("--merge", default=None,
                    help="comma list of scaling.json files to merge into one under --out "
                         "(runs nothing; each configuration keeps its run's stamp)")
    ap.add_argument("--rank-spec", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.rank_spec:  # inside one rank process
        rank_main(json.loads(args.rank_spec), args.rank_out)
        from u2a_dist.runtime.worker import exit_rank

        exit_rank(0)
    if args.merge:
        paths = _names(args.merge)
        record = merge_records([json.loads(Path(p).read_text()) for p in paths], paths)
        return _write(record, Path(args.out))
    data, shared = args.data, Path(args.shared_data).resolve()
    if data == "auto":
        data = "refusal" if (shared / "refusal" / "completions").is_dir() else "builtin"
        if data == "builtin":
            print(f"[scaling] {shared}/refusal not found: using the built-in demo data",
                  flush=True)
    unknown = [s for s in _names(args.stages) if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {sorted(STAGES)}")
    ns, ks = _ints(args.n), _ints(args.k)
    n_forget = max([*ns, args.round_n, args.fwd_n, args.batch_size, args.hessian_batch])
    gpus = _gpu_count()
    configs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for device in _names(args.devices):
        for model in _names(args.models):
            for stage in _names(args.stages):
                for world in _ints(args.world):
                    spec = {"model": model, "stage": stage, "world": world, "device": device,
                            "steps": args.steps, "repeats": args.repeats,
                            "batch_size": args.batch_size, "hessian_batch": args.hessian_batch,
                            "eval_batch_size": args.eval_batch_size,
                            "max_length": args.max_length, "pa_pairs": args.pa_pairs,
                            "fwd_n": args.fwd_n, "n_forget": n_forget, "data": data,
                            "selector": stage in _names(args.selector_stages), "n": ns,
                            "k": ks, "lanczos": args.lanczos, "round_k": args.round_k,
                            "round_n": args.round_n, "timeout": args.timeout,
                            "sweep_repeats": args.sweep_repeats, "shared_data": str(shared),
                            "threads": args.threads,
                            "malloc_hugepages": model in _names(args.malloc_hugepages)}
                    name = f"{model} stage {stage} W={world} {device}"
                    if _on_gpu(device) and world > gpus:
                        why = ("no CUDA device" if gpus == 0
                               else f"{world} ranks need {world} GPUs; {gpus} here")
                        print(f"[scaling] {name}: skipped ({why})", flush=True)
                        configs.append({**_config_key(spec), "ok": False, "skipped": why})
                        continue
                    print(f"[scaling] {name} ...", flush=True)
                    logs = Path(args.logs) / name.replace(" ", "_") if args.logs else None
                    rec = run_launches(spec, args.timeout, args.launches, logs)
                    configs.append(rec)
                    if rec["ok"]:
                        print(f"[scaling] {name}: step {rec['step']['median_s']:.3f} s, "
                              f"{rec['step']['tokens_per_s']:.0f} tok/s, HVP/grad "
                              f"{rec['hvp']['ratio_to_grad']:.2f}, peak RSS/rank "
                              f"{[_fmt_bytes(m['peak_rss_bytes']) for m in rec['memory']['per_rank']]}"  # noqa: E501
                              f", params/rank {rec['memory']['param_numel_per_rank']} "
                              f"({rec['wall_s']} s)", flush=True)
                    else:
                        print(f"[scaling] {name}: FAILED {rec['error']}\n"
                              + "\n".join(rec["log_tail"].values()), flush=True)
    record = {"benchmark": "scaling", "wall_seconds": round(time.perf_counter() - t0, 1),
              **stamp(), "settings": {k: v for k, v in vars(args).items()
                                      if k not in ("out", "rank_spec", "rank_out", "logs")},
              "configs": configs}
    record["settings"]["data"] = data
    return _write(record, out_dir)


def _write(record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    (out_dir / "scaling.md").write_text(markdown(record))
    if any(c.get("ok") for c in record["configs"]):
        plot(record, out_dir / "scaling.png")
    print(f"-> {out_dir / 'scaling.json'}, {out_dir / 'scaling.md'}, {out_dir / 'scaling.png'}")
    return record


if __name__ == "__main__":
    main()
