"""Typed run configuration: YAML file + dotted ``section.key=value`` overrides, validated.

Every error names the offending key (``unlearn.lr``) so a user can fix a YAML file without reading
the code. The resolved config is what gets saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from u2a_dist.config_files import apply_overrides, read_config_file
from u2a_dist.data_spec import SCHEMAS, DataSpec, as_list, source_name
from u2a_dist.losses import LOSSES
from u2a_dist.recipes import with_recipe
from u2a_dist.selector_config import SelectorConfig
from u2a_dist.typed import ConfigError, build_dataclass


@dataclass
class LoraConfig:
    """LoRA adapters (built by peft) in place of full fine-tuning: the optimizer, the prox term
    and the selector see the adapters only, and the base weights stay θ0's."""
    r: int = field(default=16, metadata={"help": "Adapter rank."})
    alpha: float = field(default=32.0, metadata={"help": "Scale: the update is (alpha/r)·BA."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the adapters' input; 0 with the selector (finite differences need "
                "the same function at θ ± εv)."})
    target_modules: Union[str, list[str]] = field(default="all-linear", metadata={
        "help": "peft's all-linear (every linear layer but the output head) or module names."})


@dataclass
class ModelConfig:
    name_or_path: str = field(default="tiny-gpt2", metadata={
        "help": "tiny-gpt2 | smollm2-135m-instruct | local HF dir | hub id | path/to/file.gguf"
                " | random:smollm2-135m|360m|1.7b (random weights: cost benchmarks only)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa | eager: the same attention; sdpa's fused kernels ran SmolLM2's recipe step "
                "at 1.08 of the plain forward+backward ceiling where eager ran at 0.79 "
                "(BENCHMARKS.md); eager only for double-backward checks (tiny-gpt2 is eager)."})
    pad_token: str | None = field(default=None, metadata={
        "help": "Token to use as pad when the tokenizer has none (else that is an error)."})
    lora: LoraConfig | None = field(default=None, metadata={
        "help": "LoRA adapters, e.g. {r: 16, alpha: 32}; None = every parameter trains."})


@dataclass
class DataConfig:
    # forget, pa, pa_eval and retain also take a list of specs, read and concatenated in order.
    forget: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Negatives to unlearn."})
    pa: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Preference pairs for J."})
    pa_eval: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Held-out pairs."})
    retain: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Normal data for retain KL; a `prompts` schema means θ0's own greedy answers "
                "to those prompts (made at start-up)."})
    mismatch: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Answers y' for the mismatch term: a negative whose prompt has answers here "
                "gets one of them (grounded, e.g. the pair's chosen side); the rest cycle "
                "through the prompt-less ones (`builtin:refusal_templates`)."})
    refusals: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Refusals (responses; prompts ignored) the over-refusal contrast lowers on "
                "retain prompts, e.g. the model's own; default: data.mismatch's prompt-less."})
    pa_refusals: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Refusals (responses; prompts ignored) that J's over-refusal pairs (helpful ≻ "
                "refusal on a harmless prompt, from labelled completions) reject instead of "
                "their own, in turn: the mismatch term's targets (builtin:refusal_templates) "
                "make J penalise the refusal that term teaches (BENCHMARKS, Noisy pools)."})
    max_length: int = field(default=256, metadata={"help": "Max tokens (prompt + response)."})
    hold_out_sources: list[str] = field(default_factory=list, metadata={
        "help": "Evaluation sources (names in eval.harmful_prompts/harmless_prompts) that "
                "training must not touch: forget, pa and retain rows whose prompt occurs in one "
                "are dropped, so it is held out. One per run is leave-one-source-out."})


