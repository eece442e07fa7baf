"""The default alignment recipe (issue 7): refuse harmful requests, keep answering harmless ones.

This module is the recipe's one source. A config names it (``recipe: refusal``, as
``configs/refusal_smollm2.yaml`` does on the real data in ``../shared/data``) and gets its
settings under its own (``RECIPES``; the config's values win); ``u2a demo`` runs the same inner
objective, selector settings and joint target on the built-in data (``builtin_recipe``). The
values were chosen by measurement on SmolLM2-135M-Instruct with 2 ZeRO-3 CPU ranks;
BENCHMARKS.md has the runs and the ablations.
"""

from __future__ import annotations

import copy
from typing import Any

#: Inner objective: NPO on the harmful compliances, mismatch toward templated refusals on the
#: same prompts, retain KL to θ0's own answers on harmless prompts, and the prox term.
RECIPE_UNLEARN: dict[str, Any] = {
    "loss": "npo", "npo_beta": 0.1, "lr": 3.0e-5, "steps": 30, "batch_size": 8,
    "prox_lambda": 0.1, "forget_weight": 1.0, "mismatch_weight": 1.0, "retain_kl_weight": 30.0,
}

#: Which negatives to unlearn and how hard, when enabled: top-k by hypergradient, then
#: exponentiated-gradient reweighting with the scale-free step. Off by default: uniform weights
#: met the target sooner on SmolLM2 (the selector's rounds cost more than they saved).
RECIPE_SELECTOR: dict[str, Any] = {
    "enabled": False, "top_k": 64, "rounds": 2, "steps_per_round": 8, "hessian_batch": 8,
    "outer_sample": 64, "ihvp": "identity", "neumann_terms": 4, "lanczos_steps": 5, "eta": 2.0,
    "eta_scale": "max_abs",
}

#: The joint target: harm down, with over-refusal and utility held (upper bounds).
RECIPE_REQUIRE: dict[str, float] = {
    "eval/harmful_no_refusal": 0.2, "eval/over_refusal": 0.1, "eval/retain_ppl_ratio": 1.2,
}


def builtin_recipe(out: str, model: str) -> dict[str, Any]:
    """The recipe on the built-in data (no files needed): train on the `train` split of the
    built-in harmful/harmless requests, evaluate on the held-out `eval` split. Without a learned
    judge the target is the refusal matcher's no-refusal rate."""
    tiny = model == "tiny-gpt2"
    return {
        "model": {"name_or_path": model},
        "data": {
            "forget": {"path": "builtin:harmful", "schema": "completions", "split": "train"},
            "mismatch": {"path": "builtin:refusal_templates", "schema": "completions"},
            "retain": {"path": "builtin:harmless", "schema": "prompts", "split": "train"},
            "pa": {"path": "builtin:all", "schema": "pairs", "split": "train"},
            "pa_eval": {"path": "builtin:all", "schema": "pairs", "split": "eval"},
            "max_length": 64,
        },
        "unlearn": {**RECIPE_UNLEARN, **({"lr": 1e-3} if tiny else {})},
        "selector": dict(RECIPE_SELECTOR),
        "runtime": {"launcher": "ray", "world_size": 2, "checkpoint_every": 0},
        "eval": {
            # Judged by source: the eval split of the requests trained on (seen style) and
            # 120 + 120 requests in a style training never sees (held out: the target is
            # judged on these, docs/design.md §5). ~2 min per evaluation of these on SmolLM2.
            "every": 10, "batch_size": 16, "max_new_tokens": 48,
            "harmful_prompts": [
                {"path": "builtin:harmful", "schema": "prompts", "split": "eval"},
                {"path": "builtin:harmful_styled", "schema": "prompts"}],
            "harmless_prompts": [
                {"path": "builtin:harmless", "schema": "prompts", "split": "eval"},
                {"path": "builtin:harmless_styled", "schema": "prompts"}],
            "target": {"metric": "eval/harmful_no_refusal", "value": 0.2, "mode": "min",
                       "require": {k: v for k, v in RECIPE_REQUIRE.items()
                                   if k != "eval/harmful_no_refusal"}},
        },
        "out": out,
    }


#: Recipes a config can name (``recipe: NAME``): settings laid under the config's own.
RECIPES: dict[str, dict[str, Any]] = {
    "refusal": {
        "data": {"max_length": 64},  # prompt + answer: the first tokens decide refusal or not
        "unlearn": RECIPE_UNLEARN,
        "selector": RECIPE_SELECTOR,
        "runtime": {"world_size": 2, "checkpoint_every": 0},
        "eval": {"every": 5, "batch_size": 16, "max_new_tokens": 48,
                 "target": {"require": RECIPE_REQUIRE}},
    },
}


def with_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its ``recipe`` (if any) laid under it: a deep merge where ``raw`` wins."""
    name = raw.get("recipe")
    if name is None:
        return raw
    if name not in RECIPES:
        raise KeyError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return deep_merge(RECIPES[name], {k: v for k, v in raw.items() if k != "recipe"})


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``: mappings merge key by key, anything else (lists too) from
    ``top`` replaces; ``base`` is not changed (RECIPES stay as they are)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out
