"""The model card of an exported ``model/`` (its ``README.md``), the way the Hugging Face Hub
reads one: YAML front matter (``base_model``, ``library_name``, ``tags``) and then what the model
is, what it was trained on, what changed (before → after, with Wilson 95% intervals) and the
command that reproduces it.

A pure function of the resolved config and the run's summary, so it is testable without
training and the offline ``u2a export`` writes the same card as the run did.
"""

from __future__ import annotations

from typing import Any

import yaml

from u2a_dist.config import RunConfig
from u2a_dist.data_spec import DataSpec, as_list, source_name
from u2a_dist.eval_sources import interval_of, training_source_names

#: Hub tags of every u2a export (searchable on the Hub).
TAGS = ["u2a", "unlearning", "alignment"]
#: Data specs of the config, in the order a reader wants them, with what each is for.
DATA_ROLES = (("forget", "forget set (unlearned)"), ("pa", "preference pairs (outer objective)"),
              ("pa_eval", "preference pairs (evaluation)"), ("retain", "retain set"),
              ("mismatch", "mismatch answers"))
EVAL_ROLES = (("harmful_prompts", "harmful"), ("harmless_prompts", "harmless"))


#: The hub id and licence of a model preset (models.SMOLLM2): the hub links a card's
#: ``base_model`` only when it is a hub id, and this preset's licence is known (Apache-2.0).
PRESET_HUB = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def _front_matter(cfg: RunConfig, license_id: str | None) -> str:
    base, known_license = PRESET_HUB.get(cfg.model.name_or_path, (cfg.model.name_or_path, None))
    meta: dict[str, Any] = {"base_model": base,
                            "library_name": "transformers", "tags": list(TAGS)}
    # a wrong license is worse than none: only written when known
    if license_id or known_license:
        meta["license"] = license_id or known_license
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _spec_line(role: str, spec: DataSpec) -> str:
    # an in-memory Dataset has no path worth printing: its source name stands for it
    path = spec.path if isinstance(spec.path, str) else "(in-memory dataset)"
    notes = ([f"split `{spec.split}`"] if spec.split else []) + \
            ([f"limit {spec.limit}"] if spec.limit is not None else [])
    return f"| {role} | `{path}` | {spec.schema} | {source_name(spec)} | {', '.join(notes)} |"


def _method_lines(cfg: RunConfig) -> list[str]:
    u = cfg.unlearn
    loss = u.loss + (f" (β = {u.npo_beta:g})" if u.loss == "npo" else "")
    args = ", ".join(f"{k}={v}" for k, v in sorted(u.loss_args.items()))
    # the weights are what makes two runs of the same loss different models
    lines = [f"- Inner objective: loss `{loss}`" + (f" with {args}" if args else ""),
             f"  - weights: forget c_f = {u.forget_weight:g}, mismatch c_m = "
             f"{u.mismatch_weight:g}, retain KL c_r = {u.retain_kl_weight:g}, proximal "
             f"λ = {u.prox_lambda:g}" + (f", over-refusal contrast c_o = "
                                         f"{u.retain_refusal_weight:g} (β_o = "
                                         f"{u.retain_refusal_beta:g})"
                                         if u.retain_refusal_weight > 0 else ""),
             f"  - optimiser {u.optimizer}, lr {u.lr:g}, up to {u.steps} steps, "
             f"global forget batch {u.batch_size}"
             + (f", retain batch {u.retain_batch_size}" if u.retain_batch_size else "")]
    if cfg.selector.enabled:
        s = cfg.selector
        lines.append(f"- Selector: **on** (U2A: {s.rounds} rounds of {s.steps_per_round} steps, "
                     f"top-k {s.top_k}, score `{s.score}`, iHVP `{s.ihvp}`)")
    else:
        lines.append("- Selector: **off** (uniform weights over the forget set)")
    return lines


