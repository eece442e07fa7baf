"""Tokenise (prompt, response) with the chat template and prompt masking; collate; shard.

Labels are ``-100`` on prompt and padding tokens, so every log-prob in losses.py is a sum over
response tokens only (docs/design.md §2). The response ends with the eos token (``<|im_end|>`` for
ChatML models), because a model that is to stop after a refusal must learn where to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from u2a_dist.data.records import Messages
from u2a_dist.losses import IGNORE  # re-exported: data and generation label with it


def format_prompt(tokenizer, prompt: str, history: Messages | None = None) -> str:
    """The text before the response: chat template when the tokenizer has one."""
    messages = list(history or []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    text = ""
    for m in messages:
        text += ("Human: " if m["role"] == "user" else "Assistant: ") + m["content"] + "\n\n"
    return text + "Assistant: "


def encode(tokenizer, prompt: str, response: str, history: Messages | None = None,
           max_length: int = 256) -> dict[str, list[int]]:
    """input_ids and labels (prompt masked) for one example, truncated to max_length.

    Truncation keeps the response (up to half the budget when the prompt is long) and cuts the
    prompt from the left, so the tokens that carry the loss survive.
    """
    p = tokenizer(format_prompt(tokenizer, prompt, history), add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return with_response(p, r, max_length)


def with_response(p: list[int], r: list[int], max_length: int) -> dict[str, list[int]]:
    """Prompt ids ``p`` and response ids ``r`` as one item, truncated as :func:`encode` says."""
    if len(p) + len(r) > max_length:
        r = r[: max(max_length // 2, max_length - len(p))]
        p = p[len(p) - (max_length - len(r)):] if max_length > len(r) else []
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def encode_prompt(tokenizer, prompt: str, history: Messages | None = None,
                  max_length: int = 256) -> list[int]:
    ids = tokenizer(format_prompt(tokenizer, prompt, history), add_special_tokens=False)
    return ids["input_ids"][-max_length:]


def collate(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (equal sizes; caller pads to a multiple)."""
    if len(indices) % world_size:
        raise ValueError(f"batch of {len(indices)} is not divisible by world size {world_size}")
    per = len(indices) // world_size
    return list(indices[rank * per:(rank + 1) * per])


def shard_strided(n: int, rank: int, world_size: int) -> list[int]:
    """Indices rank, rank+W, ... of n items: for evaluation, where shares may differ by one."""
    return list(range(rank, n, world_size))