@dataclass
class UnlearnConfig:
    loss: str = field(default="ga", metadata={
        "help": "The unlearning loss ℓ_i by name: ga | npo | any class registered in "
                "u2a_dist.losses.LOSSES."})
    loss_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Options of the loss class beyond npo_beta (its __init__ keyword arguments)."})
    lr: float = 1e-5
    steps: int = field(default=100, metadata={"help": "Optimiser step budget."})
    time_budget_s: float = field(default=0.0, metadata={"help": "Training-time budget in "
        "seconds (evaluation excluded, selector rounds included); 0 = none. Checked before each "
        "step and round on rank 0's clock: every rank stops at the same step (time_budget)."})
    batch_size: int = field(default=8, metadata={"help": "Global forget batch (all ranks)."})
    retain_batch_size: int = field(default=0, metadata={
        "help": "Global retain batch of the retain terms per step; 0 = batch_size."})
    prox_lambda: float = field(default=0.1, metadata={"help": "λ of (λ/2)‖θ−θ0‖²."})
    forget_weight: float = field(default=1.0, metadata={"help": "c_f, the weight of ℓ_i in "
        "∂L_in/∂w_i = c_f ℓ_i + c_m m_i (0 turns gradient ascent off, keeps the mismatch term)."})
    mismatch_weight: float = field(default=0.0, metadata={"help": "c_m"})
    retain_kl_weight: float = field(default=0.0, metadata={"help": "c_r"})
    retain_kl_topk: int = field(default=0, metadata={"help": "k > 0: θ0's side of the retain "
        "terms cached at start-up, its KL on θ0's top k tokens + the rest; no reference model."})
    retain_refusal_weight: float = field(default=0.0, metadata={
        "help": "c_o: over-refusal contrast on retain prompts, θ0's answer over a refusal "
                "(data.refusals, else data.mismatch's prompt-less answers); retain_terms.py."})
    retain_refusal_beta: float = field(default=2.0, metadata={"help": "β_o of that contrast"})
    retain_refusal_tokens: int = field(default=0, metadata={"help": "k > 0: that contrast on "
        "the first k response tokens of answer and refusal (where refusing is decided); 0: all."})
    npo_beta: float = 0.1
    optimizer: str = field(default="adamw", metadata={"help": "adamw | sgd"})
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "Global grad-norm clip; 0 = off."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear warm-up from 0 "
        "to lr (transformers' convention: the first step runs at lr 0 when > 0)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "constant | linear | "
        "cosine: the lr after warm-up over unlearn.steps, transformers.get_scheduler's "
        "schedules (linear and cosine decay to 0 at the last step)."})
    max_param_abs: float = field(default=1.0e4, metadata={
        "help": "An update leaving a parameter non-finite or above this magnitude is rolled "
                "back and stops the run (a blown-up lr): the last checkpoint stays good."})


DEVICES = ("auto", "cpu", "cuda")  # runtime.device (u2a_dist.device resolves them per rank)
ALLOCATORS = ("auto", "jemalloc", "system")  # runtime.allocator (u2a_dist.allocator applies it)
#: Trackers runtime.report_to can name (TRL's spelling); "all" means every one, "none" none.
REPORT_TO = ("tensorboard",)


def report_backends(value: str | list[str]) -> list[str]:
    """The trackers ``runtime.report_to`` turns on, in order; a ConfigError naming the key
    for anything but "none", "all", a supported name, or a list of those."""
    names = [value] if isinstance(value, str) else list(value)
    allowed = ("none", "all", *REPORT_TO)
    if any(n not in allowed for n in names) or ("none" in names and len(names) > 1):
        raise ConfigError(f"runtime.report_to must be 'none', 'all' (every supported tracker), "
                          f"a supported tracker or a list of those; supported: "
                          f"{list(REPORT_TO)}, got {value!r}")
    chosen = [b for n in names for b in (REPORT_TO if n == "all" else [n]) if b != "none"]
    return list(dict.fromkeys(chosen))


