"""What one run reads, once per process: the tokenizer, the forget set with its mismatch
answers, the preference pairs of J and the held-out ones, the retain set, and the reference
(θ0) log-probs that the losses and metrics compare against."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from u2a_dist import progress
from u2a_dist.config import RunConfig
from u2a_dist.data.examples import (
    Completion,
    grounded_answers,
    load_completions,
    load_pairs,
    load_prompts,
    mismatch_answers,
    with_rejected_refusals,
)
from u2a_dist.data.readers import DataError
from u2a_dist.data.tokenize import encode
from u2a_dist.data_spec import spec_paths
from u2a_dist.evaluate import EncodedPairs, encode_pairs, pair_logps
from u2a_dist.generation import answer_items, encode_prompts, generate
from u2a_dist.models import load_tokenizer, resolve_model_dir
from u2a_dist.retain_terms import refusal_items
from u2a_dist.sampling import outer_pairs_used
from u2a_dist.sharded import dataset_logps
from u2a_dist.theta0_cache import Theta0Cache

Item = dict[str, list[int]]


@dataclass
class ForgetSet:
    examples: list[Completion]
    items: list[Item]
    mismatch: list[Item] | None  # (x_i, y'_i) for the mismatch term
    #: y'_i is x_i's own answer in data.mismatch, not a template (reports: selection_labels)
    grounded: list[bool] | None = None

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    def __len__(self) -> int:
        return len(self.items)


class RunInputs:
    """The run's data, tokenised (``u2a_dist.data`` reads each spec once per process)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.resolved = resolve_model_dir(cfg.model)
        self.tokenizer = load_tokenizer(cfg.model, self.resolved)
        self.pad_id = self.tokenizer.pad_token_id
        self.forget = self._load_forget()
        self.pa = self._pairs(cfg.data.pa, cfg.data.pa_refusals)
        self.pa_eval = self._pairs(cfg.data.pa_eval)  # the real preference, as it is

    def encode(self, prompt: str, response: str, history=None) -> Item:
        return encode(self.tokenizer, prompt, response, history, self.cfg.data.max_length)

    def _load_forget(self) -> ForgetSet:
        examples = load_completions(self.cfg.data.forget)
        if not examples:
            raise DataError(f"{spec_paths(self.cfg.data.forget)}: the forget set is empty")
        items = [self.encode(e.prompt, e.response, e.history) for e in examples]
        mismatch, refusals, grounded = None, [], None
        if self.cfg.data.mismatch is not None:
            candidates = load_completions(self.cfg.data.mismatch)
            answers = mismatch_answers(examples, candidates, spec_paths(self.cfg.data.mismatch))
            mismatch = [self.encode(e.prompt, y, e.history) for e, y in zip(examples, answers)]
            refusals = [c for c in candidates if not c.prompt.strip()]
            grounded = grounded_answers(examples, candidates)
        if self.cfg.data.refusals is not None:  # the contrast's own set, prompts ignored
            refusals = load_completions(self.cfg.data.refusals)
        self.refusals = self._responses(refusals)  # the contrast's refusals, tokenised
        return ForgetSet(examples, items, mismatch, grounded)

    def _responses(self, completions) -> list[list[int]]:
        eos = [self.tokenizer.eos_token_id]
        return [self.tokenizer(c.response, add_special_tokens=False)["input_ids"] + eos
                for c in completions]

    def retain_refusals(self, retain: list[Item]) -> list[Item] | None:
        """(x_j, a refusal) per retain item for the over-refusal contrast, when it is on."""
        if self.cfg.unlearn.retain_refusal_weight <= 0 or not retain:
            return None
        if not self.refusals:
            where = self.cfg.data.refusals or self.cfg.data.mismatch
            raise DataError(f"{spec_paths(where)}: unlearn."
                            "retain_refusal_weight > 0 needs prompt-less refusals here (e.g. "
                            "builtin:refusal_templates)")
        return refusal_items(retain, self.refusals, self.cfg.data.max_length)

    def _pairs(self, spec, refusals=None) -> EncodedPairs | None:
        if spec is None:
            return None
        pairs = load_pairs(spec)
        if refusals is not None:
            pairs = with_rejected_refusals(pairs, [c.response for c in load_completions(refusals)],
                                           spec_paths(refusals))
        return encode_pairs(self.tokenizer, pairs, self.cfg.data.max_length)

    def load_retain(self, reference: torch.nn.Module | None,
                    theta0_cache: Theta0Cache | None = None) -> tuple[list[Item], float]:
        """The retain set D_r and the seconds spent generating it. A ``prompts`` spec means
        θ0's (``reference``'s) own greedy answers to those prompts (sharded over the ranks;
        deterministic, so a resumed run makes the same ones, and ``theta0_cache`` may hold
        them): the retain KL then holds the model to what it answered before."""
        spec = self.cfg.data.retain
        if spec is None:
            return [], 0.0
        theta0_cache = theta0_cache or Theta0Cache.off()
        items: list[Item] = []
        seconds = 0.0
        for one in spec if isinstance(spec, list) else [spec]:
            if one.schema != "prompts":
                items += [self.encode(c.prompt, c.response, c.history)
                          for c in load_completions(one)]
                continue
            t0 = time.perf_counter()
            prompt_ids = encode_prompts(self.tokenizer, load_prompts(one),
                                        self.cfg.data.max_length)
            bs, new = self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens
            what = f"{len(prompt_ids)} prompts of {one.path}"
            with progress.phase("retain answers", what=what):
                answers = theta0_cache.generations(
                    f"retain answers ({what})", prompt_ids,
                    {"batch_size": bs, "max_new_tokens": new},
                    partial(generate, reference, self.tokenizer, prompt_ids, bs, new))
            seconds += time.perf_counter() - t0
            items += answer_items(prompt_ids, answers)
        return items, seconds

    def reference_logps(self, model: torch.nn.Module, forget: bool,
                        theta0_cache: Theta0Cache | None = None) -> dict[str, torch.Tensor]:
        """Scalar log-probs at θ0 (``model``, before any checkpoint is loaded), computed once
        (or read from ``theta0_cache``, each part by what it depends on): the forget set's when
        the loss needs them, the held-out pairs', J's pairs'."""
        theta0_cache = theta0_cache or Theta0Cache.off()
        cache: dict[str, torch.Tensor] = {}
        bs = self.cfg.eval.batch_size
        was_training = model.training
        model.eval()

        def part(what: str, inputs: Any, compute) -> None:
            cache.update(theta0_cache.tensors(f"reference log-probs of {what}",
                                              {"part": what, "batch_size": bs, **inputs},
                                              compute))

        with progress.phase("reference log-probs"):
            if forget:
                part("the forget set", {"items": self.forget.items}, lambda: {
                    "forget": dataset_logps(model, self.forget.items, self.pad_id, bs)[0]})
            if self.pa_eval is not None:
                part("the held-out pairs", {"pairs": _pair_tokens(self.pa_eval)},
                     lambda: dict(zip(["pa_eval/chosen", "pa_eval/rejected"],
                                      pair_logps(model, self.pa_eval, self.pad_id, bs))))
            if self.pa is not None and self.cfg.selector.enabled:
                used = outer_pairs_used(len(self.pa), self.cfg)
                part("J's pairs", {"pairs": _pair_tokens(self.pa, used), "used": used,
                                   "n": len(self.pa)},
                     lambda: dict(zip(["pa/chosen", "pa/rejected"],
                                      self._pa_reference(model, used, bs))))
        model.train(was_training)
        return cache

    def _pa_reference(self, model, used: list[int],
                      bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the pairs J will draw (``used``, selector.outer_sample): NaN
        for the rest, so a pair outside every round's sample cannot be used by mistake. On
        SmolLM2 all 663 pairs took ~5 min of start-up where 3 rounds of 64 draw under 200."""
        subset = EncodedPairs([self.pa.ids[i] for i in used], [self.pa.chosen[i] for i in used],
                              [self.pa.rejected[i] for i in used])

        def spread(part: torch.Tensor) -> torch.Tensor:
            return torch.full((len(self.pa),), float("nan"), dtype=part.dtype).index_copy_(
                0, torch.tensor(used), part)

        chosen, rejected = pair_logps(model, subset, self.pad_id, bs)
        return spread(chosen), spread(rejected)


def _pair_tokens(pairs: EncodedPairs, used: list[int] | None = None) -> list:
    """What a pair set's reference log-probs depend on: the tokens of its pairs (those used)."""
    keep = range(len(pairs)) if used is None else used
    return [[pairs.chosen[i], pairs.rejected[i]] for i in keep]
