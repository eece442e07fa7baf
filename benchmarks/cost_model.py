"""A cost model of u2a-dist: memory per rank, communication per step and per HVP, step time and
time per U2A round, with constants calibrated by least squares on ``scaling.json``.

    python benchmarks/cost_model.py [--scaling benchmarks/results/scaling.json] [--out DIR]
        [--tolerance 0.25]

Time of an operation on one rank (ranks run in lock-step, so this is the wall time)::

    t = FLOPs_rank / (F · threads)          compute: 6·Φc·tokens per fwd+bwd, 2·Φc·tokens fwd
      + μ · activation values               memory-bound work, 4V + L(17d + 2.5·h·T) per token
      + α · collectives + α3 · ZeRO-3 ones  latency per collective (W > 1)
      + bytes/B + bytes_t/B_t + bytes3/B3   plain, per-tensor (stages 1-2) and ZeRO-3 bytes
      + fwd visits · (o_f + o_z3f·[ZeRO-3]) per module with parameters per pass (hooks, fetch)
      + bwd visits · (o_b + o_z3b·[ZeRO-3])
      + steps · (o_step + γ · Φ_opt)        optimiser step: fixed + per updated element
      + hvps · ε · Φ_vec                    FD vector work: save/perturb/restore/difference
      + random vectors · ρ · Φ_vec          the Lanczos start, drawn on the host

Φc = parameters in matmuls (+ 2·T·d·L causal attention FLOPs per token forward); Φ_opt, Φ_vec
the elements this rank updates / holds in a ShardedVector (Φ/W under ZeRO-3). A U2A round is
∇J over P pairs + (L Lanczos + K Neumann + 1 residual) HVPs (2 gradient passes each) + the
directional scores (2 forward passes over N; 3 in runs before 2026-11-28) + the Lanczos start.

Memory per rank (host RSS on a CPU, the CUDA allocator's peak on a GPU)::

    M0 + engine Φ·(r + p/W) + grads (4Φ at stages 0-1, else 4Φ/W) + θ0 4Φ_local
       + (selector vectors + τ) · 4Φ_local + ω3·Φ (ZeRO-3, W > 1) + λ · activations

with 4 selector vectors in an HVP (v, the FD save, g+, g−) and 7 in a round (+ ∇J and the 3
Neumann vectors); engine bytes per parameter (r, p) per stage fitted on the engines' own state
sizes (fp32 AdamW: 12, 0 at stage 0; 4, 12 at stage 2; 0, 16 at stage 3, where DeepSpeed 0.19.8
keeps a separate fp32 master copy); setup holds the whole model, ZeRO's fp32 partitions and,
at stages 0-2, θ0. Communication (ZeRO, Rajbhandari et al. 2020, with u = Φ·b·(W−1)/W): 2u
per fwd+bwd at stages 0-2, 3u at stage 3, u per no-grad forward at stage 3, and u2a's stage-1/2
engine 2u more per gradient read and 3u per step; not fitted, checked against the counted
collectives. Each device (``cpu``, ``gpu``) has its own constants, fitted by non-negative
least squares on relative errors (memory on each rank's peak phase) with a weak pull toward
priors that keeps undetermined constants (a GPU's latency at W = 1) plausible.

Writes ``cost_model.json`` (constants, every prediction and its error in-sample and held out,
the communication checks, the 7B/70B projection) and ``cost_model.md`` (benchmarks/reports.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# DeepSpeed's default reduce_bucket_size (elements) when the JSON does not set it
# (ds_configs/zero3_cpu.json does not): gradient reductions are issued in buckets of this size.
DS_REDUCE_BUCKET = 5e8
# Small collectives per optimiser step outside the engine (loss, grad norm, prox metrics).
STEP_SMALL_CALLS = 4
ZERO3_STAGES = ("3", "3off")


# =============================================================================================
# ZeRO paper formulas (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
# Parameter Models", SC 2020, arXiv:1910.02054)
# =============================================================================================


def zero_model_state_bytes(phi: float, n: int, stage: int | str, k: float = 12.0,
                           param_bytes: float = 2.0, grad_bytes: float = 2.0) -> float:
    """Model-state bytes per device (ZeRO §3.1 and Figure 1; mixed-precision Adam).

    16-bit parameters (``param_bytes``·Φ) and gradients (``grad_bytes``·Φ), plus K·Φ of fp32
    optimizer state (master parameters, momentum, variance: K = 12 for Adam):

    - stage 0 (data parallel): (2 + 2 + K)·Φ = 16Φ
    - stage 1 (P_os):          2Φ + 2Φ + K·Φ/N
    - stage 2 (P_os+g):        2Φ + (2 + K)·Φ/N
    - stage 3 (P_os+g+p):      (2 + 2 + K)·Φ/N = 16Φ/N

    e.g. 7.5B parameters on 64 GPUs: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB (the paper's Figure 1).
    ``3off`` (ZeRO-3 with parameters and optimizer states offloaded to CPU memory): nothing
    persistent on the device (the working set of gathered layers is counted elsewhere).
    """
    s = str(stage)
    if s == "0":
        return (param_bytes + grad_bytes + k) * phi
    if s == "1":
        return (param_bytes + grad_bytes) * phi + k * phi / n
    if s == "2":
        return param_bytes * phi + (grad_bytes + k) * phi / n
    if s == "3":
        return (param_bytes + grad_bytes + k) * phi / n
    if s == "3off":
        return 0.0
    raise ValueError(f"unknown ZeRO stage {stage!r}")


def zero_comm_elements(phi: float, n: int, stage: int | str) -> float:
    """Elements each device sends per training step under ring collectives (ZeRO §7.1-7.2).

    Data parallel, stage 1 and stage 2: gradient all-reduce = reduce-scatter + all-gather,
    2Φ(N−1)/N. Stage 3: all-gather the parameters in the forward and again in the backward
    pass, reduce-scatter the gradients: 3Φ(N−1)/N (1.5× data parallel).
    """
    s = str(stage)
    if s in ("0", "1", "2"):
        return 2.0 * phi * (n - 1) / n
    if s in ZERO3_STAGES:
        return 3.0 * phi * (n - 1) / n
    raise ValueError(f"unknown ZeRO stage {stage!r}")


# ---- what is being run -----------------------------------------------------------------------


@dataclass
class Arch:
    """The numbers of a model that cost depends on."""

    params: float
    compute_params: float
    param_tensors: int
    param_modules: int
    layers: int
    hidden: int
    heads: int
    vocab: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def fwd_flops_per_token(self, seq_len: float) -> float:
        """2·Φc per token for the matmuls, plus causal attention (QKᵀ and AV: 2·T·d per layer)."""
        return 2.0 * self.compute_params + 2.0 * seq_len * self.hidden * self.layers


@dataclass
class Setup:
    """Where an operation runs: ZeRO stage key, ranks, threads per rank, communicated bytes
    per element (4: fp32; 2: bf16/fp16), and the device (``cpu`` or ``gpu``: each has its own
    constants; on a GPU ``threads`` is 1 and F is the GPU's FLOP/s)."""

    stage: str
    world: int
    arch: Arch
    threads: int = 1
    elem_bytes: float = 4.0
    device: str = "cpu"

    @property
    def zero3(self) -> bool:
        return self.stage in ZERO3_STAGES

    def local_params(self) -> float:
        """Elements of a ShardedVector / the optimizer's share on this rank."""
        return self.arch.params / self.world if self.zero3 else self.arch.params

    def optimizer_params(self) -> float:
        return self.arch.params if self.stage == "0" else self.arch.params / self.world


@dataclass
class Work:
    """What an operation does per rank, in countable units (all are inputs, none measured).

    ``step_micro``: fwd+bwd micro-batches inside optimiser steps; ``grad_micro``: fwd+bwd
    micro-batches whose local gradient is read (selector passes); ``fwd_batches``: no-grad
    forward batches; ``*_tokens``: global padded tokens of each; ``steps``: optimiser steps;
    ``hvps``: finite-difference HVPs (their gradient passes are in ``grad_micro``);
    ``small_calls``: small collectives (metrics, dot products, norms); ``seq_len``: tokens per
    sequence (attention FLOPs); ``random_vectors``: random vectors of Φ_local elements drawn
    (the Lanczos start: drawn on the host and moved, so a GPU pays host time per element).
    """

    step_micro: float = 0.0
    grad_micro: float = 0.0
    train_tokens: float = 0.0
    fwd_batches: float = 0.0
    fwd_tokens: float = 0.0
    steps: float = 0.0
    hvps: float = 0.0
    small_calls: float = 0.0
    seq_len: float = 0.0
    random_vectors: float = 0.0

    def __add__(self, other: Work) -> Work:
        out = Work(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                      for f in dataclasses.fields(self)})
        out.seq_len = max(self.seq_len, other.seq_len)
        return out

    def __mul__(self, k: float) -> Work:
        out = Work(**{f.name: getattr(self, f.name) * k for f in dataclasses.fields(self)})
        out.seq_len = self.seq_len
        return out

    __rmul__ = __mul__


def train_step_work(tokens: float, seq_len: float, micro: int = 1) -> Work:
    """One optimiser step: ``micro`` fwd+bwd micro-batches per rank over ``tokens`` (global)."""
    return Work(step_micro=micro, train_tokens=tokens, steps=1, small_calls=STEP_SMALL_CALLS,
                seq_len=seq_len)


def grad_work(tokens: float, micro: int, seq_len: float) -> Work:
    """One gradient pass (∇ of the inner objective or of J): fwd+bwd, local gradients read."""
    return Work(grad_micro=micro, train_tokens=tokens, seq_len=seq_len)


def hvp_work(tokens: float, micro: int, seq_len: float, small_calls: float = 2.0) -> Work:
    """One FD-HVP = 2 gradient passes + vector work; two all-reduces (θ RMS for ε, ‖v‖)."""
    return Work(grad_micro=2 * micro, train_tokens=2 * tokens, hvps=1, small_calls=small_calls,
                seq_len=seq_len)


def forward_work(tokens: float, batches: int, seq_len: float) -> Work:
    """One no-grad pass of the per-example losses (an all-gather of the results at the end)."""
    return Work(fwd_batches=batches, fwd_tokens=tokens, small_calls=1, seq_len=seq_len)


#: Forward passes over N of the directional scores: f_i(θ+εv) and f_i(θ−εv) (ℓ_i at θ is
#: their midpoint). Measurements before 2026-11-28 made a third pass at θ: scaling.json
#: records each sweep's count (``forward_passes``; 3 where absent).
SCORE_PASSES = 2


def scores_work(score_fwd: Work, passes: float = SCORE_PASSES) -> Work:
    """Directional scores of N negatives: ``passes`` forward passes over them and the vector
    work of an FD-HVP (save θ, perturb by ±εv, restore)."""
    return passes * score_fwd + Work(hvps=1)


def round_work(outer: Work, hvp: Work, hvps: float, score_fwd: Work,
               passes: float = SCORE_PASSES) -> Work:
    """One U2A round: ∇J + hvps HVPs (Lanczos + Neumann + residual) + the directional scores,
    + the Lanczos start vector."""
    return outer + hvps * hvp + scores_work(score_fwd, passes) + Work(random_vectors=1)


# ---- communication (formulas; checked against the counted collectives of scaling.json) -------


def comm_for(work: Work, setup: Setup) -> tuple[float, float]:
    """(wire bytes this rank sends, collectives) of ``work`` under ``setup``.

    Unit u = Φ·b·(W−1)/W: one ring all-gather or reduce-scatter of the whole model (b bytes
    per element); a ring all-reduce costs 2u. Per stage (DeepSpeed 0.19 + u2a's engine):

    - fwd+bwd micro-batch: stages 0-2: gradient all-reduce 2u, in buckets of 5e8 elements;
      ZeRO-3: all-gather in the forward (u) and in the backward (u), reduce-scatter (u) = 3u
      (the paper's 3Φ), one all-gather per module with parameters per pass (ZeRO-3 with
      offload: one coalesced all-gather for a no-grad forward).
    - reading the local gradients (``Engine.local_grads``): stages 1-2 all-reduce the full
      gradient per parameter tensor (``safe_get_full_grad``): 2u more.
    - optimiser step: stages 1-2 all-gather the updated parameters (u) and rebuild the full
      gradient for the prox term (2u); stages 0 and 3: nothing more.
    - no-grad forward batch: ZeRO-3 all-gathers the parameters (u); other stages nothing.
    """
    a, w, s = setup.arch, setup.world, setup.stage
    u = a.params * setup.elem_bytes * (w - 1) / w
    buckets = max(1, math.ceil(a.params / DS_REDUCE_BUCKET))
    micro = work.step_micro + work.grad_micro
    wire = calls = 0.0
    if s in ZERO3_STAGES:
        wire += 3 * u * micro + u * work.fwd_batches
        calls += zero3_param_calls(work, setup)
    else:
        wire += 2 * u * micro
        calls += buckets * micro
        if s in ("1", "2"):
            wire += 2 * u * work.grad_micro + 3 * u * work.steps
            calls += a.param_tensors * work.grad_micro + (1 + a.param_tensors) * work.steps
    # DeepSpeed's ZeRO-3 optimiser step adds one small all-reduce (its overflow check)
    calls += work.small_calls + (work.steps if s in ZERO3_STAGES else 0.0)
    return wire, calls


def tensorwise_wire(work: Work, setup: Setup) -> float:
    """The part of :func:`comm_for`'s bytes sent one parameter tensor at a time: stages 1-2
    read full gradients with an all-reduce per tensor (2u per gradient read, 2u per step for
    the prox term)."""
    if setup.stage not in ("1", "2"):
        return 0.0
    u = setup.arch.params * setup.elem_bytes * (setup.world - 1) / setup.world
    return 2 * u * (work.grad_micro + work.steps)


def zero3_param_wire(work: Work, setup: Setup) -> float:
    """The part of :func:`comm_for`'s bytes on ZeRO-3's parameter path: 3u per fwd+bwd
    micro-batch, u per no-grad forward batch; 0 at other stages."""
    if setup.stage not in ZERO3_STAGES:
        return 0.0
    u = setup.arch.params * setup.elem_bytes * (setup.world - 1) / setup.world
    return 3 * u * (work.step_micro + work.grad_micro) + u * work.fwd_batches


def zero3_param_calls(work: Work, setup: Setup) -> float:
    """The collectives of ZeRO-3's parameter path (one all-gather per module with parameters
    per forward and per backward - one coalesced gather for a no-grad forward under offload -
    and the gradient reduce-scatter buckets). They go through DeepSpeed's partitioned-parameter
    coordinator (buffer allocation, fetch and release hooks), so they get their own latency;
    0 at other stages."""
    a, s = setup.arch, setup.stage
    if s not in ZERO3_STAGES:
        return 0.0
    buckets = max(1, math.ceil(a.params / DS_REDUCE_BUCKET))
    fwd_calls = 1 if s == "3off" else a.param_modules
    micro = work.step_micro + work.grad_micro
    return (micro * (fwd_calls + a.param_modules + buckets)
            + work.fwd_batches * (1 if s == "3off" else a.param_modules))


# ---- constants, time and memory --------------------------------------------------------------

#: The time constants in the order of :func:`time_features`; the rates (F, B, B_t, B3) enter
#: the linear fit as their inverses (seconds per FLOP or per byte).
TIME_TERMS = ("flops_per_core", "latency_s", "bandwidth_Bps", "module_overhead_s",
              "zero3_module_overhead_s", "optimizer_s_per_param", "hvp_vector_s_per_param",
              "step_overhead_s", "zero3_latency_s", "random_s_per_param",
              "backward_module_overhead_s", "sec_per_activation",
              "zero3_backward_module_overhead_s", "tensorwise_bandwidth_Bps",
              "zero3_bandwidth_Bps")
RATES = ("flops_per_core", "bandwidth_Bps", "tensorwise_bandwidth_Bps", "zero3_bandwidth_Bps")


@dataclass
class Constants:
    """The few constants of the model (CPU priors: one x86 core, gloo on loopback)."""

    flops_per_core: float = 2.0e10       # F: sustained FLOP/s of one thread-core or one GPU
    latency_s: float = 2.0e-4            # α: per plain torch.distributed collective
    zero3_latency_s: float = 4.0e-4      # α3: per ZeRO-3 parameter-path collective
    bandwidth_Bps: float = 1.0e9         # B: wire bytes per second per rank
    # B_t: the same for stage 1-2's gradient reads, one all-reduce per parameter tensor (small
    # messages: gloo's loopback moves them faster per byte than one large bucket)
    tensorwise_bandwidth_Bps: float = 1.0e9
    # B3: the same for ZeRO-3's parameter path (all-gathers into and reduce-scatters out of
    # DeepSpeed's flat buffers, with a copy per parameter), as α3 is its latency
    zero3_bandwidth_Bps: float = 1.0e9
    module_overhead_s: float = 5.0e-5    # per module with parameters per forward pass
    backward_module_overhead_s: float = 5.0e-5  # ... per backward pass
    # μ: memory-bound work per activation value (norms, activations, softmax, log-softmax over
    # the vocabulary): what FLOPs miss on narrow models, whose matmuls are small
    sec_per_activation: float = 1.0e-10
    zero3_module_overhead_s: float = 1.0e-4  # extra under ZeRO-3 (fetch/release hooks) forward
    zero3_backward_module_overhead_s: float = 1.0e-4  # ... backward (+ gradient hooks)
    optimizer_s_per_param: float = 5.0e-9    # Adam + prox per updated element
    hvp_vector_s_per_param: float = 5.0e-9   # FD-HVP save/perturb/restore per local element
    step_overhead_s: float = 2.0e-3      # per optimiser step, fixed
    random_s_per_param: float = 5.0e-9   # ρ: drawing one random element on the host (+ copy)
    base_memory_bytes: float = 4.5e8     # M0: process baseline (Python, torch, DeepSpeed)
    activation_factor: float = 1.0       # λ: multiplies the activation estimate
    # τ: fp32 vectors of Φ_local alive at the peak of a train/HVP/selector phase beyond the
    # ones the formula names: library temporaries (PyTorch's foreach AdamW on CUDA makes
    # whole-list intermediates; DeepSpeed's gradient copies). Fitted, ≥ 0.
    temp_vectors: float = 1.0
    # ω3: bytes per parameter of the whole model that ZeRO-3 holds unpartitioned when W > 1
    # (gathered parameters up to stage3_max_live_parameters, the full gradient bucket before
    # its reduce-scatter: 4Φ + 4Φ at most in fp32). Fitted, ≥ 0.
    zero3_full_bytes_per_param: float = 8.0
    # stage -> (replicated, partitioned) engine bytes per parameter: params + optimizer states
    # + master copies = Φ·(r + p/W). Priors: fp32 AdamW as u2a runs on CPU.
    engine_bytes_per_param: dict[str, list[float]] = field(default_factory=lambda: {
        "0": [12.0, 0.0], "1": [4.0, 12.0], "2": [4.0, 12.0], "3": [0.0, 16.0],
        "3off": [0.0, 16.0]})

    def time_vector(self) -> list[float]:
        return [1.0 / getattr(self, k) if k in RATES else getattr(self, k) for k in TIME_TERMS]

    def with_time_vector(self, c: list[float]) -> Constants:
        return dataclasses.replace(self, **{k: 1.0 / max(v, 1e-30) if k in RATES else v
                                            for k, v in zip(TIME_TERMS, c)})


#: Priors of a GPU (one H100/H200-class device, fp32 passes, NCCL): F about 50 TFLOP/s, and
#: per-module overheads of tens of µs (Python hooks and kernel launches, not FLOPs, dominate
#: small models there). The process baseline M0 counts CUDA-allocated bytes only (the CUDA
#: context is not in the allocator's peak).
GPU_PRIOR = Constants(flops_per_core=5e13, latency_s=3e-5, zero3_latency_s=5e-5,
                      bandwidth_Bps=1e11, module_overhead_s=3e-5, zero3_module_overhead_s=2e-4,
                      optimizer_s_per_param=1e-11, hvp_vector_s_per_param=1e-11,
                      step_overhead_s=1e-3, base_memory_bytes=1e8, sec_per_activation=1e-12)
PRIORS = {"cpu": Constants(), "gpu": GPU_PRIOR}


def time_features(work: Work, setup: Setup) -> list[float]:
    """The regressors of :data:`TIME_TERMS` for ``work``: t = features · constants."""
    a = setup.arch
    per_token = a.fwd_flops_per_token(work.seq_len)
    flops = (3.0 * per_token * work.train_tokens + per_token * work.fwd_tokens) / setup.world
    wire, calls = comm_for(work, setup)
    tensorwise = tensorwise_wire(work, setup)
    z3_calls = zero3_param_calls(work, setup) if setup.world > 1 else 0.0
    micro = work.step_micro + work.grad_micro
    # per module per pass: a forward and a backward visit cost differently (Python hooks
    # forward, kernel launches backward); ZeRO-3's fetch/release hooks run in both
    visits = a.param_modules * (micro + work.fwd_batches)
    z3 = 1.0 if setup.zero3 else 0.0
    z3_wire = zero3_param_wire(work, setup)
    return [flops / max(1, setup.threads), calls - z3_calls if setup.world > 1 else 0.0,
            wire - tensorwise - z3_wire, visits, z3 * visits, work.steps * setup.optimizer_params(),
            work.hvps * setup.local_params(), work.steps, z3_calls,
            work.random_vectors * setup.local_params(), a.param_modules * micro,
            (3.0 * work.train_tokens + work.fwd_tokens) / setup.world / max(1, setup.threads)
            * activation_values_per_token(a, work.seq_len, backward=True),
            z3 * a.param_modules * micro, tensorwise, z3_wire]


def predict_time(work: Work, setup: Setup, c: Constants) -> float:
    """Seconds ``work`` takes on every rank of ``setup``."""
    return sum(x * k for x, k in zip(time_features(work, setup), c.time_vector()))


def engine_bytes(setup: Setup, c: Constants) -> float:
    """Params + optimizer states + master copies per rank: Φ·(r + p/W) for the stage."""
    r, p = c.engine_bytes_per_param[setup.stage]
    return setup.arch.params * (r + p / setup.world)


def grad_bytes(setup: Setup, elem: float = 4.0) -> float:
    """Gradient storage per rank: whole under stages 0-1, the partition under 2-3."""
    phi = setup.arch.params
    return elem * phi if setup.stage in ("0", "1") else elem * phi / setup.world


def activation_values_per_token(arch: Arch, seq_len: float, backward: bool) -> float:
    """Activation values kept per token (Korthikanti et al. 2022, no recomputation: 34·s·b·h
    bytes per layer in 16-bit = 17 values per hidden unit, + 5·a·s²·b bytes of attention =
    2.5·a·s values), plus the fp32 logits, their log-softmax and its gradient (4·V); a no-grad
    pass keeps only one layer and the logits (2·V)."""
    if not backward:
        return 2.0 * arch.vocab + 4.0 * arch.hidden
    return 4.0 * arch.vocab + arch.layers * (17.0 * arch.hidden + 2.5 * arch.heads * seq_len)


# Extra fp32 vectors of P/W (ZeRO-3) or P elements alive per phase (u2a_dist code):
# hvp: the direction v, the FD save of θ, g+ and g− (linalg.finite_difference_hvp);
# selector: ∇J, the Neumann/Lanczos state (3, linalg.NEUMANN_STATE_VECTORS) and the FD buffers.
PHASE_VECTORS = {"setup": 0, "train": 0, "hvp": 4, "selector": 7}


def predict_memory(setup: Setup, phase: str, c: Constants, micro_tokens: float,
                   seq_len: float) -> float:
    """Resident bytes of one rank at the peak of ``phase`` (setup, train, hvp, selector): host
    RSS on a CPU, the CUDA allocator's peak on a GPU.

    M0 + engine states + gradients + θ0 (the trainer's fp32 copy of its partitions) + the
    phase's selector vectors and τ temporaries + λ·activations of its largest micro-batch.
    ``setup``: the model is built whole (4Φ) before DeepSpeed partitions it, ZeRO-1/2/3 make
    their fp32 partitions (4Φ/W) meanwhile, and under stages 0-2 θ0 (4Φ) is copied while the
    model is whole; the optimizer states do not exist yet (they appear at the first step); the
    reference log-probs run without gradients.
    """
    phi, lv = setup.arch.params, setup.local_params()
    states = engine_bytes(setup, c) + grad_bytes(setup) + 4.0 * lv
    if phase == "setup":
        states = 4.0 * phi + (4.0 * phi / setup.world if setup.stage != "0" else 0.0) \
            + (0.0 if setup.zero3 else 4.0 * phi)
    vectors = 4.0 * lv * (PHASE_VECTORS.get(phase, 0)
                          + (c.temp_vectors if phase != "setup" else 0.0))
    if setup.zero3 and setup.world > 1 and phase != "setup":
        states += c.zero3_full_bytes_per_param * phi
    if setup.device == "gpu" and setup.stage == "3off":
        states = vectors = 0.0  # parameters, optimizer states and partitions live on the host
    act = 4.0 * micro_tokens * activation_values_per_token(setup.arch, seq_len,
                                                           backward=phase != "setup")
    return c.base_memory_bytes + states + vectors + c.activation_factor * act


# ---- observations from scaling.json ----------------------------------------------------------


@dataclass
class Observation:
    """One measured quantity of one configuration and the model's inputs for it."""

    config: str
    quantity: str
    setup: Setup
    measured: float
    work: Work | None = None          # time observations
    phase: str | None = None          # memory observations
    micro_tokens: float = 0.0
    seq_len: float = 0.0
    rank: int = 0


def config_label(c: dict[str, Any]) -> str:
    return f"{c['model']} z{c['stage']} W{c['world']} {c['device']}"


def _device(c: dict[str, Any]) -> str:
    return "gpu" if c["device"].startswith("gpu") else "cpu"


def _setup(c: dict[str, Any]) -> Setup:
    device = _device(c)
    threads = 1 if device == "gpu" else c["torch_threads"]
    return Setup(stage=str(c["stage"]), world=int(c["world"]), arch=Arch.from_dict(c["arch"]),
                 threads=int(threads), elem_bytes=4.0, device=device)


def config_works(c: dict[str, Any]) -> dict[str, Work]:
    """The Work of every timed operation of one scaling.json configuration (from its settings
    and counted tokens, never from its timings)."""
    seq = c["step"]["padded_tokens"] / c["settings"]["batch_size"]
    works = {
        "step_s": train_step_work(c["step"]["padded_tokens"], seq),
        "grad_s": grad_work(c["grad"]["padded_tokens"], c["grad"]["micro_batches"], seq),
        "hvp_s": hvp_work(c["grad"]["padded_tokens"], c["grad"]["micro_batches"], seq),
        "forward_s": forward_work(c["forward"]["padded_tokens"], c["forward"]["micro_batches"],
                                  seq),
    }
    sel = c.get("selector")
    if sel:
        og = sel["outer_grad"]
        outer = grad_work(og["padded_tokens"], og["micro_batches"], seq)
        # Lanczos and Neumann: 2 small collectives per HVP (a dot product and a norm)
        hvp = hvp_work(c["grad"]["padded_tokens"], c["grad"]["micro_batches"], seq,
                       small_calls=3)
        works["outer_grad_s"] = outer
        if og["reference_pass_timed"]:
            # The removed GPU loop computed J's reference log-probs inside the first timed ∇J
            # (the one repeat reported): two no-grad passes, chosen and rejected.
            works["outer_grad_s"] = outer + forward_work(
                og["padded_tokens"], 2 * math.ceil(
                    og["pairs"] / c["world"] / c["settings"]["eval_batch_size"]), seq)
        works["lanczos_s"] = sel["lanczos"]["hvps"] * hvp + Work(random_vectors=1)
        for row in sel["neumann_vs_k"]:
            if row["hvps"]:
                works[f"neumann_k{row['k']}_s"] = row["hvps"] * hvp
        for row in sel["scores_vs_n"]:
            k = row["forward_passes"]
            per = forward_work(row["padded_tokens"] / k, row["micro_batches"] / k, seq)
            works[f"scores_n{row['n']}_s"] = scores_work(per, k)
        r = sel["round"]
        k = r["score_forward_passes"]
        fwd = forward_work(r["score_padded_tokens"] / k, r["score_micro_batches"] / k, seq)
        works["round_s"] = round_work(outer, hvp, r["hvps"] or 0, fwd, k)
    return works


def _measured_times(c: dict[str, Any], stat: str = "median") -> dict[str, float]:
    """Measured seconds per quantity: the median of the repeats, or their minimum (the least
    disturbed by other processes on a shared machine)."""
    def get(d: dict[str, Any], median_key: str = "seconds") -> float:
        return d["min_s"] if stat == "min" else d[median_key]

    out = {"step_s": get(c["step"], "median_s"), "grad_s": get(c["grad"], "median_s"),
           "hvp_s": get(c["hvp"], "median_s"), "forward_s": get(c["forward"])}
    sel = c.get("selector")
    if sel:
        out["outer_grad_s"] = get(sel["outer_grad"])
        out["lanczos_s"] = get(sel["lanczos"])
        for row in sel["neumann_vs_k"]:
            out[f"neumann_k{row['k']}_s"] = get(row)
        for row in sel["scores_vs_n"]:
            out[f"scores_n{row['n']}_s"] = get(row)
        out["round_s"] = get(sel["round"])
    return out


def observations_from_scaling(record: dict[str, Any], stat: str = "median"
                              ) -> list[Observation]:
    """Every timing and memory measurement of the successful configurations."""
    obs: list[Observation] = []
    for c in record["configs"]:
        if not c.get("ok"):
            continue
        label, setup = config_label(c), _setup(c)
        works, times = config_works(c), _measured_times(c, stat)
        for q, work in works.items():
            if q in times and times[q] > 0:
                obs.append(Observation(label, q, setup, times[q], work=work))
        seq = works["step_s"].seq_len
        # the largest micro-batch of each phase, per rank (setup: the reference log-probs,
        # each rank a batch of eval_batch_size sequences)
        micro = {"setup": c["settings"]["eval_batch_size"] * seq,
                 "train": c["step"]["padded_tokens"] / setup.world,
                 "hvp": c["grad"]["padded_tokens"] / max(1, c["grad"]["micro_batches"])
                 / setup.world}
        if c.get("selector"):
            og = c["selector"]["outer_grad"]
            micro["selector"] = og["padded_tokens"] / og["micro_batches"] / setup.world
        # memory: host RSS on a CPU; on a GPU the device's (the host RSS there is the CUDA
        # context and libraries, which the model does not describe)
        key, kind = ("cuda_peak_bytes", "gpu") if setup.device == "gpu" else ("hwm_bytes", "rss")
        for m in c["memory"]["per_rank"]:
            for phase in ("setup", "train", "hvp", "selector"):
                v = m.get(f"{phase}_{key}")
                if v:
                    obs.append(Observation(label, f"{kind}_{phase}", setup, v, phase=phase,
                                           micro_tokens=micro.get(phase, 0.0), seq_len=seq,
                                           rank=m["rank"]))
    return obs


# ---- calibration -----------------------------------------------------------------------------


def _nnls_relative(rows: list[list[float]], targets: list[float], prior: list[float],
                   prior_weight: float, scale: list[float] | None = None,
                   **solver: Any) -> list[float]:
    """min Σ_i ((rows_i·c − t_i)/s_i)² + w·Σ_j ((c_j − p_j)/p_j)² over c ≥ 0 (s = t unless
    given), solved in the scaled unknowns c_j/p_j: the prior rows keep constants the data do
    not determine near their priors."""
    import numpy as np
    from scipy.optimize import lsq_linear

    p = np.asarray(prior, dtype=float)
    s = np.asarray(targets if scale is None else scale, dtype=float)
    a = np.asarray(rows, dtype=float) * p[None, :] / s[:, None]
    b = np.asarray(targets, dtype=float) / s
    if prior_weight > 0:
        a = np.vstack([a, math.sqrt(prior_weight) * np.eye(len(p))])
        b = np.concatenate([b, math.sqrt(prior_weight) * np.ones(len(p))])
    return list(lsq_linear(a, b, bounds=(0.0, np.inf), **solver).x * p)


def calibrate(obs: list[Observation], prior: Constants | None = None,
              prior_weight: float = 1e-3,
              engine_states: list[tuple[Setup, float]] | None = None) -> Constants:
    """Fit the constants on ``obs`` (time and memory observations) and, when given, the
    engine bytes per parameter per stage on measured (setup, engine bytes) pairs."""
    prior = prior or Constants()
    c = dataclasses.replace(prior, engine_bytes_per_param={
        k: list(v) for k, v in prior.engine_bytes_per_param.items()})
    if engine_states:
        c = calibrate_engine_bytes(engine_states, c)
    timed = [o for o in obs if o.work is not None]
    if timed:
        rows = [time_features(o.work, o.setup) for o in timed]
        fitted = _nnls_relative(rows, [o.measured for o in timed], prior.time_vector(),
                                prior_weight, lsmr_tol="auto", max_iter=10000)
        # A constant pinned at zero would mean "free"; keep it strictly positive.
        fitted = [max(v, 1e-6 * p) for v, p in zip(fitted, prior.time_vector())]
        c = c.with_time_vector(fitted)
    mem = peak_phase_observations(obs)
    if mem:
        rows, targets = [], []
        free = dict(base_memory_bytes=0.0, activation_factor=0.0, temp_vectors=0.0,
                    zero3_full_bytes_per_param=0.0)
        def part(o: Observation, **one: float) -> float:
            return predict_memory(o.setup, o.phase or "train",
                                  dataclasses.replace(c, **{**free, **one}), o.micro_tokens,
                                  o.seq_len)

        for o in mem:
            known = part(o)
            # measured − known = M0 + λ·activations + τ·vectors: fit the three on what the
            # formulas leave
            rows.append([1.0, part(o, activation_factor=1.0) - known,
                         part(o, temp_vectors=1.0) - known,
                         part(o, zero3_full_bytes_per_param=1.0) - known])
            targets.append(o.measured - known)
        ok = [(r, t, o.measured) for r, t, o in zip(rows, targets, mem) if t > 0]
        if ok:  # relative to the whole measured memory, not to the residual
            names = ("base_memory_bytes", "activation_factor", "temp_vectors",
                     "zero3_full_bytes_per_param")
            z = _nnls_relative([r for r, _, _ in ok], [t for _, t, _ in ok],
                               [max(getattr(prior, k), 1e-3) for k in names], prior_weight,
                               scale=[m for _, _, m in ok])
            c = dataclasses.replace(c, **{k: float(v) for k, v in zip(names, z)})
    return c


def peak_phase_observations(obs: list[Observation]) -> list[Observation]:
    """Each rank's memory observation of the phase where its memory peaked: what
    :func:`evaluate` compares, and what the memory constants are fitted on (a high-water mark
    of an earlier phase says only that the later phase's peak was at least as high)."""
    best: dict[tuple[str, str, int], Observation] = {}
    for o in obs:
        if o.phase is None:
            continue
        key = (o.config, o.quantity.split("_")[0], o.rank)
        if key not in best or o.measured > best[key].measured:
            best[key] = o
    return list(best.values())


def calibrate_devices(obs: list[Observation], priors: dict[str, Constants] | None = None,
                      prior_weight: float = 1e-3,
                      engine_states: list[tuple[Setup, float]] | None = None
                      ) -> dict[str, Constants]:
    """One set of constants per device (a GPU's FLOP/s, overheads and memory baseline have
    nothing to do with a CPU's), each fitted on that device's observations; engine bytes per
    parameter (fp32 AdamW, the same on both) on all of them."""
    priors = priors or PRIORS
    out = {}
    for device in sorted({o.setup.device for o in obs}):
        out[device] = calibrate([o for o in obs if o.setup.device == device],
                                priors.get(device, Constants()), prior_weight, engine_states)
    return out


def calibrate_engine_bytes(states: list[tuple[Setup, float]], c: Constants) -> Constants:
    """Least squares per stage: engine bytes = Φ·r + (Φ/W)·p (r, p ≥ 0); stages without
    measurements keep their priors."""
    import numpy as np
    from scipy.optimize import lsq_linear

    table = {k: list(v) for k, v in c.engine_bytes_per_param.items()}
    for stage in sorted({s.stage for s, _ in states}):
        rows = [(s.arch.params, s.arch.params / s.world, b) for s, b in states
                if s.stage == stage]
        a = np.array([[r[0], r[1]] for r in rows]) / np.array([r[2] for r in rows])[:, None]
        prior = np.array(table.get(stage, [4.0, 12.0]), dtype=float)
        # the two columns coincide at W = 1: a weak prior row resolves that case
        a = np.vstack([a, 1e-3 * np.eye(2)])
        b = np.concatenate([np.ones(len(rows)), 1e-3 * prior])
        table[stage] = [float(x) for x in lsq_linear(a, b, bounds=(0.0, np.inf)).x]
    return dataclasses.replace(c, engine_bytes_per_param=table)


def engine_states_from_scaling(record: dict[str, Any]) -> list[tuple[Setup, float]]:
    """(setup, engine bytes) per rank of every successful configuration."""
    return [(_setup(c), float(m["engine"]["total_bytes"])) for c in record["configs"]
            if c.get("ok") for m in c["memory"]["per_rank"]]


# ---- evaluation ------------------------------------------------------------------------------


Calibrated = Constants | dict[str, Constants]


def _for(c: Calibrated, setup: Setup) -> Constants:
    """The constants of the device ``setup`` runs on (``c`` one set or one per device)."""
    return c[setup.device] if isinstance(c, dict) else c


def predict_observation(o: Observation, c: Calibrated) -> float:
    c = _for(c, o.setup)
    if o.work is not None:
        return predict_time(o.work, o.setup, c)
    return predict_memory(o.setup, o.phase or "train", c, o.micro_tokens, o.seq_len)


def evaluate(obs: list[Observation], c: Calibrated, tolerance: float = 0.25
             ) -> list[dict[str, Any]]:
    """Relative error (predicted − measured)/measured of every observation, and whether it is
    within ``tolerance``. Memory is compared per rank at the peak over phases."""
    rows = []
    for o in obs:
        if o.phase is not None:
            continue
        pred = predict_observation(o, c)
        rows.append(_row(o.config, o.quantity, o.measured, pred, tolerance))
    peaks: dict[tuple[str, str, int], tuple[float, float]] = {}
    for o in obs:
        if o.phase is None:
            continue
        pred = predict_observation(o, c)
        key = (o.config, o.quantity.split("_")[0], o.rank)  # rss or gpu
        m, p = peaks.get(key, (0.0, 0.0))
        peaks[key] = (max(m, o.measured), max(p, pred))
    for (config, kind, rank), (m, p) in sorted(peaks.items()):
        rows.append(_row(config, f"peak_{kind}_rank{rank}", m, p, tolerance))
    return rows


def _row(config: str, quantity: str, measured: float, predicted: float,
         tolerance: float) -> dict[str, Any]:
    if measured == 0:
        err = 0.0 if predicted == 0 else math.inf
    else:
        err = (predicted - measured) / measured
    return {"config": config, "quantity": quantity, "measured": measured,
            "predicted": predicted, "rel_error": err, "ok": abs(err) <= tolerance}


def comm_checks(record: dict[str, Any], tolerance: float = 0.25) -> list[dict[str, Any]]:
    """Predicted wire bytes and collectives per step, grad pass and HVP against the counted
    ones (rank 0; not fitted)."""
    rows = []
    for c in record["configs"]:
        if not c.get("ok"):
            continue
        setup, works = _setup(c), config_works(c)
        for q, key in (("step_s", "step"), ("grad_s", "grad"), ("hvp_s", "hvp")):
            comm = c[key].get("comm")
            if not comm:
                continue
            wire, calls = comm_for(works[q], setup)
            label = config_label(c)
            rows.append(_row(label, f"wire_bytes_per_{key}", comm["wire_bytes"], wire,
                             tolerance))
            if setup.world > 1:
                rows.append(_row(label, f"collectives_per_{key}", comm["calls"], calls,
                                 tolerance))
    return rows


def leave_one_config_out(obs: list[Observation], prior: dict[str, Constants],
                         engine_states: list[tuple[Setup, float]], tolerance: float = 0.25,
                         prior_weight: float = 1e-3) -> list[dict[str, Any]]:
    """Held-out errors: each configuration predicted by constants fitted on the others."""
    rows = []
    configs = sorted({o.config for o in obs})
    for cfg in configs:
        held = [o for o in obs if o.config == cfg]
        train = [o for o in obs if o.config != cfg and o.setup.device == held[0].setup.device]
        if len({o.config for o in train}) < 2:
            continue  # too few configurations of this device to fit on the others
        c = calibrate(train, prior.get(held[0].setup.device, Constants()), prior_weight,
                      engine_states)
        rows += evaluate(held, c, tolerance)
    return rows


# ---- projections to large models on GPUs -----------------------------------------------------


@dataclass
class GPU:
    """Assumed accelerator and network (not calibrated here: no such cluster was measured)."""

    name: str = "NVIDIA H100 SXM 80GB"
    memory_bytes: float = 80e9
    bf16_peak_flops: float = 989e12      # dense bf16 tensor-core peak
    bf16_mfu: float = 0.40               # sustained share for training passes
    fp32_peak_flops: float = 67e12       # fp32 without TF32 (the selector's FD passes)
    fp32_efficiency: float = 0.50
    gpus_per_node: int = 8
    intra_node_Bps: float = 360e9        # NVLink 4 ring all-gather bus bandwidth
    inter_node_Bps: float = 45e9         # 400 Gb/s InfiniBand NDR per GPU
    intra_latency_s: float = 15e-6
    inter_latency_s: float = 40e-6
    module_overhead_s: float = 2e-5      # per module per pass (kernel launches, hooks)
    zero3_module_overhead_s: float = 3e-5
    optimizer_s_per_param: float = 1e-11  # fused Adam, HBM-bound: ~16 B/param at ~2 TB/s
    hvp_vector_s_per_param: float = 2e-11
    step_overhead_s: float = 5e-3
    pcie_Bps: float = 25e9               # host<->device for ZeRO-3 offload
    cpu_adam_s_per_param: float = 1e-9   # DeepSpeed CPUAdam, per element per step

    def constants(self, n: int, precision: str, measured: Constants | None = None
                  ) -> Constants:
        """Constants of ``n`` such GPUs. ``measured``: constants calibrated on a real GPU
        (scaling.json's ``gpu`` configurations): their per-module and per-step overheads,
        memory-bound work and host-side random draws replace the assumed ones (the network,
        FLOP/s and fused-optimizer figures stay assumed: one GPU measures none of them)."""
        flops = (self.bf16_peak_flops * self.bf16_mfu if precision == "bf16"
                 else self.fp32_peak_flops * self.fp32_efficiency)
        inter = n > self.gpus_per_node
        base = measured or dataclasses.replace(
            GPU_PRIOR, module_overhead_s=self.module_overhead_s,
            backward_module_overhead_s=self.module_overhead_s,
            zero3_module_overhead_s=self.zero3_module_overhead_s,
            zero3_backward_module_overhead_s=self.zero3_module_overhead_s,
            step_overhead_s=self.step_overhead_s)
        return dataclasses.replace(
            base, flops_per_core=flops,
            latency_s=self.inter_latency_s if inter else self.intra_latency_s,
            zero3_latency_s=self.inter_latency_s if inter else self.intra_latency_s,
            bandwidth_Bps=self.inter_node_Bps if inter else self.intra_node_Bps,
            tensorwise_bandwidth_Bps=self.inter_node_Bps if inter else self.intra_node_Bps,
            zero3_bandwidth_Bps=self.inter_node_Bps if inter else self.intra_node_Bps,
            optimizer_s_per_param=self.optimizer_s_per_param,
            hvp_vector_s_per_param=self.hvp_vector_s_per_param, base_memory_bytes=2e9,
            activation_factor=1.0)


#: Llama-2 shapes (no biases; untied 32000-token embeddings; 9 modules with parameters per
#: layer: q, k, v, o, gate, up, down and two RMSNorms).
PROJECTION_MODELS: dict[str, Arch] = {
    "7B": Arch(params=6.738e9, compute_params=6.738e9 - 32000 * 4096, param_tensors=291,
               param_modules=291, layers=32, hidden=4096, heads=32, vocab=32000),
    "70B": Arch(params=6.898e10, compute_params=6.898e10 - 32000 * 8192, param_tensors=723,
                param_modules=723, layers=80, hidden=8192, heads=64, vocab=32000),
}


@dataclass
class Workload:
    """The U2A job projected: sequences of ``seq_len`` tokens; ``batch`` sequences per
    optimiser step (global); the selector's Hessian batch, P pairs, L Lanczos iterations,
    K Neumann terms, N negatives scored, and the forward batch per GPU."""

    seq_len: int = 512
    batch: int = 64
    hessian_batch: int = 32
    pairs: int = 256
    lanczos: int = 20
    neumann: int = 20
    negatives: int = 10_000
    forward_batch: int = 16


def u2a_gpu_memory(arch: Arch, n: int, stage: str, w: Workload) -> dict[str, float]:
    """Bytes per GPU: ZeRO model states (paper formula, bf16 + fp32 Adam) + u2a's extras:
    θ0 (fp32 copy of the partition, for the prox term and as the reference), the selector's
    fp32 vectors at their peak (∇J, 3 Neumann vectors, the FD save of θ, g+ and g−: 7), the
    activations of one micro-batch with activation checkpointing (layer inputs in bf16, one
    layer's activations, fp32 logits and their gradient) and the ZeRO-3 working set (two
    gathered layers), and the selector's fp32 twin of a bf16 run (its weights and gradients,
    fp32: 8 bytes per local parameter at stage 3; :meth:`u2a_dist.engine.Engine.fp32_twin`).
    With offload (3off) the states, θ0 and the selector's vectors live in host memory; the twin
    is not offloaded (it stays on the GPU)."""
    phi = arch.params
    local = phi / n if stage in ZERO3_STAGES else phi
    micro = max(1, math.ceil(w.batch / n))
    tokens = micro * w.seq_len
    act = (2.0 * tokens * arch.hidden * arch.layers
           + 2.0 * tokens * (34 * arch.hidden + 5 * arch.heads * w.seq_len)
           + 8.0 * tokens * arch.vocab)
    working = 2 * 2.0 * phi / max(1, arch.layers) if stage in ZERO3_STAGES else 0.0
    states = zero_model_state_bytes(phi, n, stage)
    theta0 = 4.0 * local
    selector = 7 * 4.0 * local
    if stage in ZERO3_STAGES:
        twin = 8.0 * phi / n
    else:  # whole fp32 weights; gradients whole at stage 0, else partitioned + fp32 partition
        twin = 8.0 * phi if stage == "0" else 4.0 * phi + 8.0 * phi / n
    host = 0.0
    if stage == "3off":
        host = zero_model_state_bytes(phi, n, "3") + theta0 + selector
        theta0 = selector = 0.0
    total = states + theta0 + twin + selector + act + working
    return {"model_states": states, "theta0": theta0, "fp32_twin": twin,
            "selector_vectors": selector,
            "activations": act, "zero3_working_set": working, "total": total,
            "host_per_gpu": host}


def project(arch: Arch, n: int, stage: str, gpu: GPU, w: Workload,
            measured: Constants | None = None) -> dict[str, Any]:
    """Memory, communication and times of the projected job on ``n`` GPUs (``measured``: GPU
    constants calibrated on a real GPU, see :meth:`GPU.constants`)."""
    bf16 = Setup(stage=stage, world=n, arch=arch, threads=1, elem_bytes=2.0, device="gpu")
    fp32 = Setup(stage=stage, world=n, arch=arch, threads=1, elem_bytes=4.0, device="gpu")
    c16, c32 = gpu.constants(n, "bf16", measured), gpu.constants(n, "fp32", measured)
    step = train_step_work(w.batch * w.seq_len, w.seq_len)
    h_micro = 1  # the Hessian batch's share per GPU in one micro-batch
    hvp = hvp_work(w.hessian_batch * w.seq_len, h_micro, w.seq_len, small_calls=3)
    outer = grad_work(2 * w.pairs * w.seq_len,
                      max(1, math.ceil(math.ceil(w.pairs / n) / w.forward_batch)), w.seq_len)
    fwd = forward_work(w.negatives * w.seq_len,
                       max(1, math.ceil(math.ceil(w.negatives / n) / w.forward_batch)),
                       w.seq_len)
    hvps = w.lanczos + w.neumann + 1
    t_step = predict_time(step, bf16, c16)
    t_hvp = predict_time(hvp, fp32, c32)
    t_outer = predict_time(outer, fp32, c32)
    t_scores = predict_time(scores_work(fwd), fp32, c32)
    t_random = predict_time(Work(random_vectors=1), fp32, c32)  # the Lanczos start
    offload_note = None
    if stage == "3off":
        # every pass moves the bf16 partition up (fwd, bwd) and the gradients down over
        # PCIe; Adam runs on the CPU
        phi_l = arch.params / n
        t_step += 3 * 2.0 * phi_l / gpu.pcie_Bps + gpu.cpu_adam_s_per_param * phi_l
        t_hvp += 2 * 3 * 4.0 * phi_l / gpu.pcie_Bps
        offload_note = "adds PCIe traffic 6Φ/N bytes per fwd+bwd and CPU Adam"
    mem = u2a_gpu_memory(arch, n, stage, w)
    return {
        "gpus": n, "stage": stage, "params": arch.params,
        "memory_bytes": mem, "fits": mem["total"] <= 0.9 * gpu.memory_bytes,
        "comm_bytes_per_step": comm_for(step, bf16)[0],
        "comm_bytes_per_hvp": comm_for(hvp, fp32)[0],
        "step_s": t_step, "tokens_per_s": w.batch * w.seq_len / t_step,
        "hvp_s": t_hvp, "outer_grad_s": t_outer, "scores_s": t_scores,
        "round_s": t_outer + hvps * t_hvp + t_scores + t_random, "hvps_per_round": hvps,
        "random_start_s": t_random,
        "offload": offload_note,
    }


# ---- the run ---------------------------------------------------------------------------------

#: (model, GPUs, stage) rows of the projection
PROJECTIONS = [(m, n, "3") for m in ("7B", "70B") for n in (8, 16, 32, 64)] + [
    ("70B", 8, "3off"), ("7B", 8, "0"), ("7B", 8, "2")]
PROJECTION_NOTES = (
    "Assumed, not measured: the GPU (`GPU`: H100 SXM 80 GB; training passes bf16 at 40% of "
    "989 TFLOP/s, the selector's finite-difference passes fp32 without TF32 at 50% of 67), the "
    "network (NVLink ring 360 GB/s within a node of 8, 400 Gb/s InfiniBand per GPU across "
    "nodes), no overlap of communication and compute (an upper bound). Measured: the per-module "
    "and per-step overheads, memory-bound work and the host-drawn Lanczos start are the `gpu` "
    "constants fitted on one H200. Workload (`Workload`): sequences of 512 tokens, 64 per step, "
    "Hessian batch 32, P = 256 pairs, L = K = 20, N = 10 000 negatives scored. Memory 'fits' "
    "under 90% of the GPU's: ZeRO-3 model states are 16Φ/N; u2a adds θ0 (4Φ/N), the bf16 "
    "run's fp32 twin for the selector (8Φ/N, not offloaded) and, in a round, 7 fp32 vectors "
    "(28Φ/N).")


def run(scaling_path: Path, out_dir: Path, tolerance: float = 0.25,
        prior_weight: float = 1e-3, stat: str = "median") -> dict[str, Any]:
    """Calibrate on scaling.json, evaluate, project; write cost_model.{json,md}."""
    sys.path.insert(0, str(REPO))
    from benchmarks.common import stamp
    from benchmarks.reports import cost_model_markdown

    record = json.loads(scaling_path.read_text())
    obs = observations_from_scaling(record, stat)
    if not obs:
        raise SystemExit(f"{scaling_path}: no successful configuration to calibrate on")
    states = engine_states_from_scaling(record)
    consts = calibrate_devices(obs, PRIORS, prior_weight, states)
    errors = evaluate(obs, consts, tolerance)
    gpu, work = GPU(), Workload()
    rows = [{"model": m, **project(PROJECTION_MODELS[m], n, stage, gpu, work, consts.get("gpu"))}
            for m, n, stage in PROJECTIONS]
    result = {
        "benchmark": "cost_model", **stamp(), "scaling": str(scaling_path),
        "scaling_date": record.get("date_utc"), "n_configs": len({o.config for o in obs}),
        "n_observations": len(obs), "tolerance": tolerance, "prior_weight": prior_weight,
        "stat": stat, "constants": {d: dataclasses.asdict(c) for d, c in consts.items()},
        "prior": {d: dataclasses.asdict(PRIORS[d]) for d in consts},
        "errors": errors, "misses": [r for r in errors if not r["ok"]],
        "leave_one_out": leave_one_config_out(obs, PRIORS, states, tolerance, prior_weight),
        "comm_checks": comm_checks(record, tolerance),
        "projections": {"gpu": dataclasses.asdict(gpu), "workload": dataclasses.asdict(work),
                        "rows": rows, "notes": PROJECTION_NOTES}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cost_model.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out_dir / "cost_model.md").write_text(cost_model_markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scaling", default=str(RESULTS / "scaling.json"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--prior-weight", type=float, default=1e-3,
                    help="pull of each constant toward its prior (relative, squared)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="which statistic of the repeated timings to fit and judge")
    args = ap.parse_args(argv)
    result = run(Path(args.scaling), Path(args.out), args.tolerance, args.prior_weight,
                 args.stat)
    for name in ("errors", "leave_one_out", "comm_checks"):
        rows = result[name]
        print(f"{name}: {sum(r['ok'] for r in rows)} of {len(rows)} within "
              f"±{args.tolerance:.0%}")
        for r in (r for r in rows if not r["ok"]):
            print(f"  MISS {r['config']} {r['quantity']}: measured {r['measured']:.4g}, "
                  f"predicted {r['predicted']:.4g} ({r['rel_error']:+.0%})")
    print(f"-> {Path(args.out) / 'cost_model.json'}, {Path(args.out) / 'cost_model.md'}")
    return result


if __name__ == "__main__":
    main()