@dataclass
class RuntimeConfig:
    launcher: str = field(default="local", metadata={"help": "local | ray | deepspeed"})
    world_size: int = 2
    zero_stage: int = field(default=3, metadata={"help": "0 | 1 | 2 | 3"})
    ds_config: str = "ds_configs/zero3_cpu.json"
    seed: int = 0
    checkpoint_every: int = 50
    micro_batches: int = field(default=1, metadata={"help": "Forward/backward passes a rank "
        "makes per step (gradient accumulation: same gradient, about 1/n the activations)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each "
        "layer's activations in the backward (transformers'): more compute, far less memory."})
    max_failures: int = 2
    placement_strategy: str = field(default="PACK", metadata={"help": "PACK | SPREAD"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster address; None = the one `ray job submit` gave, else embedded."})
    timeout_s: int = field(default=600, metadata={"help": "Collective timeout (hang detector)."})
    device: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda: auto trains each rank on its GPU (LOCAL_RANK) when CUDA is "
                "available, else on the CPU; cuda fails without one; cpu ignores GPUs."})
    theta0_cache: str | None = field(default=None, metadata={
        "help": "Directory keeping θ0's work between runs of the same model and data (retain "
                "answers, reference log-probs, step-0 evaluation answers; u2a_dist/theta0_cache"
                ".py), e.g. ~/.cache/u2a_dist; None = recompute each run."})
    allocator: str = field(default="auto", metadata={"help": "auto | jemalloc | system: the "
        "ranks' malloc; auto: jemalloc where installed (less memory; u2a_dist/allocator.py)."})
    report_to: Union[str, list[str]] = field(default="none", metadata={
        "help": "none | tensorboard | all, or a list: rank 0 also writes every numeric "
                "field of metrics.jsonl as a scalar there (tensorboard: <out>/tensorboard/)."})


@dataclass
class TargetConfig:
    metric: str = "pa/accuracy"
    value: float = 0.8
    mode: str = field(default="max", metadata={"help": "max: met when ≥ value; min: ≤ value"})
    require: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Upper bounds that must hold too for the target to count as met (a joint "
                "target), e.g. {eval/over_refusal: 0.1, eval/retain_ppl_ratio: 1.2}; unlike "
                "eval.floors, missing one does not stop training."})


