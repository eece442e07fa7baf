"""Evaluation by source (docs/design.md §5): where each evaluation prompt comes from, whether
training touched that source, and per-source rates with Wilson 95% intervals.

A source is a set of prompts written one way (AdvBench's imperatives, HarmBench, Alpaca,
TruthfulQA's questions). A model that learned a surface cue of one source's phrasing looks
aligned on held-out *prompts* of that source and fails on another, so a source counts as held
out only when no training spec reads it (by name) and none of its prompts occurs in the training
data. Metrics are reported per source as ``eval/<metric>@<source>``, pooled over the held-out
sources as ``eval/<metric>@held_out``, and a target is judged on the held-out sources whenever
there are any (``target_value``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from u2a_dist.config import RunConfig
from u2a_dist.data.examples import load_prompts
from u2a_dist.data.records import Prompt, prompt_key
from u2a_dist.data_spec import as_list, source_name

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054
HELD_OUT = "held_out"
#: Metrics reported per source, by the kind of prompts they are rates over.
PER_SOURCE: dict[str, tuple[str, ...]] = {
    "harmful": ("eval/harmful_no_refusal", "eval/degenerate_rate", "eval/harmful_rate"),
    "harmless": ("eval/over_refusal", "eval/harmless_degenerate_rate"),
}
KIND_OF = {m: kind for kind, metrics in PER_SOURCE.items() for m in metrics}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927): unlike p ± z·se it
    stays inside [0, 1] and does not collapse to a point at k = 0 or k = n, where small
    evaluation sets put most of the rates that matter."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # k = 0 and k = n give 0 and 1 exactly (the formula rounds to 2.8e-17 and 1 - 1e-16)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def training_source_names(cfg: RunConfig) -> set[str]:
    """Source names of the data training reads (forget, pa, retain)."""
    d = cfg.data
    return {source_name(s) for spec in (d.forget, d.pa, d.retain) for s in as_list(spec)}


@dataclass
class EvalSource:
    """One evaluation source: its prompts (training prompts dropped when asked) and why it is
    not held out, if it is not."""

    name: str
    kind: str  # harmful | harmless
    prompts: list[Prompt]
    read_by_training: bool  # a training spec has the same source name
    in_training: int  # how many of its prompts the training data contains
    repeats: int = 0  # rows dropped as repeats of an earlier prompt of this source

    @property
    def held_out(self) -> bool:
        return not self.read_by_training and self.in_training == 0

    def status(self) -> str:
        if self.held_out:
            return "held out"
        why = (["training reads this source"] if self.read_by_training else []) + \
              ([f"{self.in_training} of its prompts are training prompts"]
               if self.in_training else [])
        return "NOT held out (" + "; ".join(why) + ")"


def load_eval_sources(cfg: RunConfig, kind: str, training_keys: set[str],
                      drop: set[str]) -> list[EvalSource]:
    """The sources of ``eval.<kind>_prompts``, in config order, each prompt once (a file
    holding several models' answers per prompt repeats it: greedy decoding would count the
    same answer that many times), without the prompts whose key is in ``drop``; a prompt in
    ``training_keys`` counts against held-out either way."""
    trained = training_source_names(cfg)
    out = []
    for spec in as_list(getattr(cfg.eval, f"{kind}_prompts")):
        rows = load_prompts(spec)
        prompts = _distinct(rows)
        in_training = sum(prompt_key(p.prompt) in training_keys for p in prompts)
        kept = [p for p in prompts if prompt_key(p.prompt) not in drop]
        out.append(EvalSource(source_name(spec), kind, kept, source_name(spec) in trained,
                              in_training, repeats=len(rows) - len(prompts)))
    return out


def _distinct(prompts: list[Prompt]) -> list[Prompt]:
    """The first row of each (history, prompt): the rest ask the model the same thing."""
    seen: set[tuple] = set()
    out = []
    for p in prompts:
        key = (json.dumps(p.history, sort_keys=True), prompt_key(p.prompt))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def rates_by_source(sources: Sequence[EvalSource], flags: dict[str, Sequence[bool]]
                    ) -> dict[str, float]:
    """Per-source and held-out-pooled rates of per-prompt ``flags`` (metric → one flag per
    prompt of ``sources``, in order), with the counts their intervals need."""
    out: dict[str, float] = {}
    held: list[int] = []
    start = 0
    for src in sources:
        idx = range(start, start + len(src.prompts))
        start = idx.stop
        if not idx:
            continue
        out[f"eval/count@{src.name}"] = float(len(idx))
        out[f"eval/held_out@{src.name}"] = float(src.held_out)
        for metric, f in flags.items():
            out[f"{metric}@{src.name}"] = sum(bool(f[i]) for i in idx) / len(idx)
        if src.held_out:
            held += idx
    if sources:
        out[f"eval/count_{sources[0].kind}"] = float(start)
    if held:
        kind = sources[0].kind
        out[f"eval/count_{kind}@{HELD_OUT}"] = float(len(held))
        for metric, f in flags.items():
            out[f"{metric}@{HELD_OUT}"] = sum(bool(f[i]) for i in held) / len(held)
    return out


def target_value(metrics: dict[str, float], metric: str) -> tuple[float | None, str]:
    """The value a target on ``metric`` is judged by, and over what: for a rate, the held-out
    sources' pooled rate when any source of its kind is held out, else the rate over every
    evaluation prompt ("seen sources": the report says so); ``rate@source`` is that source."""
    base, _, where = metric.partition("@")
    if where:
        held = "held out" if metrics.get(f"eval/held_out@{where}") else "NOT held out"
        return metrics.get(metric), f"source {where}, {held}"
    if f"{metric}@{HELD_OUT}" in metrics:
        return metrics[f"{metric}@{HELD_OUT}"], "held-out sources"
    return metrics.get(metric), "seen sources" if metric in KIND_OF else "all"


def interval_of(metrics: dict[str, float], key: str) -> tuple[int, int, float, float] | None:
    """(k, n, lo, hi) for a rate key ``eval/<metric>[@<source>|@held_out]`` whose count is
    known, else None (perplexities, judge probabilities)."""
    metric, _, where = key.partition("@")
    kind = KIND_OF.get(metric)
    if kind is None or key not in metrics:
        return None
    count = (metrics.get(f"eval/count_{kind}@{HELD_OUT}") if where == HELD_OUT
             else metrics.get(f"eval/count@{where}") if where
             else metrics.get(f"eval/count_{kind}"))
    if not count:
        return None
    n = int(count)
    k = round(metrics[key] * n)
    return (k, n, *wilson_interval(k, n))


def crosses(bound: float, interval: tuple[int, int, float, float] | None) -> bool:
    """True when the bound lies inside the 95% interval: the data cannot tell the side."""
    return interval is not None and interval[2] <= bound <= interval[3]


def source_table(metrics: dict[str, float]) -> list[str]:
    """One line per source and per-source metric: rate, 95% interval, n, held out or not."""
    lines = []
    names = [k.split("@", 1)[1] for k in metrics if k.startswith("eval/count@")]
    for name in [*names, HELD_OUT]:
        for metric in KIND_OF:
            iv = interval_of(metrics, f"{metric}@{name}")
            if iv is None:
                continue
            k, n, lo, hi = iv
            status = ("pooled" if name == HELD_OUT else
                      "held out" if metrics.get(f"eval/held_out@{name}") else "NOT held out")
            lines.append(f"{name:24s} {metric:32s} {k / n:6.3f} [{lo:.3f}, {hi:.3f}] "
                         f"n={n:<4d} {status}")
    return lines
