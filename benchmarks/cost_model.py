"""A cost model of u2a-dist: the time of each timed phase, peak memory per rank and
communication, with constants fitted per device on ``scaling.json``.

    python benchmarks/cost_model.py [--scaling benchmarks/results/scaling.json] [--out DIR]

Time on one rank (ranks run in lock-step, so this is the wall time)::

    t = s_flop · FLOPs/(W·threads)     6Φc per token fwd+bwd, 2Φc forward, + causal attention
      + s_act · activation values/(W·threads)   memory-bound work, 4V + L(17d + 2.5·h·T)/token
      + s_call · collectives (W > 1) + s_byte · wire bytes (s_byte3 on ZeRO-3's parameter path)
      + fwd visits · (s_fwd + s_fwd3·[ZeRO-3]) + bwd visits · (s_bwd + s_bwd3·[ZeRO-3])
      + s_vec · elements the optimiser updates and FD-HVPs save/perturb/restore
      + s_rand · elements of the Lanczos start vector (drawn on the host)

(a visit: one pass over one module with parameters). Peak memory per rank (host RSS on a CPU,
the CUDA allocator's peak on a GPU)::

    m0 + Φ·(r + p/W) + grads + θ0 + (phase vectors + temp_vectors)·4Φ_local
       + zero3_full_bytes·Φ·[ZeRO-3, W > 1] + act_factor · activation bytes

The named constants are fitted per device (``cpu``, ``gpu``): non-negative least squares on
relative errors, pulled weakly toward priors where data leave them undetermined (a GPU's
collectives at W = 1). Communication (ZeRO, Rajbhandari et al. 2020) and engine bytes are
formulas, checked against what scaling.json counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

TOLERANCE = 0.25  # a prediction within ±25% of the measurement is a hit
PRIOR_WEIGHT = 1e-3  # pull of each constant toward its prior (relative, squared)
ZERO3_STAGES = ("3", "3off")
# Engine bytes per parameter (replicated r, partitioned p), fp32 AdamW: DeepSpeed 0.19.8 keeps
# a separate fp32 master copy at stage 3 even of fp32 parameters (16, not 12).
ENGINE_BYTES = {"0": (12, 0), "1": (4, 12), "2": (4, 12), "3": (0, 16), "3off": (0, 16)}
# fp32 vectors of Φ_local alive per phase: an HVP's v, FD save of θ, g+ and g−; a selector
# round adds ∇J and the Neumann sum and output. Setup never peaks (no optimizer states yet).
PHASE_VECTORS = {"train": 0, "hvp": 4, "selector": 7}


def zero_model_state_bytes(phi: float, n: int, stage: int | str, k: float = 12.0) -> float:
    """Model-state bytes per device with mixed-precision Adam (ZeRO §3.1, Figure 1): 2Φ 16-bit
    parameters, 2Φ gradients, KΦ fp32 optimizer state, partitioned over N from stage 1 (states),
    2 (+ gradients), 3 (+ parameters); ``3off`` keeps nothing persistent on the device."""
    parts = {"0": 4 + k, "1": 4 + k / n, "2": 2 + (2 + k) / n, "3": (4 + k) / n, "3off": 0.0}
    if str(stage) not in parts:
        raise ValueError(f"unknown ZeRO stage {stage!r}")
    return parts[str(stage)] * phi


def zero_comm_elements(phi: float, n: int, stage: int | str) -> float:
    """Elements each device sends per training step, ring collectives (ZeRO §7): 2Φ(N−1)/N at
    stages 0-2 (all-reduce), 3Φ(N−1)/N at stage 3 (2 all-gathers and a reduce-scatter)."""
    return (3.0 if str(stage) in ZERO3_STAGES else 2.0) * phi * (n - 1) / n


# The numbers of a model that cost depends on (compute_params: those in matmuls, not embeddings)
Arch = namedtuple("Arch", "params compute_params param_tensors param_modules layers hidden "
                  "heads vocab")


@dataclass
class Setup:
    stage: str
    world: int
    arch: Arch
    seq_len: float = 64.0
    threads: int = 1
    device: str = "cpu"

    @property
    def zero3(self) -> bool:
        return self.stage in ZERO3_STAGES

    def local_params(self) -> float:  # elements of a ShardedVector on this rank
        return self.arch.params / self.world if self.zero3 else self.arch.params


@dataclass
class Work:
    """What an operation does per rank, counted (tokens: global, padded; ``hvps``: an FD-HVP's
    vector work, its gradient passes are in ``grad_micro``)."""

    step_micro: float = 0.0
    grad_micro: float = 0.0
    train_tokens: float = 0.0
    fwd_batches: float = 0.0
    fwd_tokens: float = 0.0
    steps: float = 0.0
    hvps: float = 0.0
    small_calls: float = 0.0
    random_vectors: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*map(sum, zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __rmul__(self, k: float) -> Work:
        return Work(*(k * a for a in dataclasses.astuple(self)))


def train_step_work(tokens: float, micro: int = 1) -> Work:
    # 4 small collectives outside the engine: loss, gradient norm, prox metrics
    return Work(step_micro=micro, train_tokens=tokens, steps=1, small_calls=4)


def grad_work(tokens: float, micro: float) -> Work:
    return Work(grad_micro=micro, train_tokens=tokens)


def hvp_work(tokens: float, micro: float, small_calls: float = 2.0) -> Work:
    """Two gradient passes; all-reduces of θ's RMS (for ε), ‖v‖ (+ a dot product in Lanczos)."""
    return Work(grad_micro=2 * micro, train_tokens=2 * tokens, hvps=1, small_calls=small_calls)