@dataclass
class EvalConfig:
    every: int = 25
    target: TargetConfig | None = field(default_factory=TargetConfig)
    batch_size: int = 16
    max_new_tokens: int = 48
    harmful_prompts: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Harmful prompts (a spec or a list, one per source): metrics are reported per "
                "source and pooled over the sources training did not touch."})
    harmless_prompts: DataSpec | list[DataSpec] | None = field(default=None, metadata={
        "help": "Harmless prompts, as harmful_prompts."})
    judge: str | None = field(default=None, metadata={
        "help": "Directory of a trained judge (u2a judge-train) or of an HF classifier."})
    floors: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Utility floors as upper bounds on metrics where lower is better, e.g. "
                "{eval/over_refusal: 0.2, eval/retain_ppl: 5}; breaking one stops training "
                "(stopped: floor)."})
    retain: DataSpec | None = field(default=None, metadata={
        "help": "Completions whose response-token perplexity is eval/retain_ppl; default: the "
                "reference model's own greedy answers to eval.harmless_prompts."})
    exclude_training_prompts: bool = field(default=True, metadata={
        "help": "Drop evaluation prompts that also occur in the training data (forget, pa, "
                "retain), so that generation metrics are held out; the count is logged."})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs/latest"

    def validate(self) -> RunConfig:
        """Check cross-field constraints; raise ConfigError naming the key."""
        _choice("model.dtype", self.model.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attn_implementation", self.model.attn_implementation, ("eager", "sdpa"))
        if (lora := self.model.lora) is not None:
            if lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
                raise ConfigError(f"model.lora {dataclasses.asdict(lora)}: needs r >= 1, "
                                  "alpha > 0 and 0 <= dropout < 1")
            if lora.dropout and self.selector.enabled:
                raise ConfigError("model.lora.dropout must be 0 with selector.enabled: the "
                                  "selector's finite differences compare passes at θ ± εv")
        _choice("unlearn.loss", self.unlearn.loss, tuple(sorted(LOSSES)))
        if (why := LOSSES[self.unlearn.loss].check_args(self.unlearn.loss_args)) is not None:
            raise ConfigError(f"unlearn.loss_args {self.unlearn.loss_args!r} do not fit "
                              f"unlearn.loss={self.unlearn.loss!r}: {why}")
        _choice("unlearn.optimizer", self.unlearn.optimizer, ("adamw", "sgd"))
        _choice("unlearn.lr_scheduler_type", self.unlearn.lr_scheduler_type,
                ("constant", "linear", "cosine"))
        _choice("selector.ihvp", self.selector.ihvp, ("neumann", "cg", "identity"))
        _choice("selector.hvp", self.selector.hvp, ("fd", "exact"))
        if self.selector.hvp == "exact" and self.runtime.zero_stage != 0:
            raise ConfigError("selector.hvp: exact needs runtime.zero_stage 0 (whole parameters "
                              f"on every rank), got {self.runtime.zero_stage}; or use fd")
        _choice("selector.score_on", self.selector.score_on, ("total", "forget", "mismatch"))
        _choice("selector.normalize", self.selector.normalize, ("none", "cosine"))
        if self.selector.score_on != "total" and self.selector.score != "directional":
            raise ConfigError(f"selector.score_on={self.selector.score_on} needs "
                              "selector.score=directional")
        if self.selector.score_on != "total" and not (self.unlearn.forget_weight > 0
                                                      and self.unlearn.mismatch_weight > 0):
            raise ConfigError(f"selector.score_on={self.selector.score_on} needs both terms on: "
                              "unlearn.forget_weight > 0 and unlearn.mismatch_weight > 0")
        _choice("selector.score", self.selector.score, ("directional", "per_example_grad",
                                                              "random"))
        _choice("selector.eta_scale", self.selector.eta_scale, ("raw", "max_abs"))
        _choice("runtime.launcher", self.runtime.launcher, ("local", "ray", "deepspeed"))
        _choice("runtime.zero_stage", self.runtime.zero_stage, (0, 1, 2, 3))
        _choice("runtime.placement_strategy", self.runtime.placement_strategy, ("PACK", "SPREAD"))
        _choice("runtime.device", self.runtime.device, DEVICES)
        _choice("runtime.allocator", self.runtime.allocator, ALLOCATORS)
        report_backends(self.runtime.report_to)
        _check_numbers(self)
        for key in ("selector.alpha", "selector.damping", "selector.fd_eps",
                    "selector.fd_rel_step"):
            value = _get(self, key)
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"{key} must be a number or 'auto', got {value!r}")
            if not isinstance(value, str) and (value < 0 or (key != "selector.damping"
                                                             and value == 0)):
                raise ConfigError(f"{key} must be positive, got {value!r}")
        for key in ("batch_size", "retain_batch_size"):
            if getattr(self.unlearn, key) % self.runtime.world_size:
                raise ConfigError(
                    f"unlearn.{key}={getattr(self.unlearn, key)} must be divisible by "
                    f"runtime.world_size={self.runtime.world_size} (each rank takes an equal "
                    "share)")
        if self.data.forget is None:
            raise ConfigError("data.forget is required: the negatives to unlearn")
        if self.unlearn.mismatch_weight > 0 and self.data.mismatch is None:
            raise ConfigError("unlearn.mismatch_weight > 0 needs data.mismatch")
        for key in ("retain_kl_weight", "retain_refusal_weight"):
            if getattr(self.unlearn, key) > 0 and self.data.retain is None:
                raise ConfigError(f"unlearn.{key} > 0 needs data.retain")
        refusals = self.data.refusals or self.data.mismatch
        if self.unlearn.retain_refusal_weight > 0 and not refusals:
            raise ConfigError("unlearn.retain_refusal_weight > 0 needs data.refusals or "
                              "data.mismatch (refusals)")
        if self.selector.enabled and self.data.pa is None:
            raise ConfigError("selector.enabled needs data.pa (the preference pairs of J)")
        if self.data.pa_refusals is not None and self.data.pa is None:
            raise ConfigError("data.pa_refusals needs data.pa (the pairs whose rejected side "
                              "they replace)")
        if self.eval.target is not None:
            _choice("eval.target.mode", self.eval.target.mode, ("max", "min"))
        for key in ("data.forget", "data.pa", "data.pa_eval", "data.retain", "data.mismatch",
                    "data.refusals", "data.pa_refusals", "eval.harmful_prompts",
                    "eval.harmless_prompts", "eval.retain"):
            specs = _get(self, key)
            for i, spec in enumerate(specs if isinstance(specs, list) else [specs]):
                if spec is not None:
                    _validate_spec(key + (f"[{i}]" if isinstance(specs, list) else ""), spec)
        _validate_sources(self.eval)
        _hold_out_sources(self)
        _validate_floors(self.eval)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


