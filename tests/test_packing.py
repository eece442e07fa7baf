"""Packed batches (data.tokenize.pack): the layout by hand, and every item's log-prob packed
equal to its padded one on real GPT-2 and Llama models (eager and sdpa attention)."""

from __future__ import annotations

import pytest
import torch

from u2a_dist.data.tokenize import IGNORE, pack, packed_real_tokens, packing_ok, rows_batch
from u2a_dist.losses import (
    forward_logits,
    item_logps,
    label_logits,
    label_positions,
    token_logps,
)


def _items(lengths: list[int], vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        n_prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})
    return out


def test_pack_lays_items_first_fit_by_decreasing_length() -> None:
    items = [{"input_ids": [7, 8], "labels": [IGNORE, 8]},
             {"input_ids": [4, 5, 6], "labels": [IGNORE, 5, 6]},
             {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}]  # no prompt: first label masked
    b = pack(items, pad_id=0, width=5)
    # longest first: item 1 opens row 0, item 2 opens row 1, item 0 fills row 0
    assert b["input_ids"].tolist() == [[4, 5, 6, 7, 8], [9, 10, 11, 0, 0]]
    assert b["segment"].tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, -1, -1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[IGNORE, 5, 6, IGNORE, 8], [IGNORE, 10, 11, IGNORE, IGNORE]]
    # what a forward hook can tell from ids and positions alone: the row-ending padding
    assert packed_real_tokens(b["input_ids"], b["position_ids"], 0).tolist() == [
        [True] * 5, [True, True, True, False, False]]


def _gpt2(attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=384, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def _llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_log_probs_equal_padded_ones_one_item_at_a_time(build, attn) -> None:
    model = build(attn)
    items = _items([9, 23, 5, 17, 30, 12, 8], vocab=384)
    packed = pack(items, pad_id=0)
    assert len(packed["input_ids"]) < len(items)  # several items share a row
    with torch.no_grad():
        got, n_got = item_logps(label_logits(model, packed), packed["labels"],
                                packed["segment"], len(items))
        alone = [token_logps(model(input_ids=torch.tensor([x["input_ids"]])).logits,
                             torch.tensor([x["labels"]])) for x in items]
    torch.testing.assert_close(got, torch.cat([a for a, _ in alone]), rtol=1e-5, atol=1e-4)
    assert n_got.tolist() == [int(c) for _, c in alone]
    assert packing_ok(model, items, pad_id=0)


def test_a_model_that_ignores_position_ids_is_caught() -> None:
    model = _llama("sdpa")

    def no_positions(input_ids, position_ids=None, attention_mask=None, **kwargs):
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    no_positions.training = False
    no_positions.eval = no_positions.train = lambda *a: None
    no_positions.get_output_embeddings = model.get_output_embeddings
    items = _items([9, 23], vocab=384)
    assert not packing_ok(no_positions, items, pad_id=0)
    padded = rows_batch(items, 0, packed=False)
    assert padded["segment"][0].tolist() == [0] * 9 + [-1] * 14


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_label_logits_are_the_whole_logits_at_the_labelled_positions_only(build) -> None:
    """label_logits: the output layer sees only the hidden states that predict a label (no
    [B, T, V] tensor, θ's or θ0's), row-major, equal to the whole logits there; its hook is
    gone after the call."""
    model = build("sdpa")
    items = _items([9, 23, 5, 17, 30, 12, 8], vocab=384)
    head_outputs: list[tuple[int, ...]] = []
    seen = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: head_outputs.append(tuple(out.shape)))
    for batch in (pack(items, pad_id=0), rows_batch(items, 0, packed=False)):
        with torch.no_grad():
            got = label_logits(model, batch)
            whole = forward_logits(model, batch)
        at = label_positions(batch["labels"])
        n = sum(sum(t != IGNORE for t in x["labels"][1:]) for x in items)
        assert int(at.sum()) == n and got.shape == (n, 384)
        torch.testing.assert_close(got, whole[at], rtol=1e-5, atol=1e-5)
        assert head_outputs[-2:] == [(n, 384), (*batch["input_ids"].shape, 384)]
        with torch.no_grad():  # a model whose head is not the module it names: selected after
            torch.testing.assert_close(label_logits(_Unhooked(model), batch), whole[at])
    seen.remove()


class _Unhooked(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.other = model, torch.nn.Linear(1, 1)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.other

    def forward(self, **inputs):
        return self.model(**inputs)