def forward_work(tokens: float, batches: float) -> Work:
    """No-grad per-example losses, gathered with one collective at the end."""
    return Work(fwd_batches=batches, fwd_tokens=tokens, small_calls=1)


def comm_for(work: Work, setup: Setup) -> tuple[float, float]:
    """(wire bytes this rank sends, collectives) under DeepSpeed 0.19 + u2a's engine. A fwd+bwd
    micro-batch sends ZeRO's 2Φ or 3Φ elements: at stages 0-2 an all-reduce per bucket; ZeRO-3
    gathers per module forward (once under offload) and backward, and reduce-scatters per
    bucket. With u = 4Φ(W−1)/W, stages 1-2 read gradients tensor by tensor (2u a read) and per
    step gather the parameters and rebuild the gradient for the prox term (3u); a no-grad
    forward under ZeRO-3 gathers the parameters (u), its optimiser step checks overflow."""
    a, s = setup.arch, setup.stage
    u = 4.0 * a.params * (setup.world - 1) / setup.world
    buckets = max(1, math.ceil(a.params / 5e8))  # DeepSpeed's default reduce_bucket_size
    micro = work.step_micro + work.grad_micro
    wire = 4.0 * zero_comm_elements(a.params, setup.world, s) * micro
    if setup.zero3:
        gathers = 1 if s == "3off" else a.param_modules  # per forward; backward: per module
        calls = micro * (gathers + a.param_modules + buckets) + work.fwd_batches * gathers
        return wire + u * work.fwd_batches, calls + work.small_calls + work.steps
    calls = work.small_calls + buckets * micro
    if s in ("1", "2"):
        wire += 2 * u * work.grad_micro + 3 * u * work.steps
        calls += a.param_tensors * work.grad_micro + (1 + a.param_tensors) * work.steps
    return wire, calls


TIME_TERMS = ("s_flop", "s_act", "s_call", "s_byte", "s_byte3", "s_fwd", "s_bwd", "s_fwd3",
              "s_bwd3", "s_vec", "s_rand")
MEMORY_TERMS = ("m0", "act_factor", "temp_vectors", "zero3_full_bytes")
#: CPU: one x86 core, gloo on loopback. GPU (H100/H200-class, NCCL): per-module overheads of
#: tens of µs dominate small models; m0 counts CUDA-allocated bytes only.
_MEMORY_PRIOR = dict(act_factor=1.0, temp_vectors=1.0, zero3_full_bytes=8.0)
PRIORS = {
    "cpu": dict(s_flop=5e-11, s_act=1e-10, s_call=2e-4, s_byte=1e-9, s_byte3=1e-9, s_fwd=5e-5,
                s_bwd=5e-5, s_fwd3=1e-4, s_bwd3=1e-4, s_vec=5e-9, s_rand=5e-9, m0=4.5e8,
                **_MEMORY_PRIOR),
    "gpu": dict(s_flop=2e-14, s_act=1e-12, s_call=3e-5, s_byte=1e-11, s_byte3=1e-11,
                s_fwd=3e-5, s_bwd=5e-5, s_fwd3=2e-4, s_bwd3=1e-4, s_vec=1e-11, s_rand=5e-9,
                m0=1e8, **_MEMORY_PRIOR)}