#: Numeric keys that must be > 0; every other numeric key must be >= 0 (and every one finite,
#: which ``typed.build_dataclass`` checks), except those in _SIGNED.
_POSITIVE = {
    "unlearn.lr", "unlearn.npo_beta", "unlearn.steps", "unlearn.batch_size",
    "selector.dpo_beta", "selector.eta", "selector.neumann_terms", "selector.cg_iters",
    "selector.identity_gamma", "selector.lanczos_steps", "selector.top_k",
    "selector.hessian_batch", "runtime.world_size", "runtime.timeout_s", "data.max_length",
    "eval.batch_size", "eval.max_new_tokens", "unlearn.max_param_abs", "runtime.micro_batches",
}
_SIGNED = {"eval.target.value"}


def _check_numbers(cfg: RunConfig) -> None:
    """Every numeric key finite, > 0 where it is a size/rate/time, >= 0 otherwise."""
    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, DataSpec):
                walk(value, key + ".")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ConfigError(f"{key} must be a finite number, got {value!r}")
                if key in _POSITIVE and not value > 0:
                    raise ConfigError(f"{key} must be > 0, got {value!r}")
                if key not in _SIGNED and value < 0:
                    raise ConfigError(f"{key} must be >= 0, got {value!r}")
    walk(cfg, "")


#: The side of a `trl` preference set (paired, or unpaired by label) that a completion role
#: reads when its spec names none: forget the dispreferred, keep or answer with the preferred.
_TRL_SIDES = {"data.forget": "rejected", "data.retain": "chosen", "data.mismatch": "chosen",
              "eval.retain": "chosen"}


def _validate_spec(key: str, spec: DataSpec) -> None:
    _choice(f"{key}.schema", spec.schema, SCHEMAS)
    if spec.schema == "trl" and spec.field is None:  # laid in, so config.yaml says it
        spec.field = _TRL_SIDES.get(key.partition("[")[0])
    if spec.field is not None:
        _choice(f"{key}.field", spec.field, ("chosen", "rejected", "prompt", "response"))
    if spec.split is not None:
        _choice(f"{key}.split", spec.split, ("train", "eval"))
    if not 0 < spec.eval_fraction < 1:
        raise ConfigError(f"{key}.eval_fraction must be in (0, 1), got {spec.eval_fraction}")
    if spec.limit is not None and spec.limit <= 0:
        raise ConfigError(f"{key}.limit must be positive, got {spec.limit}")
    if spec.near_duplicates < 0:
        raise ConfigError(f"{key}.near_duplicates must be >= 0, got {spec.near_duplicates}")


#: Metrics that exist only with generation-based evaluation, and the config key they need.
_GENERATION_METRICS = {
    "eval/harmful_rate": "judge", "eval/harmful_prob": "judge",
    "eval/refusal_rate": "harmful_prompts", "eval/harmful_no_refusal": "harmful_prompts",
    "eval/degenerate_rate": "harmful_prompts", "eval/over_refusal": "harmless_prompts",
    "eval/harmless_degenerate_rate": "harmless_prompts",
}