def _held_out(cfg: RunConfig, after: dict[str, float]) -> list[str]:
    """One line per evaluation source, held out or not. The run's own flags (summary) also
    count prompts shared with training; without them, only names are compared."""
    trained = training_source_names(cfg)
    lines = []
    for key, kind in EVAL_ROLES:
        for spec in as_list(getattr(cfg.eval, key)):
            name = source_name(spec)
            flag = after.get(f"eval/held_out@{name}")
            held = (name not in trained) if flag is None else bool(flag)
            how = "" if flag is not None else " (by source name)"
            lines.append(f"- {name} ({kind}): {'held out' if held else 'NOT held out'}{how}")
    if cfg.data.hold_out_sources:
        lines.append("- `data.hold_out_sources` (training rows with their prompts dropped): "
                     + ", ".join(cfg.data.hold_out_sources))
    return lines


def _is_metric(key: str) -> bool:
    # counts and held-out flags are what the intervals are computed from, not results
    return not (key.startswith("timing/") or key.startswith("eval/count")
                or key.startswith("eval/held_out@"))


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—" if value is None else str(value)
    iv = interval_of(metrics, key)
    if iv is None:
        return f"{value:.4f}"
    k, n, lo, hi = iv
    return f"{value:.4f} [{lo:.3f}, {hi:.3f}] ({k}/{n})"


def metric_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Markdown rows: metric | before | after, rates with their Wilson 95% interval and k/n."""
    keys = sorted(k for k in set(before) | set(after) if _is_metric(k))
    if not keys:
        return ["No evaluation metrics were recorded for this run."]
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {_cell(before, k)} | {_cell(after, k)} |" for k in keys]
    return lines


def reproduce_command(run_dir: str) -> str:
    """The command that retrains this model from the run's resolved config."""
    return f"u2a run --config {run_dir.rstrip('/')}/config.yaml"


def build_model_card(cfg: RunConfig, summary: dict[str, Any], run_dir: str | None = None,
                     license_id: str | None = None) -> str:
    """README.md text for the ``model/`` of a run with resolved config ``cfg`` and
    ``summary`` (summary.json: ``before``/``after`` metric dicts, ``step``, ``stopped``);
    ``run_dir`` defaults to ``cfg.out``."""
    run_dir = str(run_dir if run_dir is not None else cfg.out)
    before, after = summary.get("before") or {}, summary.get("after") or {}
    base = cfg.model.name_or_path
    lines = [_front_matter(cfg, license_id), "",
             f"# {base} unlearned with U2A", "",
             f"This model is `{base}` fine-tuned by u2a-dist (U2A: unlearning to align), "
             "which unlearns the forget set's completions"
             + (", weighted by a selector by how much each one moves a preference objective."
                if cfg.selector.enabled else " with uniform weights (selector off)."), "",
             "## Method", "", f"- Base model: `{base}`", *_method_lines(cfg)]
    if "step" in summary:
        lines.append(f"- Trained {summary['step']} steps (stopped: "
                     f"{summary.get('stopped', 'unknown')}), world size "
                     f"{summary.get('world_size', '?')}")
    lines += ["", "## Data", "", "| role | path | schema | source | notes |",
              "|---|---|---|---|---|"]
    for key, role in DATA_ROLES:
        lines += [_spec_line(role, s) for s in as_list(getattr(cfg.data, key))]
    for key, kind in EVAL_ROLES:
        lines += [_spec_line(f"evaluation ({kind})", s) for s in as_list(getattr(cfg.eval, key))]
    held = _held_out(cfg, after)
    if held:
        lines += ["", "Evaluation sources (held out = no training spec reads the source and "
                  "none of its prompts is a training prompt):", "", *held]
    lines += ["", "## Evaluation: before → after", "",
              "Rates show the Wilson 95% interval and k/n; `@source` is one evaluation "
              "source, `@held_out` the held-out sources pooled.", "",
              *metric_table(before, after),
              "", "## Reproduce", "", "```bash", reproduce_command(run_dir), "```", ""]
    return "\n".join(lines)


__all__ = ["build_model_card", "metric_table", "reproduce_command", "TAGS"]