def activation_values_per_token(arch: Arch, seq_len: float) -> float:
    """Korthikanti et al. 2022 without recomputation: per layer 17 values per hidden unit and
    2.5·heads·T of attention; then fp32 logits, their log-softmax and its gradient (4V)."""
    return 4.0 * arch.vocab + arch.layers * (17.0 * arch.hidden + 2.5 * arch.heads * seq_len)


def time_features(work: Work, setup: Setup) -> list[float]:
    """The regressors of :data:`TIME_TERMS`: t = Σ features · constants."""
    a, z3, per_rank = setup.arch, float(setup.zero3), setup.world * setup.threads
    tokens = 3.0 * work.train_tokens + work.fwd_tokens  # a backward pass costs two forwards
    flops = tokens * (2.0 * a.compute_params + 2.0 * setup.seq_len * a.hidden * a.layers)
    wire, calls = comm_for(work, setup)
    micro = work.step_micro + work.grad_micro
    fwd, bwd = a.param_modules * (micro + work.fwd_batches), a.param_modules * micro
    optimizer = a.params if setup.stage == "0" else a.params / setup.world
    return [flops / per_rank, tokens * activation_values_per_token(a, setup.seq_len) / per_rank,
            calls if setup.world > 1 else 0.0, (1 - z3) * wire, z3 * wire, fwd, bwd, z3 * fwd,
            z3 * bwd, work.steps * optimizer + work.hvps * setup.local_params(),
            work.random_vectors * setup.local_params()]


def memory_features(setup: Setup, phase: str, micro_tokens: float) -> tuple[float, list]:
    """(bytes the formulas fix, regressors of :data:`MEMORY_TERMS`) at the peak of ``phase``;
    ``micro_tokens``: the phase's largest micro-batch on this rank."""
    phi, w, lv = setup.arch.params, setup.world, setup.local_params()
    r, p = ENGINE_BYTES[setup.stage]
    grads = 4.0 * phi if setup.stage in ("0", "1") else 4.0 * phi / w
    known = phi * (r + p / w) + grads + 4.0 * lv * (1 + PHASE_VECTORS[phase])  # 1: θ0
    act = 4.0 * micro_tokens * activation_values_per_token(setup.arch, setup.seq_len)
    return known, [1.0, act, 4.0 * lv, phi if setup.zero3 and w > 1 else 0.0]


@dataclass
class Observation:
    """A time (of ``work``) or a rank's peak memory (in ``phase``), measured and modelled."""

    setup: Setup
    measured: float = 0.0
    work: Work | None = None
    phase: str = ""
    micro_tokens: float = 0.0
    config: str = ""
    quantity: str = ""

    def features(self) -> tuple[float, list[float], tuple[str, ...]]:
        if self.work is not None:
            return 0.0, time_features(self.work, self.setup), TIME_TERMS
        return (*memory_features(self.setup, self.phase, self.micro_tokens), MEMORY_TERMS)

    def predict(self, c: dict[str, float]) -> float:
        known, x, terms = self.features()
        return known + sum(v * c[k] for v, k in zip(x, terms))


def _setup(c: dict[str, Any]) -> tuple[str, Setup]:  # a configuration's label and setup
    gpu = c["device"].startswith("gpu")
    return f"{c['model']} z{c['stage']} W{c['world']} {c['device']}", Setup(
        str(c["stage"]), int(c["world"]), Arch(**c["arch"]),
        seq_len=c["step"]["padded_tokens"] / c["settings"]["batch_size"],
        threads=1 if gpu else int(c["torch_threads"]), device="gpu" if gpu else "cpu")