def _validate_sources(ec: EvalConfig) -> None:
    """Source names key per-source metrics (``eval/<metric>@<source>``): one name, one source."""
    kinds: dict[str, str] = {}
    for kind in ("harmful", "harmless"):
        for spec in as_list(getattr(ec, f"{kind}_prompts")):
            name = source_name(spec)
            if name == "held_out" or not name or any(c in name for c in "@/ "):
                raise ConfigError(f"eval.{kind}_prompts: source name {name!r} of {spec.path} "
                                  "is not usable (not 'held_out', no '@', '/' or spaces)")
            if name in kinds:
                raise ConfigError(f"eval.{kind}_prompts: source {name!r} appears twice "
                                  f"({kinds[name]} and {kind}); give each spec its own source")
            kinds[name] = kind


def _hold_out_sources(cfg: RunConfig) -> None:
    """Lay each source of ``data.hold_out_sources`` (all of it: no split, no limit) into the
    ``exclude`` of every training spec. Idempotent, so a saved config reloads to itself."""
    specs = {source_name(s): s for kind in ("harmful", "harmless")
             for s in as_list(getattr(cfg.eval, f"{kind}_prompts"))}
    unknown = [n for n in cfg.data.hold_out_sources if n not in specs]
    if unknown:
        raise ConfigError(f"data.hold_out_sources: {unknown} are not evaluation sources "
                          f"(eval.harmful_prompts/harmless_prompts name {sorted(specs)})")
    whole = [dataclasses.replace(specs[n], split=None, limit=None, exclude=[], source=n)
             for n in cfg.data.hold_out_sources]
    d = cfg.data
    for spec in [s for group in (d.forget, d.pa, d.retain) for s in as_list(group)]:
        spec.exclude += [w for w in whole if w not in spec.exclude]


def _validate_floors(ec: EvalConfig) -> None:
    checks = [(f"eval.floors.{m}", m, b) for m, b in ec.floors.items()]
    if ec.target is not None:
        checks.append(("eval.target.metric", ec.target.metric, ec.target.value))
        checks += [(f"eval.target.require.{m}", m, b) for m, b in ec.target.require.items()]
    names = [source_name(s) for k in ("harmful", "harmless")
             for s in as_list(getattr(ec, f"{k}_prompts"))]
    for key, metric, bound in checks:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) \
                or not math.isfinite(bound):
            raise ConfigError(f"{key}: bound must be a number, got {bound!r}")
        metric, _, where = metric.partition("@")  # eval/<metric>@<source>: the metric's needs
        if where and where not in [*names, "held_out"]:
            raise ConfigError(f"{key}: {where!r} is not an evaluation source ({names})")
        need = _GENERATION_METRICS.get(metric)
        if metric in ("eval/retain_ppl", "eval/retain_ppl_ratio"):
            if ec.retain is None and ec.harmless_prompts is None:
                raise ConfigError(f"{key}: eval/retain_ppl needs eval.retain or "
                                  "eval.harmless_prompts")
        elif need == "judge":
            if ec.judge is None or ec.harmful_prompts is None:
                raise ConfigError(f"{key}: {metric} needs eval.judge and eval.harmful_prompts")
        elif need is not None and getattr(ec, need) is None:
            raise ConfigError(f"{key}: {metric} needs eval.{need}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- building from dicts / YAML
# (`key=value` overrides are parsed in config_files: raw-mapping work, like `base:`)

RENAMED = {("selector", "power_iters"): "lanczos_steps"}  # former keys still read: (section, old)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    raw = json.loads(json.dumps(raw, default=_not_data))  # deep copy; the caller's is kept
    try:
        raw = with_recipe(raw)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    apply_overrides(raw, overrides or [])
    for (section, old), new in RENAMED.items():
        part = raw.get(section)
        if isinstance(part, dict) and old in part:
            if new in part:
                raise ConfigError(f"{section}.{old} is the former name of {section}.{new}: "
                                  "give one of them")
            part[new] = part.pop(old)
    return build_dataclass(RunConfig, raw).validate()


def _not_data(value: Any) -> None:
    raise ConfigError(f"a config holds YAML data, not a {type(value).__name__}: ranks read "
                      "files, so save a dataset (ds.to_parquet(F)) and give F as its path")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (``config_files``: with its ``base``, if it names one), or start from
    defaults when path is None, and apply overrides."""
    raw = read_config_file(Path(path)) if path is not None else {}
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
