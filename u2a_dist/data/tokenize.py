"""Tokenise (prompt, response) with the chat template and prompt masking; collate; shard.

Labels are ``-100`` on prompt and padding tokens, so every log-prob in losses.py is a sum over
response tokens only (docs/design.md §2). The response ends with the eos token (``<|im_end|>`` for
ChatML models), because a model that is to stop after a refusal must learn where to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from u2a_dist.data.records import Messages
from u2a_dist.losses import (
    IGNORE,  # re-exported: data and generation label with it
    item_logps,
    label_logits,
)


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


def collate(items: Sequence[dict[str, list[int]]], pad_id: int,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels."""
    width = width or max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(items: Sequence[dict[str, list[int]]], pad_id: int,
         width: int | None = None) -> dict[str, torch.Tensor]:
    """Items packed into rows of ``width`` tokens (default: the longest item), first-fit by
    decreasing length, for a forward pass without padding between them: ``position_ids``
    restart at 0 for each item, which transformers' causal mask reads as separate sequences
    when no ``attention_mask`` is given (``masking_utils.find_packed_sequence_indices``);
    ``segment`` is each token's item index (-1 on the padding that ends a row). Each item's
    first label is masked, so no position is scored on predicting the next item. A row ends
    with padding whose positions restart at 0: a sequence of its own, seen by no item."""
    lengths = [len(x["input_ids"]) for x in items]
    width = width or max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(items)), key=lambda i: -lengths[i]):
        j = next((r for r, left in enumerate(room) if left >= lengths[i]), len(rows))
        if j == len(rows):
            rows.append([])
            room.append(width)
        rows[j].append(i)
        room[j] -= lengths[i]
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            n = lengths[i]
            ids[r, t:t + n] = torch.tensor(items[i]["input_ids"])
            labels[r, t + 1:t + n] = torch.tensor(items[i]["labels"][1:])
            segment[r, t:t + n] = i
            positions[r, t:t + n] = torch.arange(n)
            t += n
        positions[r, t:] = torch.arange(width - t)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "segment": segment}


def packed_real_tokens(input_ids: torch.Tensor, position_ids: torch.Tensor,
                       pad_id: int) -> torch.Tensor:
    """Which tokens of a :func:`pack` batch are items' (not the padding that ends a row), from
    what the model sees: a row's padding is its last run from position 0 on, all ``pad_id``,
    after some item. Device ops only (no host synchronisation)."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(position_ids == 0, index, -1).max(dim=1).values.unsqueeze(1)
    tail = index >= last
    pad_tail = ((input_ids == pad_id) | ~tail).all(dim=1, keepdim=True) & (last > 0)
    return ~(tail & pad_tail)


def rows_batch(items: Sequence[dict[str, list[int]]], pad_id: int, packed: bool,
               width: int | None = None) -> dict[str, torch.Tensor]:
    """Items as :func:`pack` lays them out, or one per row (:func:`collate`) with the same
    ``segment`` key (the row index on real tokens, -1 on padding)."""
    if packed:
        return pack(items, pad_id, width)
    batch = collate(items, pad_id, width)
    rows = torch.arange(len(items)).unsqueeze(1)
    batch["segment"] = torch.where(batch["attention_mask"] > 0, rows, -1)
    return batch


def concat_rows(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two batches of the same width, one above the other (segments stay per part)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def packing_ok(model, items: Sequence[dict[str, list[int]]], pad_id: int,
               device: torch.device | None = None) -> bool:
    """Whether ``model`` reads packed rows as separate sequences. Two items a (the longer) and
    b: b's log-prob after a must equal b's after a reversed (nothing leaks across items: exact
    in any dtype, the shapes being the same) and b's padded one (positions restart; to 1e-4 in
    fp32, 1e-2 in 16 bits). Collective under ZeRO-3: every rank runs the same forward passes."""
    if len(items) < 2:
        return False
    a, b = sorted(items[:2], key=lambda x: -len(x["input_ids"]))
    flipped = {"input_ids": a["input_ids"][::-1], "labels": a["labels"]}
    width = len(a["input_ids"]) + len(b["input_ids"])
    # b's log-prob is item 1 of each packed row, and of the padded batch's second row
    batches = [(concat_rows(pack([a, b], pad_id, width), pack([flipped, b], pad_id, width)),
                (0, 1)), (rows_batch([a, b], pad_id, packed=False), (1,))]
    was_training = model.training
    model.eval()
    got = []
    for batch, rows in batches:
        batch = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
        with torch.no_grad():
            logits = label_logits(model, batch)
        # row r's items 0 and 1 are items 2r and 2r + 1 of the batch
        row = torch.arange(len(batch["segment"]), device=logits.device).unsqueeze(1)
        segment = torch.where(batch["segment"] >= 0, batch["segment"] + 2 * row, -1)
        logp, _ = item_logps(logits, batch["labels"], segment, 2 * len(segment))
        got += [logp[2 * r + 1] for r in rows]
    model.train(was_training)
    after_a, after_flipped, padded = got
    rtol = 1e-4 if logits.dtype == torch.float32 else 1e-2
    return bool(torch.isclose(after_a, after_flipped, rtol=1e-5, atol=1e-4)
                and torch.isclose(after_a, padded, rtol=rtol, atol=1e-3))


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


def micro_chunks(forget: Sequence[int], retain: Sequence[int], parts: int
                 ) -> list[tuple[list[int], list[int]]]:
    """A rank's forget and retain shares of a step cut into ``parts`` micro-batches for gradient
    accumulation (``runtime.micro_batches``), as many as the longer share allows: every rank
    holds equal shares (:func:`shard`), so every rank makes the same number of passes and none
    is empty, which ZeRO-3's collective gathers in the forward and backward require."""
    k = max(1, min(parts, max(len(forget), len(retain))))

    def cut(xs: Sequence[int], j: int) -> list[int]:
        return list(xs[j * len(xs) // k:(j + 1) * len(xs) // k])
    return [(cut(forget, j), cut(retain, j)) for j in range(k)]


def shard_strided(n: int, rank: int, world_size: int) -> list[int]:
    """Indices rank, rank+W, ... of n items: for evaluation, where shares may differ by one."""
    return list(range(rank, n, world_size))