def config_times(c: dict[str, Any]) -> dict[str, tuple[Work, float]]:
    """(work, median seconds) of every timed operation of one configuration; the work comes
    from its settings and counted tokens, never from its timings."""
    g, sel = c["grad"], c.get("selector")
    out = {"step_s": (train_step_work(c["step"]["padded_tokens"]), c["step"]["median_s"]),
           "grad_s": (grad_work(g["padded_tokens"], g["micro_batches"]), g["median_s"]),
           "hvp_s": (hvp_work(g["padded_tokens"], g["micro_batches"]), c["hvp"]["median_s"]),
           "forward_s": (forward_work(c["forward"]["padded_tokens"],
                                      c["forward"]["micro_batches"]), c["forward"]["seconds"])}
    if not sel:
        return out
    og, rnd = sel["outer_grad"], sel["round"]
    outer = grad_work(og["padded_tokens"], og["micro_batches"])
    # the GPU copy timed J's reference log-probs (chosen, rejected) inside the first ∇J
    ref = forward_work(og["padded_tokens"], 2 * math.ceil(
        og["pairs"] / c["world"] / c["settings"]["eval_batch_size"]))
    out["outer_grad_s"] = (outer + og["reference_pass_timed"] * ref, og["seconds"])
    hvp, start = hvp_work(g["padded_tokens"], g["micro_batches"], 3), Work(random_vectors=1)
    out["lanczos_s"] = (sel["lanczos"]["hvps"] * hvp + start, sel["lanczos"]["seconds"])
    out |= {f"neumann_k{r['k']}_s": (r["hvps"] * hvp, r["seconds"])
            for r in sel["neumann_vs_k"] if r["hvps"]}

    # directional scores: the counted tokens and batches cover every pass (f_i(θ ± εv), and
    # one at θ before 2026-11-28), each gathered once; + the vector work of perturbing θ
    def scores(tokens: float, batches: float, passes: int) -> Work:
        return forward_work(tokens, batches) + Work(hvps=1, small_calls=passes - 1)

    out |= {f"scores_n{r['n']}_s": (scores(r["padded_tokens"], r["micro_batches"],
                                           r["forward_passes"]), r["seconds"])
            for r in sel["scores_vs_n"]}
    out["round_s"] = (outer + rnd["hvps"] * hvp + start + scores(
        rnd["score_padded_tokens"], rnd["score_micro_batches"], rnd["score_forward_passes"]),
        rnd["seconds"])
    return out


def observations_from_scaling(record: dict[str, Any]) -> list[Observation]:
    """Every timing of the successful configurations, and each rank's memory at the phase where
    it peaked (an earlier phase's high-water mark says only that it was not higher)."""
    obs: list[Observation] = []
    for c in (c for c in record["configs"] if c.get("ok")):
        label, s = _setup(c)
        obs += [Observation(s, t, w, config=label, quantity=q)
                for q, (w, t) in config_times(c).items() if t > 0]
        micro = {"train": c["step"]["padded_tokens"],  # the largest micro-batch, all ranks
                 "hvp": c["grad"]["padded_tokens"] / c["grad"]["micro_batches"]}
        if c.get("selector"):
            og = c["selector"]["outer_grad"]
            micro["selector"] = og["padded_tokens"] / og["micro_batches"]
        # a GPU's is the allocator's peak (its host RSS is the CUDA context and libraries)
        key, kind = ("cuda_peak", "gpu") if s.device == "gpu" else ("hwm", "rss")
        for m in c["memory"]["per_rank"]:
            peak, phase = max((m[f"{p}_{key}_bytes"], p) for p in micro)
            obs.append(Observation(s, peak, None, phase, micro[phase] / s.world, label,
                                   f"peak_{kind}_rank{m['rank']}"))
    return obs


def calibrate(obs: list[Observation], prior: dict[str, float]) -> dict[str, float]:
    """One device's constants, for time and for memory: min Σ_i ((known_i + x_i·c − m_i)/m_i)²
    + w·Σ_j ((c_j − p_j)/p_j)² over c ≥ 0, solved in c_j/p_j (one scale for all)."""
    import numpy as np
    from scipy.optimize import lsq_linear

    c, w = dict(prior), math.sqrt(PRIOR_WEIGHT)
    every = [(o.measured, *o.features()) for o in obs]
    for terms in (TIME_TERMS, MEMORY_TERMS):
        if not (feats := [f for f in every if f[3] == terms]):
            continue
        p, m = np.asarray([prior[k] for k in terms]), np.asarray([f[0] for f in feats])
        a = np.vstack([np.asarray([f[2] for f in feats]) * p / m[:, None], w * np.eye(len(p))])
        b = np.concatenate([(m - np.asarray([f[1] for f in feats])) / m, w * np.ones(len(p))])
        fit = lsq_linear(a, b, bounds=(0.0, np.inf), lsmr_tol="auto", max_iter=10000).x * p
        c.update(zip(terms, map(float, fit)))
    return c


def calibrate_devices(obs: list[Observation]) -> dict[str, dict[str, float]]:
    """One set of constants per device (a GPU's have nothing to do with a CPU's)."""
    return {d: calibrate([o for o in obs if o.setup.device == d], PRIORS[d])
            for d in sorted({o.setup.device for o in obs})}


