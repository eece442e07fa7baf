"""Batched greedy generation, sharded across ranks (docs/design.md §5).

Each rank generates a strided share of the prompts (``sharded.padded_shares``): every share is
padded to the same number of batches of the same size. Given a ZeRO-3 partitioned model, a
forward pass is a collective (every layer all-gathers its weights), so the ranks stay in step
with ``synced_gpus=True`` (a rank whose batch has finished keeps making dummy forwards until
every rank's batch has); that costs one all-gather of every layer per generated token, which
is why the trainer generates with a whole-parameter copy (``Trainer.eval_model``) and each rank
runs alone. Prompts are left-padded; decoding is greedy with a ``max_new_tokens`` bound, so the
result is deterministic and independent of the world size (a test checks 2 ranks against 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from u2a_dist import progress
from u2a_dist.data.examples import Prompt
from u2a_dist.data.tokenize import IGNORE, collate_prompts, encode_prompt
from u2a_dist.device import model_device, to_device
from u2a_dist.engine import is_partitioned
from u2a_dist.sharded import padded_shares, world


@dataclass
class Share:
    """Generations of some prompts (one rank's share, or all of them after ``gather_shares``):
    prompt indices, decoded responses, and the generated token ids themselves (up to and
    including the first eos; no eos when the ``max_new_tokens`` cap cut the answer)."""

    indices: list[int]
    texts: list[str]
    tokens: list[list[int]]


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_length: int) -> list[list[int]]:
    """Chat-formatted prompt token ids (left-truncated to ``max_length``)."""
    return [encode_prompt(tokenizer, p.prompt, p.history, max_length) for p in prompts]


@torch.no_grad()
def generate_share(model, tokenizer, prompt_ids: Sequence[list[int]], batch_size: int,
                   max_new_tokens: int) -> Share:
    """Greedy responses for this rank's share of ``prompt_ids`` (a collective on >1 rank)."""
    if not prompt_ids:
        raise ValueError("no prompts to generate from")
    rank, size = world()
    mine = padded_shares(len(prompt_ids), size, batch_size)[rank]
    filler = next((i for i in mine if i >= 0), 0)
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    texts: list[str] = []
    tokens: list[list[int]] = []
    synced = size > 1 and is_partitioned(model)
    device = model_device(model)
    # ids past the tokenizer's vocabulary have no text (a random preset's 49152-row head over
    # the byte tokenizer; a real model's padded embedding rows): decoded as nothing
    vocab = len(tokenizer)
    try:
        for start in progress.each("generate", range(0, len(mine), batch_size)):
            idx = [i if i >= 0 else filler for i in mine[start:start + batch_size]]
            batch = to_device(collate_prompts([prompt_ids[i] for i in idx], pad_id), device)
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                 use_cache=True, synced_gpus=synced,
                                 temperature=None, top_p=None, top_k=None)
            new = out[:, batch["input_ids"].shape[1]:]
            texts.extend(tokenizer.batch_decode([[t for t in row if t < vocab]
                                                 for row in new.tolist()],
                                                skip_special_tokens=True))
            tokens.extend(_until_eos(row.tolist(), tokenizer.eos_token_id) for row in new.cpu())
    finally:
        model.train(was_training)
    keep = [j for j, i in enumerate(mine) if i >= 0]
    return Share([mine[j] for j in keep], [texts[j].strip() for j in keep],
                 [tokens[j] for j in keep])


def answer_items(prompt_ids: Sequence[list[int]], answers: Share) -> list[dict[str, list[int]]]:
    """Prompts with their generated answers as training/scoring items: the generated ids as
    they came (no re-tokenisation), loss on the answer tokens only; empty answers dropped."""
    return [{"input_ids": p + t, "labels": [IGNORE] * len(p) + t}
            for p, t in zip(prompt_ids, answers.tokens) if t]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first eos (what follows it is padding)."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def gather_shares(share: Share, n: int) -> Share:
    """Every rank's share put together in prompt order (indices 0..n-1), on every rank."""
    _, size = world()
    shares = [share]
    if size > 1:
        gathered: list[Share | None] = [None] * size
        dist.all_gather_object(gathered, share)
        shares = [s for s in gathered if s is not None]
    texts: list[str | None] = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    for s in shares:
        for i, text, ids in zip(s.indices, s.texts, s.tokens):
            texts[i], tokens[i] = text, ids
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise RuntimeError(f"generation lost prompts {missing[:8]} (shares do not cover all)")
    return Share(list(range(n)), [t for t in texts if t is not None], tokens)


def generate(model, tokenizer, prompt_ids: Sequence[list[int]], batch_size: int,
             max_new_tokens: int) -> Share:
    """Greedy responses to every prompt, sharded over the ranks, returned on every rank."""
    share = generate_share(model, tokenizer, prompt_ids, batch_size, max_new_tokens)
    return gather_shares(share, len(prompt_ids))