def _row(config: str, quantity: str, measured: float, predicted: float) -> dict[str, Any]:
    err = (predicted - measured) / measured
    return {"config": config, "quantity": quantity, "measured": measured,
            "predicted": predicted, "rel_error": err, "ok": abs(err) <= TOLERANCE}


def evaluate(obs: list[Observation], consts: dict[str, dict[str, float]]) -> list[dict]:
    """Relative error (predicted − measured)/measured of every observation."""
    return [_row(o.config, o.quantity, o.measured, o.predict(consts[o.setup.device]))
            for o in obs]


def leave_one_config_out(obs: list[Observation]) -> list[dict[str, Any]]:
    """Each configuration predicted by constants fitted on the others of its device."""
    rows = []
    for cfg in sorted({o.config for o in obs}):
        held = [o for o in obs if o.config == cfg]
        rows += evaluate(held, {**PRIORS, **calibrate_devices([o for o in obs if o.config != cfg])})
    return rows


def formula_checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The formulas (unfitted) against scaling.py's counts: wire bytes and collectives of a
    step, gradient pass and HVP (rank 0, W > 1), and every rank's engine bytes."""
    rows = []
    for c in (c for c in record["configs"] if c.get("ok")):
        (label, setup), times = _setup(c), config_times(c)
        for key in ("step", "grad", "hvp") if setup.world > 1 else ():
            wire, calls = comm_for(times[f"{key}_s"][0], setup)
            rows += [_row(label, f"wire_bytes_per_{key}", c[key]["comm"]["wire_bytes"], wire),
                     _row(label, f"collectives_per_{key}", c[key]["comm"]["calls"], calls)]
        r, p = ENGINE_BYTES[setup.stage]
        rows += [_row(label, f"engine_bytes_rank{m['rank']}", m["engine"]["total_bytes"],
                      setup.arch.params * (r + p / setup.world)) for m in c["memory"]["per_rank"]]
    return rows


def markdown(result: dict[str, Any]) -> str:
    """cost_model.md: hits per device and every miss (constants and predictions: the JSON)."""
    def hits(rows: list[dict[str, Any]]) -> str:
        errs = sorted(abs(r["rel_error"]) for r in rows)
        return (f"{sum(r['ok'] for r in rows)} of {len(rows)} within ±{TOLERANCE:.0%}, median "
                f"|error| {errs[len(errs) // 2]:.0%}, worst {errs[-1]:.0%}")

    kinds = {"errors": "in-sample", "leave_one_out": "held out"}
    lines = [f"# Cost model ({result['date_utc']})", "", f"On `{result['scaling']}`; formulas: "
             "the docstring of `benchmarks/cost_model.py`.", ""]
    lines += [f"- {d}, {name}: {hits([r for r in result[k] if r['config'].endswith(d)])}"
              for d in result["constants"] for k, name in kinds.items()]
    lines += [f"- formulas against the counted values: {hits(result['formula_checks'])}", ""]
    lines += [f"- miss ({name}): {r['config']} `{r['quantity']}` measured {r['measured']:.4g}, "
              f"predicted {r['predicted']:.4g} ({r['rel_error']:+.0%})"
              for k, name in kinds.items() for r in result[k] if not r["ok"]]
    return "\n".join(lines) + "\n"


def run(scaling_path: Path, out_dir: Path) -> dict[str, Any]:
    """Calibrate on scaling.json, evaluate, check the formulas; write cost_model.{json,md}."""
    sys.path.insert(0, str(REPO))
    from benchmarks.common import stamp

    record = json.loads(scaling_path.read_text())
    obs = observations_from_scaling(record)
    if not obs:
        raise SystemExit(f"{scaling_path}: no successful configuration to calibrate on")
    consts = calibrate_devices(obs)
    result = {"benchmark": "cost_model", **stamp(), "scaling": str(scaling_path),
              "scaling_date": record.get("date_utc"), "n_configs": len({o.config for o in obs}),
              "tolerance": TOLERANCE, "prior_weight": PRIOR_WEIGHT, "constants": consts,
              "errors": evaluate(obs, consts), "leave_one_out": leave_one_config_out(obs),
              "formula_checks": formula_checks(record)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cost_model.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "cost_model.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scaling", default=str(RESULTS / "scaling.json"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    print(markdown(run(Path(args.scaling), Path(args.out))))


if __name__ == "__main__":
    main()
